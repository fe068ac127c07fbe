"""JWT bearer tokens of an OIDC-style issuer, verified against its published keys (JWKS).

Only asymmetric algorithms are accepted: a server that also took HS256 could be fooled by a token "signed" with
the issuer's public key as an HMAC secret (algorithm confusion). Tokens already verified are remembered until
they expire, so a client that sends the same token with every request pays for one signature check.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt as pyjwt
from jwt import PyJWK
from jwt.exceptions import InvalidSubjectError

from dhow.core.errors import InvalidInput, Unauthenticated, Unavailable
from dhow.core.model_config import DEFAULT_TENANT

__all__ = ["ACCEPTED_ALGORITHMS", "JwtVerifier", "TokenClaims"]

log = logging.getLogger("dhow.access")

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
#: what a token's header may name; HS* and "none" are refused on purpose
ACCEPTED_ALGORITHMS = frozenset(_RSA_ALGORITHMS | set(_EC_ALGORITHMS.values()) | {"EdDSA"})

#: an unknown key id makes us fetch the JWKS again at most this often, so bad tokens cannot hammer the issuer
_REFETCH_INTERVAL_S = 60.0
_CACHE_SIZE = 10_000
_MAX_JWKS_BYTES = 1 << 20
_FETCH_TIMEOUT_S = 10.0
_REQUIRED = ["exp", "iss", "aud", "sub"]
_NUMERIC_DATES = ("exp", "nbf", "iat")


@dataclass(frozen=True, slots=True)
class TokenClaims:
    subject: str
    tenant: str
    #: e.g. "invoker" or "invoker:fraud-*" (role:model-pattern)
    roles: tuple[str, ...]
    region: str | None
    #: "exp", as a Unix time
    expires_at: float


class JwtVerifier:
    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks: str,
        roles_claim: str = "roles",
        tenant_claim: str = "tenant",
        region_claim: str = "data_region",
        leeway_s: float = 30.0,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.jwks = jwks
        self.roles_claim = roles_claim
        self.tenant_claim = tenant_claim
        self.region_claim = region_claim
        self.leeway_s = leeway_s
        self._keys: dict[str | None, dict[str, Any]] = {}
        self._prepared: dict[tuple[str | None, str], PyJWK] = {}
        self._cache: dict[str, TokenClaims] = {}
        self._loaded = False
        self._refetched_at = float("-inf")
        self._refetch_lock = asyncio.Lock()

    @property
    def _is_url(self) -> bool:
        return self.jwks.startswith(("http://", "https://"))

    async def load(self) -> int:
        """Read the JWKS (file or URL, in a thread); ``InvalidInput`` names the source if it is unusable.

        Returns how many usable keys it has.
        """
        raw = await asyncio.to_thread(_read_source, self.jwks)
        keys = _parse_jwks(raw, self.jwks)
        # a key the issuer dropped must stop working now, not when the tokens it signed expire
        self._keys, self._prepared, self._cache = keys, {}, {}
        self._loaded = True
        return len(keys)

    async def verify(self, token: str) -> TokenClaims:
        cached = self._cache.get(token)
        if cached is not None:
            if time.time() < cached.expires_at + self.leeway_s:
                return cached
            del self._cache[token]
            raise Unauthenticated("the bearer token has expired")
        if not self._loaded:
            raise Unavailable("the issuer's keys (JWKS) are not loaded yet; retry in a moment")
        alg, kid = _header_of(token)
        key = await self._key_for(kid, alg)
        claims = self._claims_of(self._decode(token, key, alg))
        if len(self._cache) >= _CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        self._cache[token] = claims
        return claims

    async def _key_for(self, kid: str | None, alg: str) -> PyJWK:
        if kid is None:
            if len(self._keys) != 1:
                raise Unauthenticated(
                    f"the bearer token names no key id (kid) and the issuer's JWKS has {len(self._keys)} keys; "
                    "the issuer must put 'kid' in the token's header"
                )
            kid = next(iter(self._keys))
        elif kid not in self._keys and not await self._refetch(kid):
            raise Unauthenticated(f"the bearer token names key id {kid[:64]!r}, which the issuer's JWKS does not have")
        jwk = self._keys[kid]
        prepared = self._prepared.get((kid, alg))
        if prepared is None:
            if not _fits(jwk, alg):
                raise Unauthenticated(f"the bearer token's algorithm {alg} does not fit its key {kid!r} in the JWKS")
            prepared = self._prepared[(kid, alg)] = PyJWK(jwk, alg)
        return prepared

    async def _refetch(self, kid: str) -> bool:
        """Fetch a URL JWKS again (the issuer may have rotated its keys); True if ``kid`` is now known."""
        if not self._is_url:
            return False
        async with self._refetch_lock:
            if kid in self._keys:  # another request fetched it while we waited
                return True
            if time.monotonic() - self._refetched_at < _REFETCH_INTERVAL_S:
                return False
            self._refetched_at = time.monotonic()
            try:
                await self.load()
            except InvalidInput as exc:
                log.warning("refetching the JWKS for key id %r failed; keeping the old keys: %s", kid, exc.message)
            return kid in self._keys

    def _decode(self, token: str, key: PyJWK, alg: str) -> dict[str, Any]:
        try:
            payload: dict[str, Any] = pyjwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": _REQUIRED, "enforce_minimum_key_length": True},
            )
        except pyjwt.PyJWTError as exc:
            raise Unauthenticated(self._reason(exc)) from None
        return payload

    def _reason(self, exc: pyjwt.PyJWTError) -> str:
        """Which check failed, in words for the client (PyJWT's own text is not written for them)."""
        if isinstance(exc, pyjwt.MissingRequiredClaimError):
            return f"the bearer token has no {exc.claim!r} claim"
        reasons: list[tuple[type[pyjwt.PyJWTError], str]] = [
            (pyjwt.ExpiredSignatureError, "the bearer token has expired"),
            (pyjwt.ImmatureSignatureError, "the bearer token is not valid yet (its nbf or iat is in the future)"),
            (pyjwt.InvalidAudienceError, f"the bearer token's audience is not {self.audience!r}"),
            (pyjwt.InvalidIssuerError, f"the bearer token's issuer is not {self.issuer!r}"),
            (pyjwt.InvalidSignatureError, "the bearer token's signature does not verify"),
            (InvalidSubjectError, "the bearer token's 'sub' claim must be a non-empty string"),
            (pyjwt.InvalidIssuedAtError, "the bearer token's 'iat' claim must be a number"),
            (pyjwt.InvalidKeyError, "the issuer's key for the bearer token is too weak to be trusted"),
        ]
        for kind, reason in reasons:
            if isinstance(exc, kind):
                return reason
        return "the bearer token is not a well-formed JWT"

    def _claims_of(self, payload: dict[str, Any]) -> TokenClaims:
        for claim in _NUMERIC_DATES:
            value = payload.get(claim, 0)
            # PyJWT takes "exp": "9999999999" (it calls int()); RFC 7519 says a NumericDate is a JSON number
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise Unauthenticated(f"the bearer token's {claim!r} claim must be a number (seconds since 1970)")
        roles = payload.get(self.roles_claim, [])
        if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
            raise Unauthenticated(f"the bearer token's {self.roles_claim} claim must be a list of strings")
        tenant = payload.get(self.tenant_claim, DEFAULT_TENANT)
        if not isinstance(tenant, str) or not tenant:
            raise Unauthenticated(f"the bearer token's {self.tenant_claim} claim must be a non-empty string")
        if tenant == "*":
            # '*' spans every tenant: only an API key made with --tenant '*' by an admin may; an issuer's token may not
            raise Unauthenticated(
                f"the bearer token's {self.tenant_claim} claim is '*', which JWTs may not carry; name one tenant "
                "(an API key made with 'dhow keys create --tenant *' spans them all)"
            )
        region = payload.get(self.region_claim)
        if region is not None and not isinstance(region, str):
            raise Unauthenticated(f"the bearer token's {self.region_claim} claim must be a string")
        subject = payload["sub"]
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("the bearer token's 'sub' claim must be a non-empty string")
        return TokenClaims(subject, tenant, tuple(roles), region, float(payload["exp"]))


def _header_of(token: str) -> tuple[str, str | None]:
    """The token's algorithm and key id, refused early when the algorithm is not an asymmetric one."""
    try:
        header = pyjwt.get_unverified_header(token)
    except pyjwt.PyJWTError:
        raise Unauthenticated("the bearer token is not a well-formed JWT") from None
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or not (kid is None or isinstance(kid, str)):
        raise Unauthenticated("the bearer token is not a well-formed JWT (its header's alg or kid is not a string)")
    if alg not in ACCEPTED_ALGORITHMS:
        raise Unauthenticated(
            f"the bearer token's algorithm {alg[:16]!r} is refused; this server accepts only asymmetric "
            f"signatures ({', '.join(sorted(ACCEPTED_ALGORITHMS))})"
        )
    return alg, kid


def _fits(jwk: dict[str, Any], alg: str) -> bool:
    if "alg" in jwk:
        return bool(jwk["alg"] == alg)
    kty = jwk.get("kty")
    if kty == "RSA":
        return alg in _RSA_ALGORITHMS
    if kty == "EC":
        return _EC_ALGORITHMS.get(jwk.get("crv", "")) == alg
    return kty == "OKP" and alg == "EdDSA"


def _default_algorithm(jwk: dict[str, Any]) -> str | None:
    if isinstance(jwk.get("alg"), str):
        return str(jwk["alg"])
    kty = jwk.get("kty")
    if kty == "EC":
        return _EC_ALGORITHMS.get(jwk.get("crv", ""))
    return {"RSA": "RS256", "OKP": "EdDSA"}.get(str(kty))


def _read_source(source: str) -> bytes:
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=_FETCH_TIMEOUT_S) as answer:
                raw: bytes = answer.read(_MAX_JWKS_BYTES + 1)
        else:
            raw = Path(source).read_bytes()
    except OSError as exc:  # URLError and HTTPError are OSErrors too
        raise InvalidInput(f"cannot read the issuer's JWKS at {source}: {exc}") from None
    if len(raw) > _MAX_JWKS_BYTES:
        raise InvalidInput(f"the issuer's JWKS at {source} is larger than {_MAX_JWKS_BYTES} bytes")
    return raw


def _parse_jwks(raw: bytes, source: str) -> dict[str | None, dict[str, Any]]:
    """The usable public signing keys by key id; symmetric, encryption and private keys are left out."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(f"the issuer's JWKS at {source} is not valid JSON: {exc}") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise InvalidInput(f"the issuer's JWKS at {source} must be a JSON object with a 'keys' list")
    keys: dict[str | None, dict[str, Any]] = {}
    for jwk in entries:
        if _usable(jwk, source):
            keys[jwk.get("kid")] = jwk
    if not keys:
        raise InvalidInput(
            f"the issuer's JWKS at {source} has no usable public signing key (RSA, EC P-256/384/521 or OKP for EdDSA)"
        )
    return keys


def _usable(jwk: Any, source: str) -> bool:
    if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or not isinstance(jwk.get("kid", ""), str):
        return False
    alg = _default_algorithm(jwk)
    if alg not in ACCEPTED_ALGORITHMS:
        return False  # "oct" (HMAC) keys land here: a shared secret has no place in a public key set
    if "d" in jwk:
        log.warning("the JWKS at %s publishes a private key (kid %r); ignoring it", source, jwk.get("kid"))
        return False
    try:
        PyJWK(jwk, alg)
    except pyjwt.PyJWTError as exc:
        log.warning("the JWKS at %s has a key that does not load (kid %r): %s", source, jwk.get("kid"), exc)
        return False
    return True
