"""Slow and idle clients against a real server: what a connection may hold, and for how long.

Each socket waits at most ``SAFETY_S`` for the server to act: a server that never closes a connection fails
the test by that wait, which is no measure of the server (the limits under test are 1-2 s).
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import DhowProcess, read_until_closed, start_dhow, wait_until

SAFETY_S = 30.0


@pytest.fixture(scope="module", params=["native", "uvicorn"])
def strict_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[DhowProcess]:
    """A server with no models and short limits on slow clients, on each REST front (``--http-front``)."""
    folder = tmp_path_factory.mktemp("connections")
    (folder / "models").mkdir()
    limits = ("--header-timeout", "1", "--body-timeout", "1", "--max-connections", "50")
    server = start_dhow(folder / "models", folder, *limits, "--http-front", request.param)
    yield server
    assert server.stop() == 0, server.log()


def _open(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=SAFETY_S)
    return sock


def _live(server: DhowProcess) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=SAFETY_S)
    try:
        connection.request("GET", "/v2/health/live")
        return connection.getresponse().status
    finally:
        connection.close()


def test_rest_closes_half_open_connections_while_normal_clients_are_served(strict_server: DhowProcess) -> None:
    silent = _open(strict_server.http_port)
    trickling = _open(strict_server.http_port)
    trickling.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: dhow\r\n")  # the headers never end
    stalled = _open(strict_server.http_port)
    stalled.sendall(b'POST /v2/models/m/infer HTTP/1.1\r\nHost: dhow\r\nContent-Length: 100\r\n\r\n{"inputs"')
    # meanwhile a normal client, and one keeping its connection alive for a second request, are answered
    assert _live(strict_server) == 200
    kept = http.client.HTTPConnection("127.0.0.1", strict_server.http_port, timeout=SAFETY_S)
    for _ in range(2):
        kept.request("GET", "/v2/health/ready")
        assert kept.getresponse().read() == b'{"ready":true}'
    kept.close()

    assert read_until_closed(silent) == b""  # it said nothing: there is nobody to answer
    answer = read_until_closed(trickling)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"headers did not arrive in time" in answer
    answer = read_until_closed(stalled)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"body did not arrive in time" in answer
    for sock in (silent, trickling, stalled):
        sock.close()
    assert _live(strict_server) == 200


def test_grpc_closes_connections_that_never_open_http2(strict_server: DhowProcess) -> None:
    silent = _open(strict_server.grpc_port)
    half = _open(strict_server.grpc_port)
    half.sendall(b"PRI * HTTP/2.0\r\n")  # half of the HTTP/2 preface, then nothing
    client = grpcclient.InferenceServerClient(strict_server.grpc_url)
    assert client.is_server_live()
    # grpc says why in the GOAWAY it sends before it closes
    assert b"handshake timeout" in read_until_closed(silent)
    assert b"handshake timeout" in read_until_closed(half)
    assert client.is_server_live()
    client.close()
    silent.close()
    half.close()


@pytest.mark.parametrize("front", ["native", "uvicorn"])
def test_rest_connections_past_the_bound_are_refused_with_503(tmp_path: Path, front: str) -> None:
    (tmp_path / "models").mkdir()
    limits = ("--max-connections", "3", "--header-timeout", "60")
    server = start_dhow(tmp_path / "models", tmp_path, *limits, "--http-front", front)
    try:
        holders = [_open(server.http_port) for _ in range(2)]
        # two silent connections and this request make three: the bound, so it is refused
        assert _live(server) == 503
        for sock in holders:
            sock.close()
        assert _live(server) == 200
        if front == "native":  # uvicorn's refusals are its own, not counted
            assert _refused(server, "rest") == "1.0"
    finally:
        assert server.stop() == 0, server.log()


def _refused(server: DhowProcess, port: str) -> str:
    """The ``dhow_connections_refused_total`` sample of ``port`` in the server's metrics (empty when none)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=SAFETY_S)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    found = [line for line in text.splitlines() if line.startswith(f'dhow_connections_refused_total{{port="{port}"}}')]
    return found[0].rsplit(" ", 1)[1] if found else ""


def _grpc_live(client: grpcclient.InferenceServerClient) -> bool:
    try:
        return bool(client.is_server_live())
    except InferenceServerException:
        return False


def test_grpc_connections_past_the_bound_are_refused(tmp_path: Path) -> None:
    """``--max-connections`` bounds the gRPC port's connections too, counted apart from the REST port's: past it a
    new connection is closed, the client's call fails UNAVAILABLE, and the refusal is counted; a connection that
    closes frees its slot."""
    (tmp_path / "models").mkdir()
    server = start_dhow(tmp_path / "models", tmp_path, "--max-connections", "3", "--header-timeout", "60")
    try:
        holders = [_open(server.grpc_port) for _ in range(3)]
        for sock in holders:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\4\0\0\0\0\0")  # preface, SETTINGS
            assert sock.recv(9)[3] == 4  # the server's SETTINGS: taken
        assert _live(server) == 200  # the REST port's connections are counted apart
        client = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException) as refused:
            client.is_server_live()
        assert "UNAVAILABLE" in str(refused.value.status()), refused.value
        assert float(_refused(server, "grpc")) >= 1
        holders.pop().close()
        wait_until(lambda: _grpc_live(client), SAFETY_S, "the closed connection's slot freed")
        client.close()
        for sock in holders:
            sock.close()
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize(
    ("option", "value"), [("--header-timeout", "0"), ("--body-timeout", "-1"), ("--max-connections", "-2")]
)
def test_limits_must_be_positive(tmp_path: Path, option: str, value: str) -> None:
    (tmp_path / "models").mkdir()
    server = start_dhow(tmp_path / "models", tmp_path, option, value, wait=False)
    assert server.process.wait(60) == 2
    assert option.removeprefix("--").replace("-", "_") in server.log()
