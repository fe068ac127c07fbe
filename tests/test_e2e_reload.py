"""SIGHUP against real servers: certificates, keys, the JWKS and live settings are read again, and the server
keeps serving (with one process and with a supervisor's workers)."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import ssl
import time
from pathlib import Path

import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.conftest import DhowProcess, start_dhow
from tests.test_e2e_security_transport import ISSUER, Pki, _admin_key, _dhow, _issue, _request, _wait_tls_ready

SAFETY_S = 60.0


def _wait_for_log(server: DhowProcess, text: str, count: int = 1) -> str:
    """The server's log once ``text`` appears in it ``count`` times (fails if the server exits first)."""
    deadline = time.monotonic() + SAFETY_S
    while time.monotonic() < deadline:
        log = server.log()
        if log.count(text) >= count:
            return log
        assert server.process.poll() is None, f"dhow exited with {server.process.returncode}:\n{log}"
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} did not appear {count} times in the log:\n{server.log()}")


def _served_certificate(port: int, context: ssl.SSLContext, alpn: list[str] | None = None) -> x509.Certificate:
    if alpn:
        context.set_alpn_protocols(alpn)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=SAFETY_S) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _jwks(path: Path, kid: str) -> rsa.RSAPrivateKey:
    """Write a JWKS with one new RSA key under ``kid``; the private key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    path.write_text(json.dumps({"keys": [{**jwk, "kid": kid, "alg": "RS256", "use": "sig"}]}))
    return key


def _token(key: rsa.RSAPrivateKey, kid: str) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "dhow", "sub": "alice", "iat": now, "exp": now + 300, "roles": ["invoker"]}
    return pyjwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def test_sighup_reloads_certificate_keys_and_jwks_while_serving(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    ca = _issue(tmp_path, "ca", "dhow test CA", None)
    first, _ = _issue(tmp_path, "server", "localhost", ca, ExtendedKeyUsageOID.SERVER_AUTH)
    jwks = tmp_path / "jwks.json"
    old_signer = _jwks(jwks, "k1")
    (tmp_path / "models").mkdir()
    server = start_dhow(
        tmp_path / "models", tmp_path, "--auth", "on", "--registry-poll", "3600",
        "--tls-cert", pki.cert("server"), "--tls-key", pki.key("server"),
        "--jwt-issuer", ISSUER, "--jwt-jwks", str(jwks),
        wait=False,
    )  # fmt: skip
    try:
        context = pki.client_context()
        _wait_tls_ready(server, context)
        kept = http.client.HTTPSConnection("127.0.0.1", server.http_port, context=context, timeout=SAFETY_S)
        kept.request("GET", "/v2/health/live")
        assert kept.getresponse().read() == b'{"live":true}'  # the body KServe's clients read
        assert _served_certificate(server.grpc_port, pki.client_context(), ["h2"]) == first

        # replaced on disk: a new certificate and key, a new JWKS, a key made by the CLI (polled hourly)
        second, _ = _issue(tmp_path, "server", "localhost", ca, ExtendedKeyUsageOID.SERVER_AUTH)
        new_signer = _jwks(jwks, "k2")
        token = _dhow("keys", "create", "bot", "--role", "invoker", "--data-dir", str(tmp_path / "data"))
        bot = token.strip().splitlines()[-1].strip()
        assert _request(server.http_url, "GET", "/v2", token=bot, context=context).status == 401
        assert _request(server.http_url, "GET", "/v2", token=_token(new_signer, "k2"), context=context).status == 401
        assert _served_certificate(server.http_port, pki.client_context()) == first

        server.process.send_signal(signal.SIGHUP)
        log = _wait_for_log(server, "SIGHUP: reloaded")
        assert "the TLS certificate" in log and "API keys" in log and "the JWKS (1 keys)" in log

        assert _served_certificate(server.http_port, pki.client_context()) == second
        assert _served_certificate(server.grpc_port, pki.client_context(), ["h2"]) == second
        kept.request("GET", "/v2/health/live")  # a connection opened before keeps working
        assert kept.getresponse().status == 200
        kept.close()
        assert _request(server.http_url, "GET", "/v2", token=bot, context=context).status == 200
        assert _request(server.http_url, "GET", "/v2", token=_token(new_signer, "k2"), context=context).status == 200
        # the key the issuer dropped stops working at once
        assert _request(server.http_url, "GET", "/v2", token=_token(old_signer, "k1"), context=context).status == 401
        assert _request(server.http_url, "GET", "/v2", token=_admin_key(server), context=context).status == 200
    finally:
        assert server.stop() == 0, server.log()


def test_sighup_keeps_the_old_certificate_when_the_new_one_is_broken(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    ca = _issue(tmp_path, "ca", "dhow test CA", None)
    first, _ = _issue(tmp_path, "server", "localhost", ca, ExtendedKeyUsageOID.SERVER_AUTH)
    (tmp_path / "models").mkdir()
    server = start_dhow(
        tmp_path / "models", tmp_path, "--tls-cert", pki.cert("server"), "--tls-key", pki.key("server"), wait=False
    )
    try:
        _wait_tls_ready(server, pki.client_context())
        Path(pki.key("server")).write_text("not a key")
        server.process.send_signal(signal.SIGHUP)
        log = _wait_for_log(server, "SIGHUP: reloaded")
        assert "kept the old values of what could not be read: cannot use the TLS certificate" in log
        assert _served_certificate(server.http_port, pki.client_context()) == first
    finally:
        assert server.stop() == 0, server.log()


def test_sighup_applies_the_log_level_and_names_settings_that_need_a_restart(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    config = tmp_path / "dhow.yaml"
    config.write_text("log_level: info\n")
    server = start_dhow(tmp_path / "models", tmp_path, "--config", str(config), "--header-timeout", "1")
    try:
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=SAFETY_S) as silent:
            assert silent.recv(1) == b""  # closed after the header timeout, logged at debug level only
        config.write_text("log_level: debug\naccess_log: false\nmax_request_bytes: 1000\n")
        server.process.send_signal(signal.SIGHUP)
        log = _wait_for_log(server, "SIGHUP: reloaded")
        assert "came too slowly" not in log
        assert "log_level debug, access_log False" in log
        assert "changed but applied only at a restart: max_request_bytes" in log
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=SAFETY_S) as silent:
            assert silent.recv(1) == b""
        _wait_for_log(server, "came too slowly")
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("workers", [2])
def test_sighup_to_the_supervisor_reaches_every_worker(tmp_path: Path, workers: int) -> None:
    (tmp_path / "models").mkdir()
    server = start_dhow(tmp_path / "models", tmp_path, "--workers", str(workers))
    try:
        _wait_for_log(server, f"all {workers} workers are ready")
        server.process.send_signal(signal.SIGHUP)
        _wait_for_log(server, "SIGHUP: reloaded", count=workers)
        server.wait_ready()
    finally:
        assert server.stop() == 0, server.log()
