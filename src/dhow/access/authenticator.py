"""Authentication: turn a request's credentials into a ``Principal``, or refuse it with ``Unauthenticated``.

Three kinds of credential, all transport-neutral by the time they get here:
- ``Authorization: Bearer dhow_<id>_<secret>``: an API key, checked against its salted hash in memory;
- ``Authorization: Bearer <JWT>``: a token of the configured issuer, checked against its JWKS;
- a client certificate verified by the TLS layer (mutual TLS): its common name names a registered identity.

The keys live in the access store; this class keeps a copy in memory and reloads it when the store's
generation changes (keys made, rotated or revoked by any server or by ``dhow keys``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from dhow.access.jwt import JwtVerifier
from dhow.access.keys import split_key, verify_secret
from dhow.access.permissions import ALL_TENANTS, Grant, Principal, parse_grant
from dhow.access.store import AccessStore, Limits, PrincipalRecord, TenantRecord
from dhow.core.errors import DhowError, InvalidInput, Unauthenticated

__all__ = ["ANONYMOUS", "Authenticator", "Credentials"]

log = logging.getLogger("dhow.access")

#: who calls when authentication is off (``--auth none``)
ANONYMOUS = Principal("anonymous", ALL_TENANTS, (Grant("admin"),))

#: the most verified API keys remembered by their header (a new one past it empties the memory)
MAX_VERIFIED = 10_000
#: the start of the one spelling of a key's header that is remembered
_CANONICAL = "Bearer "

_HOW = "send 'Authorization: Bearer <API key or JWT>'"
#: what an unknown key id's secret is checked against, so that its refusal takes as long as a known id's
_NO_SALT, _NO_HASH = "-" * 32, "0" * 64


@dataclass(frozen=True, slots=True)
class Credentials:
    #: the Authorization header (REST) or metadata entry (gRPC), as sent
    authorization: str = ""
    #: the common name of a client certificate the TLS layer verified
    client_cn: str = ""
    #: the name a caller gives itself (``x-dhow-actor``), used for the audit trail only under ``--auth none``
    actor: str = ""
    #: the client's network address (no port), for counting and limiting failed authentications per source
    source: str = ""
    #: more than one Authorization header (or metadata entry) came: which one counts would be a guess
    repeated_authorization: bool = False


def _expired(record: PrincipalRecord) -> Unauthenticated:
    """The refusal of an expired key (its remembered header, its secret checked, or a stream's key): a rotated
    key's says to use its successor, a key made with an expiry's that a new one is needed."""
    if record.replaced_by:
        return Unauthenticated(f"the API key {record.id} was rotated and has expired; use the key that replaced it")
    return Unauthenticated(
        f"the API key {record.id} has expired (at {record.expires_at}); "
        "ask an admin for a new one ('dhow keys create' or POST /v2/admin/keys)"
    )


@dataclass(frozen=True, slots=True)
class _Key:
    record: PrincipalRecord
    principal: Principal
    #: Unix time after which the key is refused (inf: never)
    expires: float


class Authenticator:
    def __init__(
        self,
        store: AccessStore | None,
        jwt: JwtVerifier | None = None,
        *,
        enabled: bool = True,
        poll_s: float = 2.0,
    ) -> None:
        self.store = store
        self.jwt = jwt
        self.enabled = enabled
        self.poll_s = poll_s
        self._keys: dict[str, _Key] = {}
        #: API keys verified, by the Authorization header that carried them: the next request with the same header
        #: skips the parsing and the salted hash. Emptied with every reload (a revoked key is gone with the rest),
        #: and when it grows past ``MAX_VERIFIED``; a key's expiry is checked on every request
        self._verified: dict[str, _Key] = {}
        self._certs: dict[str, Principal] = {}
        self._records: dict[str, PrincipalRecord] = {}
        self.tenants: dict[str, TenantRecord] = {}
        #: ``admission_of`` of stored principals, by record id: replaced with every reload, after the records and
        #: tenants it is computed from (see ``admission_of``)
        self._admissions: dict[str, tuple[Principal, tuple[str, tuple[tuple[str, Limits, str], ...]]]] = {}
        self._generation = -1
        #: reloads one at a time (the poller's and a SIGHUP's): else an older read could replace a newer one and
        #: bring back, until the next poll, a key revoked between the two reads
        self._reloading = threading.Lock()
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.jwt is not None:
            await self.jwt.load()
        if self.store is not None:
            await asyncio.to_thread(self.reload)
            self._poller = asyncio.create_task(self._poll())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await asyncio.to_thread(self.reload)
            except DhowError as exc:
                log.warning("cannot reload API keys (keeping the ones loaded): %s", exc.message)

    async def refresh(self) -> list[str]:
        """Read the keys and the JWKS again now (SIGHUP), not at the next poll; says what was read.

        A JWKS that cannot be read raises ``InvalidInput`` and the keys it had stay in use.
        """
        read = []
        if self.store is not None:
            await asyncio.to_thread(self.reload, True)
            read.append(f"{len(self._keys)} API keys")
        if self.jwt is not None:
            read.append(f"the JWKS ({await self.jwt.load()} keys)")
        return read

    def reload(self, force: bool = False) -> None:
        """Read the principals again if the store changed since the last read (blocking: call in a thread)."""
        assert self.store is not None
        with self._reloading:
            self._reload(force)

    def _reload(self, force: bool) -> None:
        assert self.store is not None
        generation = self.store.generation()
        if generation == self._generation and not force:
            return
        keys: dict[str, _Key] = {}
        certs: dict[str, Principal] = {}
        records: dict[str, PrincipalRecord] = {}
        for record in self.store.principals():
            if record.revoked_at is not None:
                continue
            records[record.id] = record
            principal = _principal_of(record)
            if record.kind == "key":
                expires = datetime.fromisoformat(record.expires_at).timestamp() if record.expires_at else float("inf")
                keys[record.id] = _Key(record, principal, expires)
            else:
                certs[record.name] = principal
        self.tenants = self.store.tenants()
        self._keys, self._certs, self._records, self._generation = keys, certs, records, generation
        self._verified = {}  # after the keys: see ``known``
        self._admissions = {}  # after the records and tenants: see ``admission_of``

    async def authenticate(self, credentials: Credentials) -> Principal:
        principal = self.known(credentials)
        if principal is not None:
            return principal
        return await self._jwt(_bearer(credentials.authorization))

    def known(self, credentials: Credentials) -> Principal | None:
        """The principal when no look-up must be waited for (authentication off, an API key, a certificate);
        None for a JWT, which ``authenticate`` verifies. Refusals raise ``Unauthenticated`` as there."""
        if not self.enabled:
            return ANONYMOUS
        # this memory, then the keys: a reload (in a thread) replaces the keys first, so that a key verified against
        # the keys it replaced goes into the memory it replaces too, never into the new one (a revoked key stays out)
        memory = self._verified
        # a dict's look-up compares the header only with one whose (per-process keyed) hash is the same: its time
        # tells a guesser nothing about a secret
        verified = memory.get(credentials.authorization)
        if verified is not None and not credentials.repeated_authorization:
            if time.time() >= verified.expires:
                raise _expired(verified.record)
            return verified.principal
        if credentials.repeated_authorization:
            # a proxy and the client may each add one; taking either would let one override the other unseen
            raise Unauthenticated(f"the request carries more than one Authorization header; send exactly one: {_HOW}")
        if credentials.authorization:
            token = _bearer(credentials.authorization)
            parts = split_key(token)
            if parts is not None:
                key = self._api_key(*parts)
                # only the header as dhow's clients write it: other spellings of one key ("bearer", more spaces,
                # a longer header) would each hold an entry, and their size, until the next reload
                if credentials.authorization == _CANONICAL + token:
                    if len(memory) >= MAX_VERIFIED:
                        memory.clear()
                    memory[credentials.authorization] = key
                return key.principal
            if self.jwt is None:
                raise Unauthenticated("the bearer token is not a dhow API key, and this server accepts no JWTs")
            return None
        if credentials.client_cn:
            principal = self._certs.get(credentials.client_cn)
            if principal is None:
                raise Unauthenticated(
                    f"the client certificate CN={credentials.client_cn!r} is not registered "
                    f"('dhow keys add-cert {credentials.client_cn} --role ...')"
                )
            return principal
        raise Unauthenticated(f"this server needs credentials: {_HOW}, or a client certificate")

    def _api_key(self, key_id: str, secret: str) -> _Key:
        key = self._keys.get(key_id)
        if key is None:  # the same work as for a known id: the refusal's time does not tell which ids exist
            verify_secret(_NO_SALT, _NO_HASH, secret)
        if key is None or not verify_secret(key.record.salt or "", key.record.secret_hash or "", secret):
            # one message for unknown, revoked and wrong: do not tell a guesser which ids exist
            raise Unauthenticated("the API key is not valid (unknown, revoked or mistyped)")
        if time.time() >= key.expires:
            raise _expired(key.record)
        return key

    async def _jwt(self, token: str) -> Principal:
        assert self.jwt is not None
        claims = await self.jwt.verify(token)
        try:
            grants = tuple(parse_grant(role) for role in claims.roles)
        except InvalidInput as exc:
            raise Unauthenticated(f"the bearer token's roles claim is not usable: {exc.message}") from None
        return Principal(f"jwt:{claims.subject}", claims.tenant, grants, region=claims.region or "")

    def current(self, principal: Principal) -> Principal:
        """A principal authenticated earlier (a gRPC stream's, once for the stream) as the keys read last have it:
        each of the stream's requests runs with its identity's roles, tenant and region of now, and is refused once
        its key or certificate identity is revoked or its key has expired. A principal that is not stored (an
        in-process service identity, a JWT's, anonymous) is itself."""
        record_id = principal.record_id
        if not record_id or not self.enabled:
            return principal
        key = self._keys.get(record_id)
        if key is not None:
            if time.time() >= key.expires:
                raise _expired(key.record)
            return key.principal
        record = self._records.get(record_id)
        current = self._certs.get(record.name) if record is not None and record.kind != "key" else None
        if current is None:
            raise Unauthenticated(
                f"the credentials of {principal.name!r} were revoked since this stream was opened; open a new "
                "stream with valid credentials"
            )
        return current

    def admission_of(self, principal: Principal) -> tuple[str, tuple[tuple[str, Limits, str], ...]]:
        """``region_of`` and ``limits_of`` the principal, remembered for a stored principal (a key, a certificate)
        until the next reload: every request asks, and the answer changes only with the store.

        The memory is read before the records and tenants, and a reload replaces it after them: an answer computed
        from records older than the memory's never goes into it (at worst into the memory being replaced). An
        answer is the principal's own (its region and tenant are in it): it serves only that very principal, not
        one of the same id made before a reload (a gRPC stream's, authenticated once) or after it (a certificate
        identity re-created under the same CN with another tenant or region)."""
        record_id = principal.record_id
        if not record_id:  # a JWT's principal is made per token: nothing to remember it by
            return self.region_of(principal), self.limits_of(principal)
        memory = self._admissions
        known = memory.get(record_id)
        if known is not None and known[0] is principal:
            return known[1]
        answer = (self.region_of(principal), self.limits_of(principal))
        memory[record_id] = (principal, answer)
        return answer

    def limits_of(self, principal: Principal) -> tuple[tuple[str, Limits, str], ...]:
        """The quotas a request of this principal counts against: its key's, then its tenant's."""
        quotas: list[tuple[str, Limits, str]] = []
        record = self._records.get(principal.record_id) if principal.record_id else None
        if record is not None and not record.limits.unlimited:
            what = f"key '{record.name}'" if record.kind == "key" else f"certificate identity '{record.name}'"
            quotas.append((f"principal:{record.id}", record.limits, what))
        tenant = self.tenants.get(principal.tenant)
        if tenant is not None and not tenant.limits.unlimited:
            quotas.append((f"tenant:{tenant.name}", tenant.limits, f"tenant '{tenant.name}'"))
        return tuple(quotas)

    def region_of(self, principal: Principal) -> str:
        """The data region a principal's requests carry when they name none (key, then tenant)."""
        if principal.region:
            return principal.region
        tenant = self.tenants.get(principal.tenant)
        return tenant.region if tenant is not None else ""


def _bearer(authorization: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; ``Unauthenticated`` for any other form."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated(f"the Authorization header must be 'Bearer <API key or JWT>'; {_HOW}")
    return token


def _principal_of(record: PrincipalRecord) -> Principal:
    grants = tuple(parse_grant(role) for role in record.roles)
    if record.kind == "key":
        # the id too: a rotated key keeps its name
        return Principal(f"key:{record.name}#{record.id}", record.tenant, grants, record.region, record_id=record.id)
    return Principal(f"cert:{record.name}", record.tenant, grants, record.region, record_id=record.id)
