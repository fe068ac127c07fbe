"""Security at start and stop: open the access store and the audit stores, build the guard, make the first key.

The composition root (``dhow.server``) calls ``open`` (stores, audit trail, masking key), builds the model
lifecycle with ``digest_check``, then ``guard`` (authenticator, quotas, the first key) for the core service.

Secure by default: with ``--auth on`` (the default) and no key in the store yet, the first start makes an admin
key and prints it once on standard output, never in a log file.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

from dhow.access.authenticator import Authenticator
from dhow.access.jwt import JwtVerifier
from dhow.access.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter
from dhow.access.store import AccessStore
from dhow.core.errors import InvalidInput, ModelLoadError
from dhow.governance.audit import AuditRecord, AuditStore
from dhow.governance.audit_trail import AuditTrail
from dhow.governance.masking import Masker, load_hash_key, parse_masking
from dhow.repository.encryption import trusted_files
from dhow.serving.guard import AccessGuard
from dhow.settings import ServerSettings

__all__ = ["Security", "masking_key"]

log = logging.getLogger("dhow.access")


def masking_key(settings: ServerSettings) -> bytes:
    """The keyed-hash secret of PII masking, created in the data folder at first start."""
    return load_hash_key(Path(settings.masking_key_file or settings.data_dir / "masking.key"))


class Security:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.store: AccessStore | None = None
        self.audit: AuditTrail | None = None
        self.authenticator: Authenticator | None = None
        self.limiter: RateLimiter | None = None
        self._audit_stores: dict[str, AuditStore] = {}
        #: the keyed-hash secret of PII masking, read (or made) by ``open``
        self.masking_key = b""

    async def prepare(self) -> None:
        """The first start's one-time work alone, then close: what a supervisor does before its workers start.

        It makes the masking key, migrates the access and audit stores and makes (and prints) the first admin
        key, so that the workers find it all done: they neither race on it nor each print a key.
        """
        try:
            await self._open(writer="thread")
            if self.settings.auth == "on":
                await self._first_key()
        finally:
            await self.close()

    async def _open(self, writer: Literal["thread", "process"]) -> bytes:
        """Open the stores and start the audit trail; the masking key."""
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        key = self.masking_key = await asyncio.to_thread(masking_key, settings)
        self.store = await asyncio.to_thread(AccessStore.open, settings.registry_url())
        for region, url in settings.audit_urls().items():
            self._audit_stores[region] = await asyncio.to_thread(AuditStore.open, url)
        self.audit = AuditTrail(
            self._audit_stores, settings.region, writer=writer, commit_s=settings.audit_commit_ms / 1000
        )
        await self.audit.start()
        return key

    async def open(self) -> bytes:
        """Open the stores and start the audit trail (written by a writer process, off this process's
        interpreter lock: see docs/security.md); returns the masking key."""
        return await self._open(writer="process")

    async def guard(
        self, tenant_of: Callable[[str], str], registry: CollectorRegistry, *, first_key: bool = True
    ) -> AccessGuard:
        """Start authentication and quotas; make the first admin key if there is none (unless ``first_key`` is
        False: a batch job checks the keys a server made, it makes none)."""
        settings = self.settings
        assert self.store is not None and self.audit is not None
        enabled = settings.auth == "on"
        self.authenticator = Authenticator(self.store, self._jwt(), enabled=enabled, poll_s=settings.registry_poll)
        await self.authenticator.start()
        unwritable = Counter(
            "dhow_audit_unwritable_records",
            "Audit records the store refused while it was up (a value it cannot hold, a trigger), each replaced by "
            "an audit.unwritable record that holds it as text (or its length and SHA-256); the server log says why",
            registry=registry,
        )
        self.audit.on_unwritable = unwritable.inc
        refusing = Gauge(
            "dhow_audit_refusing_all",
            "1 while the audit store of the data region refuses a record and even its smallest audit.unwritable "
            "stand-in (the trail waits, as in an outage, until someone mends the store), else 0; the server log says "
            "why",
            ["region"],  # (the regions given a store: --region and each --audit-region-store)
            registry=registry,
            multiprocess_mode="livemax",  # (several workers: 1 if one of them is stuck; a dead one's value goes)
        )
        # set as it changes, not read at the scrape: with several workers the scrape reads the workers' metric files
        stuck = self.audit.refusing_regions
        for region in self._audit_stores:
            refusing.labels(region).set(float(region in stuck))
        self.audit.on_refusing_all = lambda region, state: refusing.labels(region).set(float(state))
        self.limiter = await RedisRateLimiter.connect(settings.redis) if settings.redis else LocalRateLimiter()
        if enabled and first_key:
            await self._first_key()
        elif not enabled:  # (a job's process makes no first key, with authentication on all the same)
            log.warning(
                "AUTHENTICATION IS OFF (--auth none): anyone who reaches the ports may infer, load models and change "
                "rollouts. Use it for local development only."
            )
        masker = Masker(parse_masking(None, "audit"), self.masking_key)
        failures = (settings.auth_failure_rate, settings.auth_failure_burst)
        return AccessGuard(self.authenticator, self.limiter, self.audit, masker, tenant_of, registry, failures=failures)

    def _jwt(self) -> JwtVerifier | None:
        settings = self.settings
        if not settings.jwt_issuer:
            return None
        if not settings.jwt_jwks:
            raise InvalidInput("--jwt-issuer needs --jwt-jwks (the issuer's JWKS file or URL)")
        return JwtVerifier(
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            jwks=settings.jwt_jwks,
            roles_claim=settings.jwt_roles_claim,
            tenant_claim=settings.jwt_tenant_claim,
        )

    async def _first_key(self) -> None:
        assert self.store is not None and self.audit is not None
        store = self.store
        made = await asyncio.to_thread(
            lambda: store.create_key("admin", tenant="*", roles=["admin"], actor="dhow:first-start", only_if_empty=True)
        )
        if made is None:
            return
        record, token = made
        if self.authenticator is not None:
            await asyncio.to_thread(self.authenticator.reload)
        await self.audit.record_now(
            AuditRecord(
                kind="admin",
                action="key.create",
                actor="dhow:first-start",
                tenant="*",
                details={"key": record.id, "name": "admin", "roles": ["admin"]},
            )
        )
        # stdout, not the log: a log file is kept and shipped; this secret must be seen once
        banner = "=" * 78
        print(
            f"{banner}\ndhow: first start, so an admin API key was made. It is shown this once; keep it safe:\n\n"
            f"    {token}\n\nSend it as 'Authorization: Bearer <key>' (or export DHOW_KEY=<key> for the dhow CLI).\n"
            f"Make narrower keys with 'dhow keys create'.\n{banner}",
            file=sys.stdout,
            flush=True,
        )

    def digest_check(self) -> Callable[[str, int, Path], None]:
        """What ``--require-digests`` checks before a version loads: its files against the trusted digests."""
        store = self.store
        assert store is not None

        def check(name: str, number: int, version_dir: Path) -> None:
            trusted = store.digests(name, str(number))
            if not trusted:
                raise ModelLoadError(
                    f"{name} version {number}: no trusted digests are recorded and --require-digests is set; "
                    f"record them with 'dhow models trust'"
                )
            actual = trusted_files(version_dir)
            for path, digest in sorted(actual.items()):
                if trusted.get(path) != digest:
                    why = "is not among the trusted files" if path not in trusted else "does not match its digest"
                    raise ModelLoadError(f"{name} version {number}: {path} {why} (SHA-256 {digest[:16]}…)")
            missing = sorted(set(trusted) - set(actual))
            if missing:
                raise ModelLoadError(f"{name} version {number}: trusted file {missing[0]} is missing")

        return check

    async def close(self) -> None:
        if self.authenticator is not None:
            await self.authenticator.close()
        if self.limiter is not None:
            await self.limiter.close()
        if self.audit is not None:
            await self.audit.close()
        for store in self._audit_stores.values():
            store.close()
        if self.store is not None:
            self.store.close()
