"""``dhow keys …``, ``dhow tenants …`` and ``dhow models trust``: access administration on the registry database.

These work on the database directly (the same one the servers use: ``--registry`` or the data folder), so
they work before any server runs, e.g. to make the first keys of a deployment; servers pick the changes up
within their registry poll. Every change is also written to the audit trail.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dhow.access.ratelimit import Limits
from dhow.access.store import AccessStore, PrincipalRecord
from dhow.core.errors import InvalidInput
from dhow.governance.audit import AuditRecord, AuditStore
from dhow.governance.commands import audit_store_url

__all__ = ["add_parsers", "run"]

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", metavar="DIR", help="the servers' data folder (default ./.dhow, or DHOW_DATA_DIR)"
    )
    parser.add_argument("--registry", metavar="URL", help="the servers' registry URL (or DHOW_REGISTRY)")
    parser.add_argument("--audit-store", metavar="URL", help="the servers' audit store (or DHOW_AUDIT_STORE)")


def _limits_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=0.0, help="requests per second (0 = unlimited)")
    parser.add_argument("--burst", type=int, default=0, help="requests at once above the rate (default: the rate)")
    parser.add_argument("--concurrency", type=int, default=0, help="requests in flight at once (0 = unlimited)")


def add_parsers(commands: Subparsers, model_commands: Subparsers) -> None:
    keys = commands.add_parser(
        "keys", help="API keys and client-certificate identities", description="Make, list, rotate and revoke keys."
    )
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="make an API key (its secret is printed once)")
    create.add_argument("name", help="what the key is for, e.g. ci-bot")
    add_cert = actions.add_parser("add-cert", help="let a client certificate's common name in (mutual TLS)")
    add_cert.add_argument("common_name", metavar="CN", help="the certificate's subject CN")
    for parser in (create, add_cert):
        parser.add_argument(
            "--role",
            dest="roles",
            action="append",
            required=True,
            help="admin, deployer, invoker or auditor, optionally scoped: invoker:fraud-*; repeatable",
        )
        parser.add_argument("--tenant", default="default", help="the tenant (default: default; * = every tenant)")
        parser.add_argument("--region", default="", help="data region of its requests when they name none")
        _limits_options(parser)
        _store_options(parser)
    create.add_argument("--expires-in", type=float, metavar="SECONDS", help="the key stops working after this")
    listing = actions.add_parser("list", help="list keys and identities (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked ones")
    _store_options(listing)
    revoke = actions.add_parser("revoke", help="revoke a key or identity at once")
    revoke.add_argument("id")
    _store_options(revoke)
    rotate = actions.add_parser("rotate", help="replace a key by a new one with the same roles")
    rotate.add_argument("id")
    rotate.add_argument("--grace", type=float, default=0.0, metavar="SECONDS", help="the old key works this long")
    _store_options(rotate)
    limits = actions.add_parser("set-limits", help="change a key's quotas")
    limits.add_argument("id")
    _limits_options(limits)
    _store_options(limits)

    tenants = commands.add_parser("tenants", help="tenants' quotas and default regions")
    tenant_actions = tenants.add_subparsers(dest="tenants_command", metavar="ACTION", required=True)
    set_tenant = tenant_actions.add_parser("set", help="set a tenant's quotas and default data region")
    set_tenant.add_argument("name")
    set_tenant.add_argument("--region", default="", help="data region of its requests when they name none")
    _limits_options(set_tenant)
    _store_options(set_tenant)
    list_tenants = tenant_actions.add_parser("list", help="list tenants with quotas")
    _store_options(list_tenants)

    trust = model_commands.add_parser(
        "trust",
        help="record the SHA-256 of a model's artifacts (for --require-digests)",
        description="Record the digests of every file of the model's version folders, as they are now.",
    )
    trust.add_argument("repository", type=Path, metavar="DIR")
    trust.add_argument("model")
    trust.add_argument("--version", dest="model_version", help="one version (default: every version folder)")
    _store_options(trust)


def _env(args: argparse.Namespace, name: str) -> str:
    return str(getattr(args, name, None) or os.environ.get(f"DHOW_{name.upper()}", ""))


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(_env(args, "data_dir") or ".dhow").resolve()


def _open_store(args: argparse.Namespace) -> AccessStore:
    return AccessStore.open(_env(args, "registry") or f"sqlite:///{_data_dir(args) / 'registry.sqlite3'}")


def _audit(args: argparse.Namespace, action: str, tenant: str, details: dict[str, Any]) -> None:
    data_dir = Path(args.data_dir) if args.data_dir else None
    store = AuditStore.open(audit_store_url(args.audit_store, data_dir))
    try:
        store.append([AuditRecord(kind="admin", action=action, actor=_actor(), tenant=tenant, details=details)])
    finally:
        store.close()


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(rate=args.rate, burst=args.burst, concurrency=args.concurrency)


def _show(record: PrincipalRecord) -> str:
    state = "active" if record.active() else ("revoked" if record.revoked_at else "expired")
    limits = record.limits
    quota = f"rate {limits.rate:g}/s burst {limits.burst} concurrency {limits.concurrency}"
    return (
        f"{record.id:<18} {record.kind:<4} {record.name:<20} tenant {record.tenant:<10} "
        f"{','.join(record.roles):<28} {state:<8} {quota}"
    )


def run(args: argparse.Namespace) -> int | None:
    """Runs ``keys``, ``tenants`` and ``models trust``; None for any other command."""
    if args.command == "keys":
        return _keys(args)
    if args.command == "tenants":
        return _tenants(args)
    if args.command == "models" and args.models_command == "trust":
        return _trust(args)
    return None


def _keys(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        action = args.keys_command
        if action == "create":
            made = store.create_key(
                args.name,
                tenant=args.tenant,
                roles=args.roles,
                actor=_actor(),
                region=args.region,
                limits=_limits(args),
                expires_in_s=args.expires_in,
            )
            assert made is not None
            record, token = made
            _audit(args, "key.create", record.tenant, {"key": record.id, "name": record.name, "roles": args.roles})
            print(f"made API key {record.id} ({record.name}); its secret is shown this once:\n{token}")
        elif action == "add-cert":
            record = store.create_identity(
                args.common_name,
                tenant=args.tenant,
                roles=args.roles,
                actor=_actor(),
                region=args.region,
                limits=_limits(args),
            )
            _audit(args, "key.create", record.tenant, {"identity": record.id, "roles": args.roles})
            print(f"client certificates with CN={args.common_name} may now call as {record.id}")
        elif action == "list":
            for record in store.principals():
                if args.all or record.active():
                    print(_show(record))
        elif action == "revoke":
            record = store.revoke(args.id, actor=_actor())
            _audit(args, "key.revoke", record.tenant, {"key": record.id, "name": record.name})
            print(f"revoked {record.id} ({record.name})")
        elif action == "rotate":
            new, token = store.rotate(args.id, actor=_actor(), grace_s=args.grace)
            _audit(args, "key.rotate", new.tenant, {"key": args.id, "replaced_by": new.id, "grace_s": args.grace})
            ends = f"in {args.grace:g} s" if args.grace else "now"
            print(f"made API key {new.id} to replace {args.id}, which stops working {ends}; the new secret:\n{token}")
        else:
            record = store.set_limits(args.id, _limits(args))
            _audit(args, "key.limits", record.tenant, {"key": record.id, **record.as_dict()})
            print(_show(record))
        return 0
    finally:
        store.close()


def _tenants(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        if args.tenants_command == "set":
            tenant = store.set_tenant(args.name, limits=_limits(args), region=args.region, actor=_actor())
            _audit(args, "tenant.set", tenant.name, {**tenant.as_dict(), "region": tenant.region})
            print(f"tenant {tenant.name}: {tenant.as_dict()}, default region {tenant.region or 'none'}")
        else:
            for tenant in sorted(store.tenants().values(), key=lambda t: t.name):
                print(f"{tenant.name:<20} {tenant.as_dict()} region {tenant.region or '-'}")
        return 0
    finally:
        store.close()


def _trust(args: argparse.Namespace) -> int:
    from dhow.repository.encryption import trusted_files

    model_dir = args.repository / args.model
    if not model_dir.is_dir():
        raise InvalidInput(f"{model_dir} is not a model folder")
    versions = (
        [args.model_version]
        if args.model_version
        else sorted(p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    )
    store = _open_store(args)
    try:
        for version in versions:
            digests = trusted_files(model_dir / version)
            if not digests:
                raise InvalidInput(f"{model_dir / version} holds no files to trust")
            store.record_digests(args.model, version, digests, actor=_actor())
            _audit(args, "model.trust", "default", {"model": args.model, "version": version, "digests": digests})
            print(f"trusted {len(digests)} file(s) of {args.model} version {version}")
    finally:
        store.close()
    sys.stdout.flush()
    return 0
