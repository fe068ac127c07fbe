"""``dhow keys …``, ``dhow tenants …`` and ``dhow models trust``: access administration on the registry database.

These work on the database directly (the same one the servers use: ``--registry`` or the data folder), so
they work before any server runs, e.g. to make the first keys of a deployment; servers pick the changes up
within their registry poll. Every change is also written to the audit trail.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dhow.access.permissions import DEFAULT_TENANT
from dhow.access.ratelimit import Limits
from dhow.access.store import AccessStore, PrincipalRecord
from dhow.commands.stores import locate_stores
from dhow.commands.table import format_table
from dhow.core.errors import InvalidInput, NotFound
from dhow.governance.audit import AuditRecord, AuditStore
from dhow.settings import CONFIG_FILE_HELP, ServerSettings

__all__ = ["add_parsers", "run"]

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="the servers' data folder, made if absent (default $DHOW_DATA_DIR, else ./.dhow if it exists)",
    )
    parser.add_argument("--registry", metavar="URL", help="the servers' registry URL (or DHOW_REGISTRY)")
    parser.add_argument("--audit-store", metavar="URL", help="the servers' audit store (or DHOW_AUDIT_STORE)")
    parser.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_FILE_HELP)


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", dest="as_json", action="store_true", help="print JSON (as the admin API answers) instead of a table"
    )


def _limits_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=0.0, help="requests per second (0 = unlimited)")
    parser.add_argument("--burst", type=int, default=0, help="requests at once above the rate (default: the rate)")
    parser.add_argument("--concurrency", type=int, default=0, help="requests in flight at once (0 = unlimited)")


def add_parsers(commands: Subparsers, model_commands: Subparsers) -> None:
    """Add ``dhow keys``, ``dhow tenants`` and ``dhow models trust``."""
    _add_keys(commands)
    _add_tenants(commands)
    trust = model_commands.add_parser(
        "trust",
        help="record the SHA-256 of a model's artifacts (for --require-digests)",
        description="Record the digests of every file of the model's version folders, as they are now.",
    )
    trust.add_argument("repository", type=Path, metavar="DIR")
    trust.add_argument("model")
    trust.add_argument("--version", dest="model_version", help="one version (default: every version folder)")
    _store_options(trust)


def _add_keys(commands: Subparsers) -> None:
    keys = commands.add_parser(
        "keys", help="API keys and client-certificate identities", description="Make, list, rotate and revoke keys."
    )
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="make an API key (its secret is printed once)")
    create.add_argument("name", help="what the key is for, e.g. ci-bot")
    add_cert = actions.add_parser("add-cert", help="let a client certificate's common name in (mutual TLS)")
    add_cert.add_argument("common_name", metavar="CN", help="the certificate's subject CN")
    for parser in (create, add_cert):
        _grant_options(parser)
    create.add_argument("--expires-in", type=float, metavar="SECONDS", help="the key stops working after this")
    listing = actions.add_parser("list", help="list keys and identities (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked and expired ones")
    _json_option(listing)
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


def _grant_options(parser: argparse.ArgumentParser) -> None:
    """What a new key or identity may do, and where it works."""
    parser.add_argument(
        "--role",
        dest="roles",
        action="append",
        required=True,
        help="admin, deployer, invoker or auditor, optionally scoped: invoker:fraud-*; repeatable",
    )
    parser.add_argument("--tenant", default=DEFAULT_TENANT, help="the tenant (default: default; * = every tenant)")
    parser.add_argument("--region", default="", help="data region of its requests when they name none")
    _limits_options(parser)
    _store_options(parser)


def _add_tenants(commands: Subparsers) -> None:
    tenants = commands.add_parser("tenants", help="tenants' quotas and default regions")
    tenant_actions = tenants.add_subparsers(dest="tenants_command", metavar="ACTION", required=True)
    set_tenant = tenant_actions.add_parser("set", help="set a tenant's quotas and default data region")
    set_tenant.add_argument("name")
    set_tenant.add_argument("--region", default="", help="data region of its requests when they name none")
    _limits_options(set_tenant)
    _store_options(set_tenant)
    list_tenants = tenant_actions.add_parser("list", help="list tenants with quotas")
    _json_option(list_tenants)
    _store_options(list_tenants)


def _settings(args: argparse.Namespace) -> ServerSettings:
    """Where the stores are and who acts, decided as for every command (only the store options count:
    ``--region`` here is a key's or tenant's region, not a server's)."""
    given = {name: getattr(args, name) for name in ("data_dir", "registry", "audit_store")}
    return locate_stores(args.command, given, args.config)


def _audit(settings: ServerSettings, action: str, tenant: str, details: dict[str, Any]) -> None:
    store = AuditStore.open(settings.audit_url())
    try:
        record = AuditRecord(kind="admin", action=action, actor=settings.actor_name(), tenant=tenant, details=details)
        store.append([record])
    finally:
        store.close()


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(rate=args.rate, burst=args.burst, concurrency=args.concurrency)


_KEY_HEADERS = ("ID", "KIND", "NAME", "TENANT", "ROLES", "REGION", "STATE", "RATE", "BURST", "CONCURRENCY", "EXPIRES")
_TENANT_HEADERS = ("TENANT", "REGION", "RATE", "BURST", "CONCURRENCY")


def _key_cells(record: PrincipalRecord) -> tuple[str, ...]:
    """A key's row: quotas of 0 are unlimited, shown as ``-`` like every empty cell."""
    state = "active" if record.active() else ("revoked" if record.revoked_at else "expired")
    who = (record.id, record.kind, record.name, record.tenant, ",".join(record.roles), record.region, state)
    return (*who, *_quota_cells(record.limits), record.expires_at or "")


def _quota_cells(limits: Limits) -> tuple[str, ...]:
    return (f"{limits.rate:g}/s" if limits.rate else "", str(limits.burst or ""), str(limits.concurrency or ""))


def _print_keys(records: list[PrincipalRecord], as_json: bool) -> None:
    """The keys as a table, or as the admin API lists them (``{"keys": [...]}``) for machines."""
    if as_json:
        print(json.dumps({"keys": [record.as_dict() for record in records]}, indent=2))
    elif records:
        print(format_table(_KEY_HEADERS, map(_key_cells, records)))
    else:
        print("no keys or identities (make one with 'dhow keys create NAME --role ROLE')")


def run(args: argparse.Namespace) -> int | None:
    """Runs ``keys``, ``tenants`` and ``models trust``; None for any other command."""
    if args.command == "keys":
        action = _KEY_ACTIONS[args.keys_command]
    elif args.command == "tenants":
        action = _set_tenant if args.tenants_command == "set" else _list_tenants
    elif args.command == "models" and args.models_command == "trust":
        _versions(args.repository / args.model, args.model_version)  # refused before a store is made
        action = _trust
    else:
        return None
    settings = _settings(args)
    store = AccessStore.open(settings.registry_url())
    try:
        action(store, settings, args)
    except NotFound as exc:
        raise _named_instead(store, args) or exc from None
    finally:
        store.close()
    sys.stdout.flush()
    return 0


def _named_instead(store: AccessStore, args: argparse.Namespace) -> NotFound | None:
    """The refusal of a key's name given where its id is wanted (``dhow keys revoke ci-bot``): it names the id.
    None when the id given is no key's name either."""
    given = getattr(args, "id", None)
    ids = [record.id for record in store.principals() if given and record.name == given and record.active()]
    if not ids:
        return None
    return NotFound(
        f"{given!r} is the name of key {' and of key '.join(ids)}, not an id: give the id, "
        f"'dhow keys {args.keys_command} {ids[0]}' ('dhow keys list' shows ids and names)"
    )


#: an action: the access store, where the audit trail is and who acts, the options
Action = Callable[[AccessStore, ServerSettings, argparse.Namespace], None]


def _create_key(store: AccessStore, settings: ServerSettings, args: argparse.Namespace) -> None:
    made = store.create_key(
        args.name,
        tenant=args.tenant,
        roles=args.roles,
        actor=settings.actor_name(),
        region=args.region,
        limits=_limits(args),
        expires_in_s=args.expires_in,
    )
    assert made is not None
    record, token = made
    _audit(settings, "key.create", record.tenant, {"key": record.id, "name": record.name, "roles": args.roles})
    print(f"made API key {record.id} ({record.name}); its secret is shown this once:\n{token}")


def _add_cert(store: AccessStore, settings: ServerSettings, args: argparse.Namespace) -> None:
    record = store.create_identity(
        args.common_name,
        tenant=args.tenant,
        roles=args.roles,
        actor=settings.actor_name(),
        region=args.region,
        limits=_limits(args),
    )
    _audit(settings, "key.create", record.tenant, {"identity": record.id, "roles": args.roles})
    print(f"client certificates with CN={args.common_name} may now call as {record.id}")


def _list_keys(store: AccessStore, settings: ServerSettings, args: argparse.Namespace) -> None:
    _print_keys([record for record in store.principals() if args.all or record.active()], args.as_json)


def _revoke(store: AccessStore, settings: ServerSettings, args: argparse.Namespace) -> None:
    record = store.revoke(args.id, actor=settings.actor_name())
    _audit(settings, "key.revoke", record.tenant, {"key": record.id, "name": record.name})
    print(f"revoked {record.id} ({record.name})")


def _rotate(store: AccessStore, settings: ServerSettings, args: argparse.Namespace) -> None:
    new, token = store.rotate(args.id, actor=settings.actor_name(), grace_s=args.grace)
    _audit(settings, "key.rotate", new.tenant, {"key": args.id, "replaced_by": new.id, "grace_s": args.grace})
    ends = f"in {args.grace:g} s" if args.grace else "now"
    print(f"made API key {new.id} to replace {args.id}, which stops working {ends}; the new secret:\n{token}")


def _set_limits(store: AccessStore, settings: ServerSettings, args: argparse.Namespace) -> None:
    record = store.set_limits(args.id, _limits(args))
    _audit(settings, "key.limits", record.tenant, {"key": record.id, **record.as_dict()})
    _print_keys([record], as_json=False)


_KEY_ACTIONS: dict[str, Action] = {
    "create": _create_key,
    "add-cert": _add_cert,
    "list": _list_keys,
    "revoke": _revoke,
    "rotate": _rotate,
    "set-limits": _set_limits,
}


def _set_tenant(store: AccessStore, settings: ServerSettings, args: argparse.Namespace) -> None:
    tenant = store.set_tenant(args.name, limits=_limits(args), region=args.region, actor=settings.actor_name())
    _audit(settings, "tenant.set", tenant.name, {**tenant.as_dict(), "region": tenant.region})
    print(f"tenant {tenant.name}: {tenant.as_dict()}, default region {tenant.region or 'none'}")


def _list_tenants(store: AccessStore, settings: ServerSettings, args: argparse.Namespace) -> None:
    tenants = sorted(store.tenants().values(), key=lambda t: t.name)
    if args.as_json:
        print(json.dumps({"tenants": [{**t.as_dict(), "region": t.region} for t in tenants]}, indent=2))
    elif tenants:
        print(format_table(_TENANT_HEADERS, ((t.name, t.region, *_quota_cells(t.limits)) for t in tenants)))
    else:
        print("no tenant has quotas or a region (set them with 'dhow tenants set NAME')")


def _trust(store: AccessStore, settings: ServerSettings, args: argparse.Namespace) -> None:
    from dhow.repository.encryption import trusted_files

    model_dir = args.repository / args.model
    for version in _versions(model_dir, args.model_version):
        digests = trusted_files(model_dir / version)
        if not digests:
            raise InvalidInput(f"{model_dir / version} holds no files to trust")
        store.record_digests(args.model, version, digests, actor=settings.actor_name())
        _audit(settings, "model.trust", "default", {"model": args.model, "version": version, "digests": digests})
        print(f"trusted {len(digests)} file(s) of {args.model} version {version}")


def _versions(model_dir: Path, given: str | None) -> list[str]:
    """The version folders to trust: the one given, else every integer folder."""
    if not model_dir.is_dir():
        raise InvalidInput(f"{model_dir} is not a model folder")
    if given:
        return [given]
    return sorted(p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
