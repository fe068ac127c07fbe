"""HTTP/1.1 on the REST port, on both fronts (``--http-front native|uvicorn``): raw sockets against a real server.

Each front serves a small ASGI app on a free port from a thread of its own, with the limits the server gives it
(the slow clients that it closes are tested against the whole server: test_e2e_connections.py). The app's
routes make the cases: ``/echo`` answers the body it read, ``/wait/<ms>`` answers after a pause (pipelined
answers must keep their order), ``/early`` answers before reading the body, ``/parts`` answers in parts without
a length (chunked), ``/client`` says who the client is. Each socket waits at most ``SAFETY_S``: a front that
never answers fails the test by that wait, which is no measure of the front.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import uvicorn

from dhow.protocols.rest.body import Message, Receive, Scope, Send
from dhow.protocols.rest.connection import ConnectionTimeouts, DeadlineHttpProtocol
from dhow.protocols.rest.front import HttpFront
from tests.conftest import read_until_closed

SAFETY_S = 30.0
TIMEOUTS = ConnectionTimeouts(header_s=1.0, body_s=1.0)
KEEPALIVE_S = 2
_SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="nothing")


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    path: str = scope["path"]
    body = b""
    if path != "/early":
        message: Message = {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            body += message.get("body", b"")
    if path == "/client":  # who the front says the client is
        body = f"{scope['scheme']} {scope['client'][0]} {scope['client'][1]}".encode()
    if path.startswith("/context/"):  # what an earlier request left in the context, then this one's mark
        body = _SEEN.get().encode()
        _SEEN.set(path)
    if path.startswith("/wait/"):
        await asyncio.sleep(int(path.rpartition("/")[2]) / 1000)
        body = path.encode()
    if path.startswith("/held/"):  # native only: answered from a future 0.2 s later, as the REST door answers once
        # an audit record has left; the future fails for /held/fail (then the refusal is the answer)
        departure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if path == "/held/fail":
            asyncio.get_running_loop().call_later(0.2, departure.set_exception, RuntimeError("gone"))
        else:
            asyncio.get_running_loop().call_later(0.2, departure.set_result, None)
        exchange = send.__self__  # type: ignore[attr-defined]
        exchange.answer_after(departure, (200, [(b"content-length", b"2")], b"ok"), _refused)
        exchange.then = _HELD_STATUSES.append
        return
    if path == "/never-released":  # held until a test releases it
        departure = asyncio.get_running_loop().create_future()
        _UNRELEASED.append(departure)
        send.__self__.answer_after(departure, (200, [(b"content-length", b"2")], b"ok"), _refused)  # type: ignore[attr-defined]
        send.__self__.then = _HELD_STATUSES.append  # type: ignore[attr-defined]
        return
    if path == "/sent-before-return":  # the held answer is sent before the app returns
        departure = asyncio.get_running_loop().create_future()
        send.__self__.answer_after(departure, (200, [(b"content-length", b"4")], b"sent"), _refused)  # type: ignore[attr-defined]
        departure.set_result(None)  # (its callback, the answer's, is scheduled now: before this coroutine goes on)
        await asyncio.sleep(0)
        return
    status = 413 if path == "/early" else 200
    if path == "/parts":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


#: the statuses the answers held until a future was done were sent with (what the REST door's access log gets)
_HELD_STATUSES: list[int] = []
#: the futures the answers of /never-released wait for
_UNRELEASED: list[asyncio.Future[None]] = []


def _refused(exc: BaseException) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = f"refused: {exc}".encode()
    return 503, [(b"content-length", str(len(body)).encode())], body


class _Native:
    def __init__(self) -> None:
        self.front = HttpFront(_app, host="127.0.0.1", port=0, timeouts=TIMEOUTS, keepalive_s=KEEPALIVE_S, drain_s=5)
        self.thread = threading.Thread(target=asyncio.run, args=(self.front.serve(),), daemon=True)

    def port(self) -> int:
        return int(self.front.servers[0].sockets[0].getsockname()[1])

    @property
    def server(self) -> Any:
        return self.front


class _Uvicorn:
    def __init__(self) -> None:
        config = uvicorn.Config(
            _app,
            host="127.0.0.1",
            port=0,
            loop="asyncio",
            lifespan="off",
            log_level="warning",
            http=DeadlineHttpProtocol.with_timeouts(TIMEOUTS),
            timeout_keep_alive=KEEPALIVE_S,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])


def _running(served: _Native | _Uvicorn) -> Iterator[_Native | _Uvicorn]:
    served.thread.start()
    deadline = time.monotonic() + 10
    while not served.server.started:
        assert served.thread.is_alive() and time.monotonic() < deadline, "the front did not start"
        time.sleep(0.01)
    yield served
    served.server.should_exit = True
    served.thread.join(10)


@pytest.fixture(scope="module", params=["native", "uvicorn"])
def served(request: pytest.FixtureRequest) -> Iterator[_Native | _Uvicorn]:
    yield from _running(_Native() if request.param == "native" else _Uvicorn())


@pytest.fixture(scope="module")
def native_served() -> Iterator[_Native | _Uvicorn]:
    yield from _running(_Native())


@pytest.fixture
def port(served: _Native | _Uvicorn) -> int:
    return served.port()


@pytest.fixture
def native_port(native_served: _Native | _Uvicorn) -> int:
    """The port of the native front only: for cases where uvicorn answers otherwise (each says why)."""
    return native_served.port()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=SAFETY_S)


def _answers(sock: socket.socket, count: int) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """``count`` answers read from the socket: status line, headers, body (by content-length or chunked)."""
    buffer = b""
    answers = []
    while len(answers) < count:
        while b"\r\n\r\n" not in buffer:
            buffer += _recv(sock)
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
        if headers.get(b"transfer-encoding") == b"chunked":
            body, buffer = _dechunk(sock, buffer)
        else:
            size = int(headers.get(b"content-length", b"0"))
            while len(buffer) < size:
                buffer += _recv(sock)
            body, buffer = buffer[:size], buffer[size:]
        answers.append((status, headers, body))
    assert buffer == b""
    return answers


def _dechunk(sock: socket.socket, buffer: bytes) -> tuple[bytes, bytes]:
    body = b""
    while True:
        while b"\r\n" not in buffer:
            buffer += _recv(sock)
        size_line, _, buffer = buffer.partition(b"\r\n")
        size = int(size_line, 16)
        while len(buffer) < size + 2:
            buffer += _recv(sock)
        body, buffer = body + buffer[:size], buffer[size + 2 :]
        if size == 0:
            return body, buffer


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    assert chunk, "the connection closed before the answer was whole"
    return chunk


def _post(path: str, body: bytes, *headers: bytes) -> bytes:
    head = b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n" % (path.encode(), len(body))
    return head + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def test_kept_alive_connection_answers_request_after_request(port: int) -> None:
    with _connect(port) as sock:
        for body in (b"first", b"second" * 1000, b""):
            sock.sendall(_post("/echo", body))
            ((status, headers, answer),) = _answers(sock, 1)
            assert status == b"HTTP/1.1 200 OK"
            assert answer == body and headers[b"content-type"] == b"text/plain"


def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_limit(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(_post("/echo", b"once"))
        assert _answers(sock, 1)[0][2] == b"once"
        assert read_until_closed(sock) == b""  # closed after KEEPALIVE_S of silence, with nothing to say


def test_pipelined_requests_are_answered_in_order(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(_post("/wait/300", b"") + _post("/echo", b"second") + _post("/wait/0", b"x" * 100_000))
        answers = _answers(sock, 3)
    assert [body for _, _, body in answers] == [b"/wait/300", b"second", b"/wait/0"]


def test_chunked_request_body_is_read_whole(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        time.sleep(0.05)  # the rest in a second packet
        sock.sendall(b"6\r\n world\r\n0\r\n\r\n")
        ((status, _, body),) = _answers(sock, 1)
    assert status == b"HTTP/1.1 200 OK" and body == b"hello world"


def test_expect_100_continue_is_answered_before_the_body_is_sent(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n")
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"body")
        ((status, _, body),) = _answers(sock, 1)
    assert status == b"HTTP/1.1 200 OK" and body == b"body"


def test_an_answer_before_a_100_continue_closes_the_connection(port: int) -> None:
    # the client was not asked for its body: it may never send it, or send it later, where a next request would
    # be read
    with _connect(port) as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close" in answer.lower(), answer
    assert b"100 Continue" not in answer, answer


def test_head_answers_headers_without_the_body(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(b"HEAD /wait/0 HTTP/1.1\r\nhost: t\r\n\r\n")
        buffer = b""
        while not buffer.endswith(b"\r\n\r\n"):
            buffer += _recv(sock)
        assert buffer.startswith(b"HTTP/1.1 200 OK") and b"content-length: 7\r\n" in buffer.lower()
        sock.sendall(_post("/echo", b"next"))  # the connection goes on: no body was left in it
        ((_, _, body),) = _answers(sock, 1)
    assert body == b"next"


def test_answer_in_parts_is_chunked(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(_post("/parts", b""))
        ((status, headers, body),) = _answers(sock, 1)
    assert status == b"HTTP/1.1 200 OK" and headers[b"transfer-encoding"] == b"chunked"
    assert body == b"one,two,three"


def test_an_answer_before_the_body_is_read_reaches_the_client(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nhost: t\r\ncontent-length: 1000000\r\n\r\n" + b"x" * 1000)
        ((status, _, _),) = _answers(sock, 1)
    assert status.startswith(b"HTTP/1.1 413 ")


def test_invalid_request_is_answered_400_and_closed(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer


def test_a_local_proxy_names_the_client(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(_post("/client", b""))
        own = _answers(sock, 1)[0][2].split()
        sock.sendall(_post("/client", b"", b"X-Forwarded-For: 203.0.113.9, 127.0.0.1", b"X-Forwarded-Proto: https"))
        forwarded = _answers(sock, 1)[0][2]
    assert own[:2] == [b"http", b"127.0.0.1"] and int(own[2]) > 0
    assert forwarded == b"https 203.0.113.9 0"


def test_a_bad_chunk_in_a_running_requests_body_is_answered_400_and_closed(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
        time.sleep(0.3)  # the app now waits for the body in receive()
        sock.sendall(b"zz\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert answer.count(b"HTTP/1.1 ") == 1, answer  # the app, told the body is broken, answers nothing more


def test_the_next_pipelined_requests_header_deadline_waits_for_the_running_answer(port: int) -> None:
    # the running request takes longer than the header deadline; the next one's headers began meanwhile
    with _connect(port) as sock:
        sock.sendall(b"GET /wait/1500 HTTP/1.1\r\nhost: t\r\n\r\nPOST /echo HTTP/1.1\r\nho")
        ((status, _, body),) = _answers(sock, 1)
        assert status == b"HTTP/1.1 200 OK" and body == b"/wait/1500"
        sock.sendall(b"st: t\r\ncontent-length: 4\r\n\r\nnext")
        ((status, _, body),) = _answers(sock, 1)
    assert status == b"HTTP/1.1 200 OK" and body == b"next"


_FRAMINGS = {
    # RFC 9112 §6.3: chunked not last: the length cannot be known (400, close); llhttp refuses it at the body
    "gzip": ([b"transfer-encoding: gzip"], 400, "does not end with chunked"),
    # llhttp refuses it at the header itself
    "chunked, gzip": ([b"transfer-encoding: chunked, gzip"], 400, "does not end with chunked"),
    # §6.1: a coding the server does not understand: 501 (llhttp lets it through; the app would get gzip as plain)
    "gzip, chunked": ([b"transfer-encoding: gzip, chunked"], 501, "other than chunked"),
    "gzip then chunked": ([b"transfer-encoding: gzip", b"transfer-encoding: chunked"], 501, "other than chunked"),
    # §6.3: both lengths: request smuggling between two servers that pick different ones (400, close)
    "length then chunked": ([b"content-length: 5", b"transfer-encoding: chunked"], 400, "both Content-Length"),
    "chunked then length": ([b"transfer-encoding: chunked", b"content-length: 5"], 400, "both Content-Length"),
}


@pytest.mark.parametrize("framing", list(_FRAMINGS))
def test_a_request_framing_other_than_chunked_or_a_length_is_refused_before_the_app_runs(
    port: int, framing: str
) -> None:
    # both fronts answer alike: uvicorn's own answer to llhttp's refusal is replaced by dhow's (connection.py)
    lines, status, why = _FRAMINGS[framing]
    head = b"POST /echo HTTP/1.1\r\nhost: t\r\n" + b"".join(line + b"\r\n" for line in lines)
    with _connect(port) as sock:
        sock.sendall(head + b"\r\n5\r\nhello\r\n0\r\n\r\n")
        answer = read_until_closed(sock)  # and the connection closes
    head_out, _, body = answer.partition(b"\r\n\r\n")
    assert head_out.startswith(b"HTTP/1.1 %d " % status), answer
    assert b"content-type: application/json" in head_out.lower() and b"connection: close" in head_out.lower()
    assert why in orjson.loads(body)["error"], body


@pytest.mark.parametrize("coding", [b"Chunked", b", chunked"])
def test_transfer_coding_names_are_read_without_regard_to_case_or_empty_list_elements(port: int, coding: bytes) -> None:
    # RFC 9110 §5.6.1: a recipient ignores a list's empty elements
    with _connect(port) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: " + coding + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        ((status, _, body),) = _answers(sock, 1)
    assert status == b"HTTP/1.1 200 OK" and body == b"hello"


def test_a_pipelined_request_does_not_see_what_the_request_before_it_set_in_its_context(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(_post("/context/a", b"") + _post("/context/b", b""))
        answers = _answers(sock, 2)
    assert [body for _, _, body in answers] == [b"nothing", b"nothing"]


def test_a_refused_pipelined_request_is_answered_after_those_accepted_before_it(native_port: int) -> None:
    # native only: uvicorn writes its 400 as soon as it parses the bad request and closes: the answers owed are lost
    with _connect(native_port) as sock:
        sock.sendall(_post("/wait/300", b"") + _post("/echo", b"second") + b"NOT HTTP AT ALL\r\n\r\n")
        answers = read_until_closed(sock)
    assert re.findall(rb"HTTP/1\.1 \d+", answers) == [b"HTTP/1.1 200", b"HTTP/1.1 200", b"HTTP/1.1 400"], answers
    assert answers.index(b"/wait/300") < answers.index(b"second") < answers.index(b"HTTP/1.1 400 "), answers


def test_a_bad_chunk_after_an_early_answer_closes_without_a_second_answer(native_port: int) -> None:
    # native only: uvicorn writes a 400 after the 413, a second answer to the one request
    with _connect(native_port) as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        ((status, _, _),) = _answers(sock, 1)
        assert status.startswith(b"HTTP/1.1 413 ")
        sock.sendall(b"zz\r\n")
        assert read_until_closed(sock) == b""


def test_a_pipelined_request_refused_when_crowded_is_answered_503_after_those_before_it() -> None:
    # native only: the front's own bound (uvicorn's limit_concurrency is tested with the whole server)
    served = _Native()
    front = served.front
    front.limit = 3
    served.thread.start()
    while not front.started:
        assert served.thread.is_alive(), "the front did not start"
        time.sleep(0.01)
    try:
        with _connect(served.port()) as sock:
            sock.sendall(_post("/wait/300", b"") + _post("/wait/500", b""))
            _wait_for(lambda: any(connection.running and connection._pipeline for connection in front._open))
            with _connect(served.port()), _connect(served.port()):
                _wait_for(lambda: len(front._open) == 3)  # crowded from now on
                sock.sendall(_post("/echo", b"third"))  # read once the second runs (reading paused till then)
                answers = read_until_closed(sock)
    finally:
        front.should_exit = True
        served.thread.join(10)
    assert re.findall(rb"HTTP/1\.1 \d+", answers) == [b"HTTP/1.1 200", b"HTTP/1.1 200", b"HTTP/1.1 503"], answers
    assert answers.index(b"/wait/300") < answers.index(b"/wait/500") and b"third" not in answers, answers


def test_an_answer_held_until_a_future_is_done_goes_then_in_its_order(native_port: int) -> None:
    """The REST door's audited answer: sent from the future's callback once it is done (the app's coroutine has
    ended meanwhile), before the next pipelined request's; a future that fails sends the refusal instead."""
    _HELD_STATUSES.clear()
    with _connect(native_port) as sock:
        sock.sendall(_post("/held/ok", b"") + _post("/held/fail", b"") + _post("/echo", b"third"))
        answers = _answers(sock, 3)
    assert [(status.split()[1], body) for status, _, body in answers] == [
        (b"200", b"ok"), (b"503", b"refused: gone"), (b"200", b"third")
    ], answers  # fmt: skip
    assert _HELD_STATUSES == [200, 503]


def test_a_held_answer_sent_before_its_app_returned_goes_on_with_the_next_request_once(native_port: int) -> None:
    """The connection goes on with the next pipelined request once for a held answer, also when the answer was
    sent before the app's coroutine ended: the next two requests are not both started, each after the one before."""
    with _connect(native_port) as sock:
        sock.sendall(_post("/sent-before-return", b"") + _post("/wait/300", b"") + _post("/echo", b"third"))
        answers = _answers(sock, 3)
    assert [body for _, _, body in answers] == [b"sent", b"/wait/300", b"third"], answers


async def _front_holding_an_answer() -> tuple[
    HttpFront, asyncio.Future[None], asyncio.StreamReader, asyncio.StreamWriter
]:
    """A front (drain time 0) serving, and one connection whose request's answer it holds for a record that has not
    left (``/never-released``): the front, its serving, the connection's reader and writer."""
    front = HttpFront(_app, host="127.0.0.1", port=0, timeouts=TIMEOUTS, keepalive_s=KEEPALIVE_S, drain_s=0)
    serving = asyncio.ensure_future(front.serve())
    while not front.started:
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_connection("127.0.0.1", front.servers[0].sockets[0].getsockname()[1])
    writer.write(_post("/never-released", b""))
    while not any(exchange.deferred for exchange in front._running):
        await asyncio.sleep(0.01)
    return front, serving, reader, writer


def test_the_drain_gives_up_a_held_answer_with_its_line_saying_499(caplog: pytest.LogCaptureFixture) -> None:
    """An answer still held for its record when the drain's time is up has no coroutine to cancel: it is given up,
    its access log line said 499 then (not the 200 it was never sent with, later), and its connection closed;
    its record's departure, when it comes, sends and logs nothing."""
    _HELD_STATUSES.clear()

    async def scenario() -> bytes:
        front, serving, reader, writer = await _front_holding_an_answer()
        front.should_exit = True
        await serving
        assert _HELD_STATUSES == [499] and not front._running
        _UNRELEASED.pop().set_result(None)  # the record leaves after all
        sent = await reader.read()
        writer.close()
        return sent

    assert asyncio.run(asyncio.wait_for(scenario(), SAFETY_S)) == b""  # (bounded: a regression fails, not hangs)
    assert _HELD_STATUSES == [499]
    assert "gave up 1 REST answer(s) held" in caplog.text and "cancelled" not in caplog.text
    assert "failed" not in caplog.text and "Exception" not in caplog.text


def test_a_held_answer_whose_client_left_is_logged_499() -> None:
    """The client closes its connection while its answer is held for the record: when the record has left, nothing
    is sent and its access log line says 499 (the client left before its answer), not the status never sent."""
    _HELD_STATUSES.clear()

    async def scenario() -> None:
        front, serving, _, writer = await _front_holding_an_answer()
        (held,) = [exchange for exchange in front._running if exchange.deferred]
        writer.close()
        while not held.disconnected:
            await asyncio.sleep(0.01)
        _UNRELEASED.pop().set_result(None)  # the record leaves
        while not _HELD_STATUSES:
            await asyncio.sleep(0.01)
        front.should_exit = True
        await serving

    asyncio.run(asyncio.wait_for(scenario(), SAFETY_S))  # (bounded: a regression fails, not hangs)
    assert _HELD_STATUSES == [499]


@pytest.mark.parametrize("released", [False, True], ids=["record-still-held", "record-left-after"])
def test_an_abandoned_held_answer_closes_its_connection_serving_nothing_behind_it(
    caplog: pytest.LogCaptureFixture, released: bool
) -> None:
    """A held answer given up (``Exchange.abandon``) by any caller, not only the drain, with a request pipelined
    behind it: the client sees its connection closed with nothing sent, at once, not after a record that may never
    leave; the request behind is not served; the record's departure, when it comes after, sends and logs nothing."""
    _HELD_STATUSES.clear()

    async def scenario() -> bytes:
        front, serving, reader, writer = await _front_holding_an_answer()
        (held,) = [exchange for exchange in front._running if exchange.deferred]
        connection = held.connection
        writer.write(_post("/echo", b"behind"))
        while not connection._pipeline:
            await asyncio.sleep(0.01)
        held.abandon()
        if released:  # the record leaves after all: its callback runs before the client reads
            _UNRELEASED.pop().set_result(None)
            while connection.running is not None:
                await asyncio.sleep(0.01)
        sent = await reader.read()
        writer.close()
        front.should_exit = True
        await serving
        return sent

    assert asyncio.run(asyncio.wait_for(scenario(), SAFETY_S)) == b""  # (bounded: a regression fails, not hangs)
    assert _HELD_STATUSES == [499]
    assert "gave up" not in caplog.text and "failed" not in caplog.text and "Exception" not in caplog.text


def test_abandoning_a_held_answer_already_sent_changes_nothing() -> None:
    """A held answer given up after it went (a caller that looked at it before): no second access log line, and its
    connection, kept alive, goes on serving."""
    _HELD_STATUSES.clear()

    async def scenario() -> bytes:
        front, serving, reader, writer = await _front_holding_an_answer()
        (held,) = [exchange for exchange in front._running if exchange.deferred]
        _UNRELEASED.pop().set_result(None)
        await reader.readuntil(b"ok")
        held.abandon()
        writer.write(_post("/echo", b"after"))
        answer = await reader.readuntil(b"after")
        writer.close()
        front.should_exit = True
        await serving
        return answer

    assert asyncio.run(asyncio.wait_for(scenario(), SAFETY_S)).startswith(b"HTTP/1.1 200 ")
    assert _HELD_STATUSES == [200]


def _wait_for(condition: Callable[[], object]) -> None:
    deadline = time.monotonic() + SAFETY_S
    while not condition():
        assert time.monotonic() < deadline, "the front never got there"
        time.sleep(0.01)
