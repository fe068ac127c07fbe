"""JWT verification against keys made here: a JWKS file, and a JWKS served by a real local HTTP server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from dhow.access.jwt import JwtVerifier, TokenClaims
from dhow.core.errors import InvalidInput, Unauthenticated, Unavailable

ISSUER = "https://issuer.example"
AUDIENCE = "dhow"
T = TypeVar("T")

RsaKey = rsa.RSAPrivateKey
EcKey = ec.EllipticCurvePrivateKey
PrivateKey = RsaKey | EcKey


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@dataclass(frozen=True)
class Keys:
    rsa: RsaKey
    ec: EcKey
    other_rsa: RsaKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec.generate_private_key(ec.SECP256R1()),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def public_jwk(key: PrivateKey, kid: str | None) -> dict[str, Any]:
    jwk: dict[str, Any]
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    return jwk


def jwks(*entries: tuple[PrivateKey, str | None]) -> dict[str, Any]:
    return {"keys": [public_jwk(key, kid) for key, kid in entries]}


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600}
    base.update(changes)
    return {name: value for name, value in base.items() if value is not None}


def sign(key: PrivateKey, kid: str | None = "rsa-1", alg: str = "RS256", **changes: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return pyjwt.encode(claims(**changes), key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A token PyJWT would refuse to make: HS256 keyed with a public key, or alg none."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if secret is None:
        return signing_input + "."
    return signing_input + "." + b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


@pytest.fixture
def jwks_file(tmp_path: Path, keys: Keys) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks((keys.rsa, "rsa-1"), (keys.ec, "ec-1"))))
    return path


def verifier_for(source: str | Path, **options: Any) -> JwtVerifier:
    verifier = JwtVerifier(issuer=ISSUER, audience=AUDIENCE, jwks=str(source), **options)
    run(verifier.load())
    return verifier


@pytest.fixture
def verifier(jwks_file: Path) -> JwtVerifier:
    return verifier_for(jwks_file)


def refused(verifier: JwtVerifier, token: str) -> str:
    """The message of the refusal, checked not to echo the token."""
    with pytest.raises(Unauthenticated) as caught:
        run(verifier.verify(token))
    message = caught.value.message
    if token:
        assert token not in message and token[-20:] not in message
    return message


def test_valid_token_claims_are_mapped(verifier: JwtVerifier, keys: Keys) -> None:
    token = sign(keys.rsa, roles=["invoker", "invoker:fraud-*"], tenant="acme", data_region="eu")
    got = run(verifier.verify(token))
    assert got == TokenClaims("alice", "acme", ("invoker", "invoker:fraud-*"), "eu", float(claims()["exp"]))


@pytest.mark.parametrize(
    ("key_name", "kid", "alg"), [("rsa", "rsa-1", "PS256"), ("rsa", "rsa-1", "RS512"), ("ec", "ec-1", "ES256")]
)
def test_other_asymmetric_algorithms(verifier: JwtVerifier, keys: Keys, key_name: str, kid: str, alg: str) -> None:
    assert run(verifier.verify(sign(getattr(keys, key_name), kid, alg))).subject == "alice"


def test_claims_default_when_absent(verifier: JwtVerifier, keys: Keys) -> None:
    got = run(verifier.verify(sign(keys.rsa)))
    assert (got.tenant, got.roles, got.region) == ("default", (), None)


def test_custom_claim_names(jwks_file: Path, keys: Keys) -> None:
    verifier = verifier_for(jwks_file, roles_claim="groups", tenant_claim="org", region_claim="geo")
    got = run(verifier.verify(sign(keys.rsa, groups=["admin"], org="acme", geo="us", roles=["ignored"])))
    assert (got.roles, got.tenant, got.region) == (("admin",), "acme", "us")


def test_expired_token_refused_and_leeway_honoured(verifier: JwtVerifier, keys: Keys) -> None:
    now = int(time.time())
    assert refused(verifier, sign(keys.rsa, exp=now - 120)) == "the bearer token has expired"
    assert run(verifier.verify(sign(keys.rsa, exp=now - 5))).subject == "alice"  # within the 30 s leeway


def test_not_yet_valid_token_refused(verifier: JwtVerifier, keys: Keys) -> None:
    assert "not valid yet" in refused(verifier, sign(keys.rsa, nbf=int(time.time()) + 300))
    assert "not valid yet" in refused(verifier, sign(keys.rsa, iat=int(time.time()) + 300))


def test_wrong_audience_refused(verifier: JwtVerifier, keys: Keys) -> None:
    assert refused(verifier, sign(keys.rsa, aud="other")) == "the bearer token's audience is not 'dhow'"
    assert run(verifier.verify(sign(keys.rsa, aud=["other", "dhow"]))).subject == "alice"


@pytest.mark.parametrize("issuer", ["https://evil.example", "https://issuer.example.evil", "https://issuer.exampl"])
def test_wrong_issuer_refused(verifier: JwtVerifier, keys: Keys, issuer: str) -> None:
    assert refused(verifier, sign(keys.rsa, iss=issuer)) == f"the bearer token's issuer is not {ISSUER!r}"


def test_signature_of_another_key_with_the_same_kid_refused(verifier: JwtVerifier, keys: Keys) -> None:
    assert refused(verifier, sign(keys.other_rsa, "rsa-1")) == "the bearer token's signature does not verify"


def test_tampered_payload_refused(verifier: JwtVerifier, keys: Keys) -> None:
    header, _, signature = sign(keys.rsa, roles=["invoker"]).split(".")
    payload = b64(json.dumps(claims(roles=["admin"])).encode())
    assert refused(verifier, f"{header}.{payload}.{signature}") == "the bearer token's signature does not verify"


def test_unknown_kid_refused(verifier: JwtVerifier, keys: Keys) -> None:
    message = refused(verifier, sign(keys.rsa, "nope"))
    assert message == "the bearer token names key id 'nope', which the issuer's JWKS does not have"


def test_key_of_another_type_refused(verifier: JwtVerifier, keys: Keys) -> None:
    # an EC signature presented under the RSA key's id
    assert "does not fit" in refused(verifier, sign(keys.ec, "rsa-1", "ES256"))


def test_hs256_signed_with_the_public_key_refused(verifier: JwtVerifier, keys: Keys) -> None:
    pem = keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = forge({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(roles=["admin"]), pem)
    assert "algorithm 'HS256' is refused" in refused(verifier, token)


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_refused(verifier: JwtVerifier, alg: str) -> None:
    token = forge({"alg": alg, "typ": "JWT", "kid": "rsa-1"}, claims(roles=["admin"]), None)
    assert f"algorithm {alg!r} is refused" in refused(verifier, token)


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "eyJhbGciOiJSUzI1NiJ9.!!!.abc", "x" * 300])
def test_malformed_token_refused(verifier: JwtVerifier, token: str) -> None:
    assert refused(verifier, token).startswith("the bearer token is not a well-formed JWT")


@pytest.mark.parametrize("claim", ["sub", "exp", "aud", "iss"])
def test_required_claim_missing_refused(verifier: JwtVerifier, keys: Keys, claim: str) -> None:
    assert (
        refused(verifier, sign(keys.rsa, "rsa-1", "RS256", **{claim: None}))
        == f"the bearer token has no {claim!r} claim"
    )


def test_empty_subject_refused(verifier: JwtVerifier, keys: Keys) -> None:
    assert "'sub' claim" in refused(verifier, sign(keys.rsa, sub=""))


@pytest.mark.parametrize("roles", ["admin", ["admin", 3], {"admin": True}])
def test_bad_roles_claim_refused(verifier: JwtVerifier, keys: Keys, roles: Any) -> None:
    assert refused(verifier, sign(keys.rsa, roles=roles)) == "the bearer token's roles claim must be a list of strings"


def test_bad_tenant_and_region_claims_refused(verifier: JwtVerifier, keys: Keys) -> None:
    assert "tenant claim" in refused(verifier, sign(keys.rsa, tenant=["acme"]))
    assert "data_region claim" in refused(verifier, sign(keys.rsa, data_region=7))


def test_token_without_kid_uses_the_only_key(tmp_path: Path, keys: Keys) -> None:
    single = tmp_path / "single.json"
    single.write_text(json.dumps(jwks((keys.rsa, "rsa-1"))))
    assert run(verifier_for(single).verify(sign(keys.rsa, kid=None))).subject == "alice"


def test_token_without_kid_refused_when_several_keys(verifier: JwtVerifier, keys: Keys) -> None:
    assert "names no key id" in refused(verifier, sign(keys.rsa, kid=None))


def test_cache_returns_verified_claims_until_expiry(jwks_file: Path, keys: Keys) -> None:
    verifier = verifier_for(jwks_file, leeway_s=0.0)
    exp = math.ceil(time.time()) + 1
    token = sign(keys.rsa, exp=exp)

    async def scenario() -> None:
        first = await verifier.verify(token)
        assert await verifier.verify(token) is first  # served from the cache
        await asyncio.sleep(exp - time.time() + 0.05)
        with pytest.raises(Unauthenticated, match="has expired"):
            await verifier.verify(token)
        with pytest.raises(Unauthenticated, match="has expired"):  # and not cached as valid again
            await verifier.verify(token)

    run(scenario())


def test_verify_before_load_is_unavailable(jwks_file: Path, keys: Keys) -> None:
    verifier = JwtVerifier(issuer=ISSUER, audience=AUDIENCE, jwks=str(jwks_file))
    with pytest.raises(Unavailable):
        run(verifier.verify(sign(keys.rsa)))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read"),
        ("{not json", "not valid JSON"),
        ('{"keys": []}', "no usable public signing key"),
        ('[{"kty": "RSA"}]', "'keys' list"),
        ('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]}', "no usable public signing key"),
    ],
)
def test_bad_jwks_file_is_invalid_input(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_text(content)
    verifier = JwtVerifier(issuer=ISSUER, audience=AUDIENCE, jwks=str(path))
    with pytest.raises(InvalidInput) as caught:
        run(verifier.load())
    assert expected in caught.value.message and str(path) in caught.value.message


def test_symmetric_and_private_keys_in_the_jwks_are_ignored(tmp_path: Path, keys: Keys) -> None:
    private = RSAAlgorithm.to_jwk(keys.other_rsa, as_dict=True) | {"kid": "leaked"}
    oct_key = {"kty": "oct", "k": b64(b"secret"), "kid": "hmac"}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [oct_key, private, public_jwk(keys.rsa, "rsa-1")]}))
    verifier = verifier_for(path)
    assert run(verifier.verify(sign(keys.rsa))).subject == "alice"
    assert "does not have" in refused(verifier, sign(keys.other_rsa, "leaked"))
    assert "is refused" in refused(verifier, forge({"alg": "HS256", "kid": "hmac"}, claims(), b"secret"))


@dataclass
class JwksServer:
    url: str
    document: dict[str, Any]
    hits: list[str] = field(default_factory=list)
    status: int = 200


@pytest.fixture
def jwks_server(keys: Keys) -> Iterator[JwksServer]:
    served = JwksServer("", jwks((keys.rsa, "rsa-1")))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.hits.append(self.path)
            body = json.dumps(served.document).encode()
            self.send_response(served.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    served.url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    yield served
    server.shutdown()
    server.server_close()
    thread.join()


def test_jwks_url_rotation_refetches_at_most_once_a_minute(jwks_server: JwksServer, keys: Keys) -> None:
    verifier = verifier_for(jwks_server.url)
    assert len(jwks_server.hits) == 1
    assert run(verifier.verify(sign(keys.rsa))).subject == "alice"

    # the issuer rotates: a new key id appears; five requests carrying it at once cause one fetch
    jwks_server.document = jwks((keys.rsa, "rsa-1"), (keys.ec, "ec-2"))
    token = sign(keys.ec, "ec-2", "ES256")

    async def five() -> list[TokenClaims]:
        return await asyncio.gather(*(verifier.verify(token) for _ in range(5)))

    assert [got.subject for got in run(five())] == ["alice"] * 5
    assert len(jwks_server.hits) == 2

    # another new key id within the minute: no fetch, refused (bad tokens must not make us hammer the issuer)
    jwks_server.document = jwks((keys.rsa, "rsa-1"), (keys.ec, "ec-2"), (keys.other_rsa, "rsa-3"))
    assert "does not have" in refused(verifier, sign(keys.other_rsa, "rsa-3"))
    assert "does not have" in refused(verifier, sign(keys.other_rsa, "rsa-4"))
    assert len(jwks_server.hits) == 2


def test_jwks_url_errors_are_invalid_input(jwks_server: JwksServer) -> None:
    jwks_server.status = 404
    with pytest.raises(InvalidInput, match="cannot read") as caught:
        run(JwtVerifier(issuer=ISSUER, audience=AUDIENCE, jwks=jwks_server.url).load())
    assert jwks_server.url in caught.value.message
    unreachable = "http://127.0.0.1:1/jwks.json"
    with pytest.raises(InvalidInput, match="cannot read") as caught:
        run(JwtVerifier(issuer=ISSUER, audience=AUDIENCE, jwks=unreachable).load())
    assert unreachable in caught.value.message


def test_failed_refetch_keeps_the_old_keys(jwks_server: JwksServer, keys: Keys) -> None:
    verifier = verifier_for(jwks_server.url)
    jwks_server.status = 500
    assert "does not have" in refused(verifier, sign(keys.ec, "ec-2", "ES256"))
    assert len(jwks_server.hits) == 2
    assert run(verifier.verify(sign(keys.rsa))).subject == "alice"


@pytest.mark.parametrize(
    # "exp" far ahead: a value made at collection as now + 600 had expired by the time a long run reached the test
    ("claim", "value"),
    [("exp", str(2**31 - 1)), ("nbf", "0"), ("iat", "0"), ("iat", False)],
)
def test_dates_that_are_not_numbers_refused(verifier: JwtVerifier, keys: Keys, claim: str, value: Any) -> None:
    # PyJWT alone accepts "exp": "1767225600" (it calls int() on it); RFC 7519 NumericDates are JSON numbers
    message = refused(verifier, sign(keys.rsa, **{claim: value}))
    assert message == f"the bearer token's {claim!r} claim must be a number (seconds since 1970)"


def test_a_tenant_claim_of_every_tenant_refused(verifier: JwtVerifier, keys: Keys) -> None:
    message = refused(verifier, sign(keys.rsa, roles=["admin"], tenant="*"))
    assert message.startswith("the bearer token's tenant claim is '*', which JWTs may not carry; name one tenant")
    assert run(verifier.verify(sign(keys.rsa, tenant="acme"))).tenant == "acme"
