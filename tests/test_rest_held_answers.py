"""The REST door's answer held until an audited inference's record has left (``held_answers.py``), on one exchange
of dhow's own HTTP/1.1 with a stand-in for the connection and for the core service's call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from types import SimpleNamespace
from typing import Any

import pytest

from dhow.core.errors import Unavailable
from dhow.governance.writer_process import Departure
from dhow.protocols.rest import RestApp
from dhow.protocols.rest import app as app_module
from dhow.protocols.rest.exchange import Exchange

_SCOPE = {
    "type": "http", "method": "GET", "path": "/v2/health/live", "query_string": b"",
    "headers": [(b"accept-encoding", b"gzip")],
}  # fmt: skip


class _Connection:
    """What an exchange writes to, and asks of its connection."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.closing = False
        self.written: list[bytes] = []
        self.answered: list[Exchange] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


class _Call:
    """A call whose end (``leave``) is ``departure``: an inference's record's, or an admin change's durable write."""

    def __init__(self, departure: Awaitable[None]) -> None:
        self.departure = departure
        self.principal = SimpleNamespace(name="key:test")
        self.request_id = "r-1"

    async def __aenter__(self) -> _Call:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    def leave(self) -> Awaitable[None]:
        return self.departure


def _start(departure: Awaitable[None], access_log: Any = None) -> tuple[asyncio.Future[None], Exchange, _Connection]:
    """The live route through the REST app on one exchange, its call ending with ``departure``; run a few passes."""
    service: Any = SimpleNamespace(dataplane=SimpleNamespace(live=lambda: True), call=lambda *a: _Call(departure))
    connection = _Connection()
    exchange = Exchange(connection, dict(_SCOPE), True, False)  # type: ignore[arg-type]
    exchange.complete = True
    app = RestApp(service, access_log=access_log)
    running = asyncio.ensure_future(app(exchange.scope, exchange.receive, exchange.send))
    return running, exchange, connection


async def _passes(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_failed_compression_waits_for_the_record_before_the_app_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compression after ``leave`` fails (a large body's MemoryError): the app fails, and the front answers a
    500, only once the record has left, as every answer."""

    def fail(body: bytes, accept: bytes) -> tuple[bytes, bytes | None]:
        raise MemoryError

    monkeypatch.setattr(app_module, "compress", fail)

    async def scenario() -> None:
        departure = Departure()
        running, _, connection = _start(departure)
        await _passes()
        assert not running.done() and connection.written == []
        departure.set_result(None)
        with pytest.raises(MemoryError):
            await running

    asyncio.run(scenario())


def test_an_audited_admin_change_awaits_its_durable_write_as_before() -> None:
    """An admin change's end is its record's durable write (a plain future, ``record_now``): the app awaits it and
    answers its failure itself (a 503), not from a held answer's callback."""

    async def scenario() -> None:
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        running, exchange, connection = _start(written)
        await _passes()
        assert not running.done() and not exchange.deferred
        written.set_exception(Unavailable("the audit trail is not running: start it first", retry_after=1.0))
        await running
        assert connection.written[0].startswith(b"HTTP/1.1 503 "), connection.written

    asyncio.run(scenario())


@pytest.mark.parametrize("left", [True, False], ids=["client-left", "client-there"])
def test_an_awaited_departure_whose_client_left_meanwhile_is_logged_499(
    monkeypatch: pytest.MonkeyPatch, left: bool
) -> None:
    """A record departure the app awaits itself (not a held answer's: a lone request's, uvicorn's, CORS's) whose
    client closes its connection meanwhile: nothing is sent and the access log says 499, as for a held answer, not
    the status it was never sent with."""
    logged: list[int] = []
    monkeypatch.setattr(app_module, "log_later", lambda *args: logged.append(args[-1]))

    async def scenario() -> None:
        left_behind: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        running, exchange, connection = _start(left_behind, SimpleNamespace(writing=True))
        await _passes()
        assert not running.done() and not exchange.deferred
        if left:
            exchange.disconnected = True  # (what the connection's loss sets)
        left_behind.set_result(None)
        await running
        assert connection.written == [] if left else connection.written[0].startswith(b"HTTP/1.1 200 ")

    asyncio.run(scenario())
    assert logged == [499 if left else 200]
