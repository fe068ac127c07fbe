"""Transport-level security against real servers: TLS on both ports, mutual TLS identities, JWT bearer tokens,
quotas shared through Redis by two servers, and trusted artifact digests (--require-digests).

Every certificate and key is made here, with a throw-away CA; nothing is downloaded.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt as pyjwt
import numpy as np
import pytest
import redis
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tritonclient.utils import InferenceServerException

from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.protocols.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import IN_CI, DhowProcess, free_port, start_dhow

KEEP = ("tabular", "text_python", "mlp")
ISSUER = "https://issuer.test"
TABULAR_BODY = json.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": [0.25] * 32}]}
).encode()
TEXT_BODY = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["hi"]}]}).encode()
REDIS_URL = "redis://127.0.0.1:6379/0"


# -- certificates ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files in one folder: ``<name>.pem`` (certificate) and ``<name>.key`` (its private key)."""

    folder: Path

    def cert(self, name: str) -> str:
        return str(self.folder / f"{name}.pem")

    def key(self, name: str) -> str:
        return str(self.folder / f"{name}.key")

    def client_context(self, name: str | None = None, *, max_tls12: bool = False) -> ssl.SSLContext:
        """A client context trusting our CA, presenting certificate ``name`` when given."""
        context = ssl.create_default_context(cafile=self.cert("ca"))
        if name is not None:
            context.load_cert_chain(self.cert(name), self.key(name))
        if max_tls12:
            # TLS 1.2 checks the client certificate inside the handshake (1.3 reports it at the first read)
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        return context


def _issue(
    folder: Path,
    name: str,
    common_name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate signed by ``issuer`` (a CA when None: self-signed), written as ``name``.pem/.key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    certificate = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (folder / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certificate, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = _issue(folder, "ca", "dhow test CA", None)
    other_ca = _issue(folder, "other-ca", "another CA", None)
    _issue(folder, "server", "localhost", ca, ExtendedKeyUsageOID.SERVER_AUTH)
    client = ExtendedKeyUsageOID.CLIENT_AUTH
    _issue(folder, "svc-a", "svc-a", ca, client)
    _issue(folder, "svc-x", "svc-x", ca, client)
    # the registered name, but from a CA the server does not trust
    _issue(folder, "rogue", "svc-a", other_ca, client)
    return Pki(folder)


# -- JWT issuer ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    jwks: Path
    key: rsa.RSAPrivateKey
    #: a key the JWKS does not publish, used under the same key id
    impostor: rsa.RSAPrivateKey

    def token(self, *, key: rsa.RSAPrivateKey | None = None, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": "dhow", "sub": "alice", "iat": now, "exp": now + 300, **claims}
        return pyjwt.encode(payload, key or self.key, algorithm="RS256", headers={"kid": "k1"})


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = tmp_path_factory.mktemp("issuer") / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    return Issuer(jwks, key, impostor)


# -- helpers ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any

    @property
    def error(self) -> str:
        return str(self.body.get("error", "")) if isinstance(self.body, dict) else ""


def _request(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    token: str = "",
    context: ssl.SSLContext | None = None,
) -> Answer:
    """One REST request over a new connection: HTTPS with ``context``, plain HTTP without."""
    host, port = url.rsplit(":", 1)
    connection = (
        http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
        if context is not None
        else http.client.HTTPConnection(host, int(port), timeout=10)
    )
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request(method, path, body=body, headers=headers)
        answer = connection.getresponse()
        raw = answer.read()
        return Answer(answer.status, json.loads(raw) if raw else {})
    finally:
        connection.close()


def _infer(url: str, model: str, *, token: str = "", context: ssl.SSLContext | None = None) -> Answer:
    body = TABULAR_BODY if model.startswith("tabular") else TEXT_BODY
    return _request(url, "POST", f"/v2/models/{model}/infer", body, token=token, context=context)


def _grpc_tabular_input() -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("input", [1, 32], "FP32")
    tensor.set_data_from_numpy(np.full((1, 32), 0.25, np.float32))
    return [tensor]


def _dhow(*args: str) -> str:
    """Run a ``dhow`` command; its standard output (it must succeed)."""
    done = subprocess.run([sys.executable, "-m", "dhow.cli", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _wait_tls_ready(server: DhowProcess, context: ssl.SSLContext, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"dhow exited with {server.process.returncode}:\n{server.log()}")
        try:
            if _request(server.http_url, "GET", "/v2/health/ready", context=context).status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"dhow did not become ready over TLS in {timeout} s:\n{server.log()}")


def _admin_key(server: DhowProcess) -> str:
    """The admin key the server printed at its first start."""
    found = re.search(r"dhow_[0-9a-f]{12}_[A-Za-z0-9_-]+", server.log())
    assert found, server.log()
    return found.group(0)


def _copy_models(source: Path, target: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        shutil.copytree(source / name, target / name)
    return target


def _grpc_error(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def _redis_or_skip() -> None:
    try:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1) as client:
            client.ping()
    except (redis.RedisError, OSError) as exc:
        if IN_CI:
            pytest.fail(f"Redis at {REDIS_URL} is unreachable and CI=true: {exc}")
        pytest.skip(f"Redis at {REDIS_URL} is unreachable: {exc}")


# -- servers ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecureServer:
    process: DhowProcess
    #: trusts the test CA (and presents no certificate)
    context: ssl.SSLContext
    #: the admin key printed at first start ("" when keys existed before the start)
    admin: str = ""
    repository: Path | None = None


@pytest.fixture(scope="module")
def small_repository(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tabular and text_python only (read-only), so that servers start fast."""
    return _copy_models(demo_repository, tmp_path_factory.mktemp("small") / "models", ("tabular", "text_python"))


@pytest.fixture(scope="module")
def tls_server(
    demo_repository: Path, tmp_path_factory: pytest.TempPathFactory, pki: Pki, issuer: Issuer
) -> Iterator[SecureServer]:
    """TLS on both ports, JWTs of ISSUER, and --require-digests (explicit model control) over tabular, text_python
    and swapped (trusted), mlp (never trusted) and tampered (a copy of tabular trusted, then changed)."""
    folder = tmp_path_factory.mktemp("tls")
    repository = _copy_models(demo_repository, folder / "models", KEEP)
    shutil.copytree(demo_repository / "tabular", repository / "tampered")
    shutil.copytree(demo_repository / "text_python", repository / "swapped")
    for model in ("tabular", "text_python", "tampered", "swapped"):
        _dhow("models", "trust", str(repository), model, "--data-dir", str(folder / "data"))
    with (repository / "tampered" / "2" / "model.onnx").open("ab") as artifact:
        artifact.write(b"\0")
    server = start_dhow(
        repository, folder, "--auth", "on", "--require-digests", "--model-control", "explicit", "--load-model", "*",
        "--tls-cert", pki.cert("server"), "--tls-key", pki.key("server"),
        "--jwt-issuer", ISSUER, "--jwt-jwks", str(issuer.jwks), "--jwt-audience", "dhow",
        # untrusted and tampered models fail to load on purpose: ready means "the start-up loads were tried"
        "--strict-readiness", "false",
        wait=False,
    )  # fmt: skip
    try:
        _wait_tls_ready(server, pki.client_context())
    except BaseException:
        server.stop()
        raise
    yield SecureServer(server, pki.client_context(), _admin_key(server), repository)
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def mtls_server(small_repository: Path, tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[SecureServer]:
    """Mutual TLS (client certificates required); CN svc-a is registered as an invoker."""
    folder = tmp_path_factory.mktemp("mtls")
    _dhow("keys", "add-cert", "svc-a", "--role", "invoker", "--data-dir", str(folder / "data"))
    server = start_dhow(
        small_repository, folder, "--auth", "on",
        "--tls-cert", pki.cert("server"), "--tls-key", pki.key("server"), "--tls-client-ca", pki.cert("ca"),
        wait=False,
    )  # fmt: skip
    try:
        _wait_tls_ready(server, pki.client_context("svc-a"))
    except BaseException:
        server.stop()
        raise
    yield SecureServer(server, pki.client_context("svc-a"))
    assert server.stop() == 0, server.log()


# -- 1. TLS -------------------------------------------------------------------------------------------


def test_tls_serves_rest_and_grpc_and_refuses_plaintext(tls_server: SecureServer, pki: Pki) -> None:
    server, admin = tls_server.process, tls_server.admin
    answer = _infer(server.http_url, "tabular", token=admin, context=tls_server.context)
    assert answer.status == 200, answer.body
    assert {output["name"] for output in answer.body["outputs"]} == {"label", "probabilities"}
    refused = _infer(server.http_url, "tabular", context=tls_server.context)
    assert refused.status == 401 and "Bearer" in refused.error

    # a standard v2 client over HTTPS, verifying the server against the test CA
    rest = httpclient.InferenceServerClient(server.http_url, ssl=True, ssl_options={"ca_certs": pki.cert("ca")})
    grpc = grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=pki.cert("ca"))
    plain_grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        tensor = httpclient.InferInput("input", [1, 32], "FP32")
        tensor.set_data_from_numpy(np.full((1, 32), 0.25, np.float32))
        result = rest.infer("tabular", [tensor], headers={"authorization": f"Bearer {admin}"})
        assert result.as_numpy("probabilities").shape == (1, 2)
        reply = grpc.infer("tabular", _grpc_tabular_input(), headers={"authorization": f"Bearer {admin}"})
        assert reply.as_numpy("probabilities").shape == (1, 2)
        assert _grpc_error(lambda: grpc.infer("tabular", _grpc_tabular_input())).status() == (
            "StatusCode.UNAUTHENTICATED"
        )
        assert _grpc_error(lambda: plain_grpc.is_server_live()).status() == "StatusCode.UNAVAILABLE"
    finally:
        rest.close()
        grpc.close()
        plain_grpc.close()

    # plain HTTP to the TLS port is served nothing: a 400 says to use HTTPS (as nginx does), then it closes
    for path, body in (("/v2/health/live", None), ("/v2/models/tabular/infer", TABULAR_BODY)):
        answer = _request(server.http_url, "POST" if body else "GET", path, body, token=admin)
        assert answer.status == 400, answer.body
        assert answer.error.startswith(
            "this port speaks HTTPS only: the request was sent as plain HTTP; use https:// for this address"
        )
    # bytes that are neither TLS nor HTTP get no answer
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as sock:
        sock.sendall(b"\x00\x01garbage\r\n\r\n")
        assert sock.recv(4096) == b""


def test_require_tls_without_certificate_never_opens_a_port(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    ports = (free_port(), free_port())
    args = [
        sys.executable, "-m", "dhow.cli", "serve", "--repository", str(tmp_path / "models"),
        "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--data-dir", str(tmp_path / "data"),
        "--require-tls",
    ]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    opened: list[int] = []
    deadline = time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline:
        for port in ports:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    opened.append(port)
        time.sleep(0.01)
    if process.poll() is None:
        process.kill()
    stdout, stderr = process.communicate(timeout=10)
    assert process.returncode not in (0, None), stdout + stderr
    assert "--require-tls" in stderr and "--tls-cert" in stderr, stderr
    assert not opened, f"ports {opened} were opened before the refusal"


def test_the_stores_and_the_masking_key_are_private_to_the_server_user(tls_server: SecureServer) -> None:
    data = tls_server.process.log_path.parent / "data"
    files = [data / "registry.sqlite3", data / "audit.sqlite3", data / "masking.key"]
    files += [path for path in data.glob("*.sqlite3-*") if path.is_file()]  # SQLite's -wal and -shm
    modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in files}
    assert modes == dict.fromkeys(modes, "0o600"), modes


def test_two_authorization_headers_are_refused(tls_server: SecureServer, pki: Pki) -> None:
    server, admin = tls_server.process, tls_server.admin
    host, port = server.http_url.rsplit(":", 1)
    # one valid and one bogus key: which one counted would depend on the server's parser, so neither does
    for first, second in ((admin, "dhow_000000000000_bogus"), ("dhow_000000000000_bogus", admin), (admin, admin)):
        connection = http.client.HTTPSConnection(host, int(port), context=tls_server.context, timeout=10)
        try:
            connection.putrequest("POST", "/v2/models/tabular/infer")
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(len(TABULAR_BODY)))
            connection.putheader("Authorization", f"Bearer {first}")
            connection.putheader("Authorization", f"Bearer {second}")
            connection.endheaders(TABULAR_BODY)
            answer = connection.getresponse()
            body = json.loads(answer.read())
        finally:
            connection.close()
        assert answer.status == 401, body
        assert body["error"].startswith("the request carries more than one Authorization header; send exactly one")
    credentials = grpc.ssl_channel_credentials(Path(pki.cert("ca")).read_bytes())
    with grpc.secure_channel(server.grpc_url, credentials) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelMetadataRequest(name="tabular")
        assert stub.ModelMetadata(request, metadata=[("authorization", f"Bearer {admin}")]).name == "tabular"
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelMetadata(request, metadata=[("authorization", f"Bearer {admin}")] * 2)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "more than one Authorization header" in str(caught.value.details())


# -- 2. mutual TLS ------------------------------------------------------------------------------------


def test_mtls_registered_certificate_is_an_identity(mtls_server: SecureServer, pki: Pki) -> None:
    server = mtls_server.process
    answer = _infer(server.http_url, "tabular", context=pki.client_context("svc-a"))
    assert answer.status == 200, answer.body
    grpc = grpcclient.InferenceServerClient(
        server.grpc_url,
        ssl=True,
        root_certificates=pki.cert("ca"),
        private_key=pki.key("svc-a"),
        certificate_chain=pki.cert("svc-a"),
    )
    try:
        assert grpc.infer("tabular", _grpc_tabular_input()).as_numpy("label").shape == (1,)
        # an invoker may not load or unload: refused for its role, whatever the model control mode says
        for action in ("load", "unload"):
            path = f"/v2/repository/models/tabular/{action}"
            refused = _request(server.http_url, "POST", path, b"{}", context=pki.client_context("svc-a"))
            assert refused.status == 403 and "cert:svc-a lacks permission" in refused.error, refused.body
        assert _grpc_error(lambda: grpc.unload_model("tabular")).status() == "StatusCode.PERMISSION_DENIED"
        assert _grpc_error(lambda: grpc.load_model("tabular")).status() == "StatusCode.PERMISSION_DENIED"
        assert grpc.is_model_ready("tabular")
    finally:
        grpc.close()


def test_mtls_refuses_unregistered_and_untrusted_certificates(mtls_server: SecureServer, pki: Pki) -> None:
    server = mtls_server.process
    unregistered = _infer(server.http_url, "tabular", context=pki.client_context("svc-x"))
    assert unregistered.status == 401 and "CN='svc-x' is not registered" in unregistered.error, unregistered.body
    grpc = grpcclient.InferenceServerClient(
        server.grpc_url,
        ssl=True,
        root_certificates=pki.cert("ca"),
        private_key=pki.key("svc-x"),
        certificate_chain=pki.cert("svc-x"),
    )
    rogue_grpc = grpcclient.InferenceServerClient(
        server.grpc_url,
        ssl=True,
        root_certificates=pki.cert("ca"),
        private_key=pki.key("rogue"),
        certificate_chain=pki.cert("rogue"),
    )
    try:
        error = _grpc_error(lambda: grpc.infer("tabular", _grpc_tabular_input()))
        assert error.status() == "StatusCode.UNAUTHENTICATED" and "svc-x" in str(error.message())
        assert _grpc_error(lambda: rogue_grpc.is_server_live()).status() == "StatusCode.UNAVAILABLE"
    finally:
        grpc.close()
        rogue_grpc.close()
    # the rogue certificate names a registered CN, but its CA is not the client CA: no handshake, no request
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as sock:
        pki.client_context("svc-a", max_tls12=True).wrap_socket(sock, server_hostname="127.0.0.1").close()
    for name in ("rogue", None):
        with (
            socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as sock,
            pytest.raises(ssl.SSLError),
        ):
            pki.client_context(name, max_tls12=True).wrap_socket(sock, server_hostname="127.0.0.1")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _infer(server.http_url, "tabular", context=pki.client_context("rogue"))


# -- 3. JWT -------------------------------------------------------------------------------------------


def test_jwt_roles_scope_the_models(tls_server: SecureServer, issuer: Issuer, pki: Pki) -> None:
    url, context = tls_server.process.http_url, tls_server.context
    token = issuer.token(roles=["invoker:tab*"])
    assert _infer(url, "tabular", token=token, context=context).status == 200
    refused = _infer(url, "text_python", token=token, context=context)
    assert refused.status == 403 and "jwt:alice lacks permission" in refused.error, refused.body
    grpc = grpcclient.InferenceServerClient(tls_server.process.grpc_url, ssl=True, root_certificates=pki.cert("ca"))
    try:
        reply = grpc.infer("tabular", _grpc_tabular_input(), headers={"authorization": f"Bearer {token}"})
        assert reply.as_numpy("label").shape == (1,)
    finally:
        grpc.close()


def test_jwt_bad_tokens_are_refused_with_the_reason(tls_server: SecureServer, issuer: Issuer, pki: Pki) -> None:
    url, context = tls_server.process.http_url, tls_server.context
    now = int(time.time())
    bad = {
        "has expired": issuer.token(roles=["invoker"], iat=now - 600, exp=now - 120),
        "audience is not 'dhow'": issuer.token(roles=["invoker"], aud="someone-else"),
        f"issuer is not '{ISSUER}'": issuer.token(roles=["invoker"], iss="https://evil.test"),
        "signature does not verify": issuer.token(roles=["invoker"], key=issuer.impostor),
    }
    grpc = grpcclient.InferenceServerClient(tls_server.process.grpc_url, ssl=True, root_certificates=pki.cert("ca"))
    messages = set()
    try:
        for reason, token in bad.items():
            answer = _infer(url, "tabular", token=token, context=context)
            assert answer.status == 401 and reason in answer.error, (reason, answer.body)
            messages.add(answer.error)
            headers = {"authorization": f"Bearer {token}"}
            error = _grpc_error(lambda h=headers: grpc.infer("tabular", _grpc_tabular_input(), headers=h))
            assert error.status() == "StatusCode.UNAUTHENTICATED" and reason in str(error.message()), reason
    finally:
        grpc.close()
    assert len(messages) == len(bad), messages


# -- 4. quotas shared through Redis -------------------------------------------------------------------


def _rate_limited_key(tmp_path: Path, name: str, *, rate: int, burst: int) -> tuple[str, str]:
    """A registry in ``tmp_path`` holding an invoker key with this quota: (the registry's URL, the key)."""
    registry = f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    made = _dhow("keys", "create", name, "--role", "invoker", "--rate", str(rate), "--burst", str(burst),
                 "--registry", registry, "--data-dir", str(tmp_path / "cli"))  # fmt: skip
    return registry, made.strip().splitlines()[-1]


def test_rate_limit_is_shared_by_two_servers_through_redis(small_repository: Path, tmp_path: Path) -> None:
    _redis_or_skip()
    registry, token = _rate_limited_key(tmp_path, "shared-bot", rate=5, burst=5)
    servers: list[DhowProcess] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            shared = ("--auth", "on", "--registry", registry, "--redis", REDIS_URL)
            servers.append(start_dhow(small_repository, tmp_path / name, *shared, wait=False))
        for server in servers:
            server.wait_ready()
        connections = [http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10) for server in servers]
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        answers: list[tuple[int, int, dict[str, str], bytes]] = []
        started = time.monotonic()
        for number in range(40):
            connection = connections[number % 2]
            connection.request("POST", "/v2/models/tabular/infer", body=TABULAR_BODY, headers=headers)
            response = connection.getresponse()
            answers.append((number % 2, response.status, dict(response.getheaders()), response.read()))
            time.sleep(0.025)  # ~1 s in all, so that the shared bucket refills a few times
        elapsed = time.monotonic() - started
        for connection in connections:
            connection.close()
    finally:
        for server in servers:
            assert server.stop() == 0, server.log()
    admitted = sum(status == 200 for _, status, _, _ in answers)
    assert 5 <= admitted <= 5 + 5 * elapsed + 1, (admitted, elapsed, answers[:3])
    refusals = [(side, head, json.loads(body)) for side, status, head, body in answers if status != 200]
    assert len(refusals) == 40 - admitted
    for _, head, body in refusals:
        retry_after = {key.lower(): value for key, value in head.items()}.get("retry-after", "")
        assert retry_after.isdigit() and int(retry_after) >= 1, head
        assert "rate limit" in body["error"] and "shared-bot" in body["error"], body
    assert all(status in (200, 429) for _, status, _, _ in answers), answers
    assert {side for side, _, _ in refusals} == {0, 1}, "both servers must draw on the one shared bucket"


def test_a_redis_rate_limit_holds_on_grpc_calls(small_repository: Path, tmp_path: Path) -> None:
    # gRPC's unary calls run without an asyncio Task (CallRunner): redis' client times its commands with
    # asyncio.timeout, which needs a current task; without one every call under the limit failed INTERNAL
    _redis_or_skip()
    registry, token = _rate_limited_key(tmp_path, "grpc-bot", rate=2, burst=3)
    (tmp_path / "s").mkdir()
    server = start_dhow(small_repository, tmp_path / "s", "--auth", "on", "--registry", registry, "--redis", REDIS_URL)
    outcomes: list[str] = []
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            for _ in range(12):
                try:
                    client.infer("tabular", _grpc_tabular_input(), headers={"authorization": f"Bearer {token}"})
                    outcomes.append("ok")
                except InferenceServerException as error:
                    outcomes.append(f"{error.status()} {error.message()}")
        finally:
            client.close()
    finally:
        assert server.stop() == 0, server.log()
    refused = [o for o in outcomes if o != "ok"]
    assert outcomes.count("ok") >= 3 and refused, outcomes
    assert all(o.startswith("StatusCode.RESOURCE_EXHAUSTED") and "rate limit" in o for o in refused), outcomes


# -- 5. trusted digests -------------------------------------------------------------------------------


def test_require_digests_serves_only_trusted_artifacts(tls_server: SecureServer) -> None:
    url, context, admin = tls_server.process.http_url, tls_server.context, tls_server.admin
    index = _request(url, "POST", "/v2/repository/index", b"{}", token=admin, context=context)
    assert index.status == 200, index.body
    rows = {row["name"]: row for row in index.body}
    assert rows["tabular"]["state"] == "READY" and rows["text_python"]["state"] == "READY"
    assert rows["mlp"]["state"] == "UNAVAILABLE"
    assert "no trusted digests are recorded" in rows["mlp"]["reason"], rows["mlp"]
    assert rows["tampered"]["state"] == "UNAVAILABLE"
    assert "model.onnx does not match its digest" in rows["tampered"]["reason"], rows["tampered"]
    assert _infer(url, "tabular", token=admin, context=context).status == 200
    refused = _infer(url, "tampered", token=admin, context=context)
    assert refused.status == 503 and "model.onnx" in refused.error, refused.body


def test_require_digests_refuses_an_artifact_changed_after_loading(tls_server: SecureServer) -> None:
    url, context, admin = tls_server.process.http_url, tls_server.context, tls_server.admin
    assert tls_server.repository is not None
    assert _infer(url, "swapped", token=admin, context=context).status == 200
    with (tls_server.repository / "swapped" / "1" / "model.py").open("a") as artifact:
        artifact.write("\nraise SystemExit('this code must never run')\n")
    # the reload is refused (the operator must know the new files are not served), naming the file
    reload = _request(url, "POST", "/v2/repository/models/swapped/load", b"{}", token=admin, context=context)
    assert reload.status == 503 and "model.py does not match its digest" in reload.body["error"], reload.body
    index = _request(url, "POST", "/v2/repository/index", b"{}", token=admin, context=context)
    rows = [row for row in index.body if row["name"] == "swapped"]
    refused = [row for row in rows if row["state"] == "UNAVAILABLE"]
    assert refused and "model.py does not match its digest" in refused[0]["reason"], rows
    # the version loaded before the change, checked then, keeps serving
    answer = _infer(url, "swapped", token=admin, context=context)
    assert answer.status == 200, answer.body
    assert {output["name"]: output["data"] for output in answer.body["outputs"]}["length"] == [2]
