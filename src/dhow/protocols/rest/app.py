"""The REST door: the Open Inference Protocol v2 (with Triton's extensions) as a pure ASGI app, and the peers'
protocols beside it (KServe v1 / TensorFlow Serving, TorchServe: ``peers.py``).

It translates HTTP to data-plane calls and back, nothing more: no framework, one dict look-up or
one path split to route, one JSON parse per request, header lists built once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import parse_qs

import orjson

from dhow.access.authenticator import Credentials
from dhow.core.errors import CallCancelled, DhowError, InvalidInput, NotFound
from dhow.core.ids import client_request_id
from dhow.core.types import LazyHeaders
from dhow.core.wire.v2 import decode_request, encode_response
from dhow.governance.writer_process import Departure
from dhow.protocols.rest.access_log import AccessLog, unrouted_request_id
from dhow.protocols.rest.body import (
    Receive,
    Scope,
    Send,
    compress,
    decompress,
    json_object,
    read_body,
    too_large,
)
from dhow.protocols.rest.held_answers import REFUSALS, error_body, log_later, retry_after
from dhow.protocols.rest.http1 import Exchange
from dhow.protocols.rest.monitoring import MonitoringRoutes
from dhow.protocols.rest.openapi import openapi_document
from dhow.protocols.rest.peers import PeerRoutes
from dhow.protocols.rest.router import Match, allowed_methods, resolve
from dhow.protocols.routes import ROUTES, Protocol
from dhow.rollouts.editor import DeploymentEditor
from dhow.serving.admin import KEY_FIELDS, AccessAdmin
from dhow.serving.service import Call, CoreService

__all__ = ["RestApp"]

log = logging.getLogger("dhow.rest")

Headers = list[tuple[bytes, bytes]]
#: what a handler answers: status, headers (shared constants: never mutated), body
Answer = tuple[int, Headers, bytes]
Handler = Callable[["Request", Call], Awaitable[Answer]]

_HEADER_LENGTH = b"inference-header-content-length"
#: where the TLS layer puts the common name of a verified client certificate in the ASGI scope
CLIENT_CN_SCOPE_KEY = "dhow.client_cn"
_JSON: Headers = [(b"content-type", b"application/json")]
_OCTET_STREAM = (b"content-type", b"application/octet-stream")
_EMPTY: Answer = (200, [], b"")
# the health answers KServe's clients read (Triton's read the status only); built once
_LIVE: Answer = (200, _JSON, b'{"live":true}')
_READY: Answer = (200, _JSON, b'{"ready":true}')


class Request:
    """One HTTP request: the route it matched, its headers scanned once, its body read on demand."""

    __slots__ = (
        "_limit",
        "_query",
        "_receive",
        "accept_encoding",
        "authorization",
        "authorization_count",
        "claimed_actor",
        "content_encoding",
        "content_length",
        "header_length",
        "match",
        "raw_headers",
        "request_id",
        "traceparent",
    )

    def __init__(self, scope: Scope, receive: Receive, match: Match, limit: int) -> None:
        self._limit = limit
        self._receive = receive
        self._query: bytes = scope.get("query_string", b"")
        self.match = match
        self.content_length: int | None = None
        self.content_encoding = b""
        self.accept_encoding = b""
        self.header_length: bytes | None = None
        self.raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        self.authorization = b""
        self.authorization_count = 0
        self.claimed_actor = b""
        #: the client's ``x-request-id`` when it is a plain token, else "" (the body's id or the admission point's)
        self.request_id = ""
        #: the W3C ``traceparent`` (tracing decides with it once, before admission)
        self.traceparent: str | None = None
        for name, value in self.raw_headers:
            if name == b"content-length":
                self.content_length = int(value) if value.isdigit() else None
            elif name == b"content-encoding":
                self.content_encoding = value
            elif name == b"accept-encoding":
                self.accept_encoding = value
            elif name == _HEADER_LENGTH:
                self.header_length = value
            elif name == b"authorization":
                self.authorization = value
                self.authorization_count += 1
            elif name == b"x-dhow-actor":
                self.claimed_actor = value
            elif name == b"x-request-id":
                self.request_id = client_request_id(value)
            elif name == b"traceparent":
                self.traceparent = value.decode("latin-1")

    def credentials(self, scope: Scope) -> Credentials:
        """The Authorization header or the verified client certificate; ``x-dhow-actor`` names the caller when
        authentication is off (so that local tools can still say who they are)."""
        actor = self.claimed_actor.decode("utf-8", "replace")[:200]
        client = scope.get("client")
        return Credentials(
            self.authorization.decode("latin-1"),
            scope.get(CLIENT_CN_SCOPE_KEY) or "",
            actor,
            source=str(client[0]) if client else "",
            repeated_authorization=self.authorization_count > 1,
        )

    def gone(self) -> bool:
        """Whether the client closed its connection (uvicorn marks its request cycle; no read needed)."""
        cycle = getattr(self._receive, "__self__", None)
        return getattr(cycle, "disconnected", False) is True

    def _arrived(self) -> bytes | None:
        """The whole body when dhow's own HTTP/1.1 has it already (no ASGI message, no coroutine); None: read it."""
        exchange = getattr(self._receive, "__self__", None)
        if type(exchange) is not Exchange:
            return None
        length = self.content_length
        if length is not None and length > self._limit:  # refused by ``read_body`` before anything is read
            return None
        return exchange.arrived()

    def query(self) -> dict[str, str]:
        """The query string's parameters (the last of repeated ones)."""
        return {k: v[-1] for k, v in parse_qs(self._query.decode("latin-1")).items()}

    async def body(self) -> bytes:
        body = self._arrived()
        if body is None:
            body = await read_body(self._receive, self._limit, self.content_length)
        elif len(body) > self._limit:
            raise too_large(len(body), self._limit)
        if self.content_encoding:
            body = decompress(body, self.content_encoding, self._limit)
        return body

    async def json_body(self) -> dict[str, Any]:
        """An optional JSON object body (repository requests): empty means ``{}``."""
        return json_object(await self.body(), empty_means={})


class RestApp(PeerRoutes, MonitoringRoutes):
    """The ASGI application of the REST door: every route through the core service's one admission point.

    ``metrics_handler`` renders ``GET /metrics``; ``deployments`` and ``access`` serve the admin routes (None: the
    routes answer 404 "not enabled on this server"); ``access_log`` gets a line per request while enabled.
    """

    def __init__(
        self,
        service: CoreService,
        *,
        max_body_bytes: int = 64 * 1024 * 1024,
        metrics_handler: Callable[[], tuple[bytes, str]] | None = None,
        deployments: DeploymentEditor | None = None,
        access: AccessAdmin | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.service = service
        self.access_log = access_log
        self.dataplane = service.dataplane
        self.deployments = deployments
        self.access = access
        self.max_body_bytes = max_body_bytes
        self.metrics_handler = metrics_handler
        self._openapi_body: bytes | None = None
        # each route's handler by the route's name (a str: its hash is cached, so the look-up is cheap)
        self._handlers: dict[str, Handler] = {route.name: getattr(self, route.handler) for route in ROUTES}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        access_log = self.access_log
        if access_log is None or not access_log.writing:
            await self._answer(scope, receive, send)
            return
        started = time.perf_counter()
        status, principal, request_id = await self._answer(scope, receive, send)
        if not status:  # answered once its audit record has left (``Exchange.answer_after``): logged then
            send.__self__.then = partial(log_later, access_log, scope, started, principal, request_id)  # type: ignore[attr-defined]
            return
        log_later(access_log, scope, started, principal, request_id, status)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> tuple[int, str, str]:
        """Route, admit and answer one request: its status (499: client gone), who ("-": unknown), its request id."""
        match = resolve(scope["path"], scope["method"])
        if match is None:
            return await _send_no_route(send, scope["path"], scope["method"]), "-", unrouted_request_id(scope)
        request = Request(scope, receive, match, self.max_body_bytes)
        principal, request_id = "-", request.request_id
        try:
            credentials = request.credentials(scope)
            call = self.service.call(credentials, match.route.access, match.model, request_id, request.traceparent)
            request_id = call.request_id  # a refusal's too: made by the call when the client sent none
            await call.__aenter__()  # ``async with``, but for its usual end (``leave``)
            try:
                principal = call.principal.name
                status, headers, body = await self._handlers[match.route.name](request, call)
            except BaseException as exc:
                await call.__aexit__(type(exc), exc, exc.__traceback__)
                raise
            finally:  # read once it ran: an inference named only in its body is named so once that is read
                request_id = call.request_id
            departure = call.leave()  # (the guard raises when the audit trail cannot take the record: fail closed)
            if request.accept_encoding:
                # after ``leave``: the record's latency leaves compression out, as it did when the call ended first
                try:
                    body, encoding = compress(body, request.accept_encoding)
                except BaseException:
                    if departure is not None:  # no answer, not even the 500 this becomes, before the record left
                        await departure
                    raise
                if encoding is not None:
                    headers = [*headers, (b"content-encoding", encoding), (b"vary", b"accept-encoding")]
            if departure is not None:  # dhow's own HTTP/1.1 answers an audited inference once its record has left
                exchange = getattr(send, "__self__", None)  # (``held_answers.py``; an admin change awaits its write)
                if type(exchange) is Exchange and type(departure) is Departure and not departure.done():
                    answer = (status, [*headers, (b"content-length", b"%d" % len(body))], body)
                    exchange.answer_after(departure, answer, REFUSALS[match.route.protocol])
                    return 0, principal, request_id
                await departure
                if request.gone():  # its client left meanwhile: logged as a held answer's is (``Exchange._release``)
                    return 499, principal, request_id
        except DhowError as exc:
            headers = retry_after(exc.retry_after)
            await _send_error(send, exc.http_status, exc.message, headers, match.route.protocol)
            return exc.http_status, principal, request_id
        except CallCancelled:
            return 499, principal, request_id  # nginx's code for a client that closed the connection before its answer
        waiting = _send(send, status, headers, body)
        if waiting is not None:
            await waiting
        return status, principal, request_id

    # -- health and metadata ------------------------------------------------------------

    async def _server_metadata(self, request: Request, call: Call) -> Answer:
        return _json(self.dataplane.server_metadata())

    async def _live(self, request: Request, call: Call) -> Answer:
        return _LIVE if self.dataplane.live() else _error(503, "the server is not live", live=False)

    async def _ready(self, request: Request, call: Call) -> Answer:
        return _READY if self.dataplane.ready() else _error(503, self.dataplane.not_ready_reason(), ready=False)

    async def _metrics(self, request: Request, call: Call) -> Answer:
        if self.metrics_handler is None:
            raise NotFound("metrics are not enabled on this server")
        body, content_type = self.metrics_handler()
        return 200, [(b"content-type", content_type.encode("latin-1"))], body

    async def _model_metadata(self, request: Request, call: Call) -> Answer:
        return _json(self.dataplane.model_metadata(request.match.model, request.match.version))

    async def _model_ready(self, request: Request, call: Call) -> Answer:
        match = request.match
        if self.dataplane.model_ready(match.model, match.version):
            return _json({"name": match.model, "ready": True})
        version = f" version {match.version}" if match.version else ""
        return _error(503, f"model '{match.model}'{version} is not ready", name=match.model, ready=False)

    async def _model_config(self, request: Request, call: Call) -> Answer:
        return _json(self.dataplane.model_config(request.match.model, request.match.version))

    async def _statistics(self, request: Request, call: Call) -> Answer:
        return _json(self.dataplane.model_statistics(request.match.model, request.match.version, call.visible))

    # -- the repository -----------------------------------------------------------------

    async def _repository_index(self, request: Request, call: Call) -> Answer:
        ready = (await request.json_body()).get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput(f"'ready' must be a boolean, got {ready!r}")
        return _json(self.dataplane.repository_index(ready, call.visible))

    async def _load(self, request: Request, call: Call) -> Answer:
        await self.dataplane.load_model(request.match.model, await _parameters(request))
        return _EMPTY

    async def _unload(self, request: Request, call: Call) -> Answer:
        await self.dataplane.unload_model(request.match.model, await _parameters(request))
        return _EMPTY

    # -- deployments (the admin API) ----------------------------------------------------

    def _rollouts(self) -> DeploymentEditor:
        if self.deployments is None:
            raise NotFound("deployments are not enabled on this server")
        return self.deployments

    async def _openapi(self, request: Request, call: Call) -> Answer:
        if self._openapi_body is None:
            self._openapi_body = orjson.dumps(openapi_document())
        return 200, _JSON, self._openapi_body

    async def _deployments(self, request: Request, call: Call) -> Answer:
        deployments = self._rollouts().list_all()
        return _json({"deployments": [d for d in deployments if call.visible(d["name"])]})

    async def _deployment(self, request: Request, call: Call) -> Answer:
        return _json(self._rollouts().get(request.match.model))

    async def _put_deployment(self, request: Request, call: Call) -> Answer:
        rollouts = self._rollouts()
        body = await request.json_body()
        _only(body, ("policy", "revision", "reason"))
        if "policy" not in body:
            raise InvalidInput("the body needs 'policy' (the traffic policy) and 'revision' (0 to create)")
        return _json(
            await rollouts.put(
                request.match.model, body["policy"], body.get("revision"), call.actor, body.get("reason")
            )
        )

    async def _delete_deployment(self, request: Request, call: Call) -> Answer:
        rollouts = self._rollouts()
        body = await request.json_body()
        _only(body, ("revision", "reason"))
        await rollouts.delete(request.match.model, body.get("revision"), call.actor, body.get("reason"))
        return _json({})

    async def _deployment_action(self, request: Request, call: Call) -> Answer:
        rollouts = self._rollouts()
        body = await request.json_body()
        _only(body, ("revision", "reason"))
        match = request.match
        action = match.route.path.rpartition("/")[2]  # the deployment action is the route's last segment
        return _json(await rollouts.act(match.model, action, body.get("revision"), call.actor, body.get("reason")))

    async def _deployment_history(self, request: Request, call: Call) -> Answer:
        return _json({"history": await self._rollouts().history(request.match.model)})

    async def _deployment_events(self, request: Request, call: Call) -> Answer:
        return _json({"events": await self._rollouts().events(request.match.model)})

    # -- API keys and the audit trail (the access admin API) --------------------------------

    def _access(self) -> AccessAdmin:
        if self.access is None:
            raise NotFound("access control is not enabled on this server")
        return self.access

    async def _keys(self, request: Request, call: Call) -> Answer:
        return _json({"keys": await self._access().list_keys(call)})

    async def _create_key(self, request: Request, call: Call) -> Answer:
        body = await request.json_body()
        _only(body, KEY_FIELDS)
        return _json(await self._access().create_key(body, call))

    async def _revoke_key(self, request: Request, call: Call) -> Answer:
        return _json(await self._access().revoke_key(request.match.name, call))

    async def _rotate_key(self, request: Request, call: Call) -> Answer:
        body = await request.json_body()
        _only(body, ("grace_s",))
        grace = body.get("grace_s", 0)
        return _json(await self._access().rotate_key(request.match.name, grace, call))

    async def _audit(self, request: Request, call: Call) -> Answer:
        query = request.query()
        return _json({"records": await self._access().read_audit(query, call)})

    async def _audit_verify(self, request: Request, call: Call) -> Answer:
        return _json(await self._access().verify_audit(request.query().get("region", ""), call))

    # -- inference ----------------------------------------------------------------------

    async def _infer(self, request: Request, call: Call) -> Answer:
        body = await request.body()
        header_length = _header_length(request.header_length)
        inference = decode_request(body, request.match.model, request.match.version, header_length)
        raw_headers = request.raw_headers
        inference.headers = LazyHeaders(lambda: raw_headers)
        inference.gone = request.gone
        if header_length is None:
            inference.json_body = body
        response = await call.infer(inference)
        encoded, json_length = encode_response(response, inference)
        if json_length is None:
            item = inference.payload_item
            if item is not None:  # the payload log writes the answer as sent (ANSWER: its last place)
                item[-1] = encoded
            return 200, _JSON, encoded
        return 200, [_OCTET_STREAM, (_HEADER_LENGTH, b"%d" % json_length)], encoded


def _only(body: dict[str, Any], fields: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]!r} in the request body; expected {', '.join(fields)}")


async def _parameters(request: Request) -> dict[str, Any]:
    parameters = (await request.json_body()).get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be a JSON object")
    return parameters


def _header_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidInput(
            f"Inference-Header-Content-Length must be an integer, got {value.decode('latin-1')!r}"
        ) from None


def _json(document: Any) -> Answer:
    return 200, _JSON, orjson.dumps(document)


def _error(status: int, message: str, **members: Any) -> Answer:
    """An error answer; ``members`` go beside ``error`` (the health answers' ``ready: false``)."""
    return status, _JSON, orjson.dumps({**members, "error": message})


async def _send_no_route(send: Send, path: str, method: str) -> int:
    """404 for a path no route has; 405, with the methods it answers, for one that others do; the status."""
    methods = allowed_methods(path)
    if not methods:
        message = (
            f"no route for {path}; the Open Inference Protocol lives under /v2, KServe v1 / TensorFlow Serving's "
            "API under /v1/models, TorchServe's under /predictions and /ping"
        )
        await _send_error(send, 404, message)
        return 404
    message = f"{path} answers {' or '.join(methods)}, not {method}"
    await _send_error(send, 405, message, [(b"allow", ", ".join(methods).encode())])
    return 405


async def _send_error(
    send: Send, status: int, message: str, headers: Headers | None = None, protocol: Protocol = "v2"
) -> None:
    """``{"error": message}``; TorchServe's routes answer its own shape, which carries ``error`` too."""
    waiting = _send(send, status, [*_JSON, *(headers or ())], error_body(protocol, status, message))
    if waiting is not None:
        await waiting


def _send(send: Send, status: int, headers: Headers, body: bytes) -> Awaitable[None] | None:
    """Answer; what to await, None when the answer is written already (dhow's own HTTP/1.1 takes it at once)."""
    headers = [*headers, (b"content-length", b"%d" % len(body))]
    exchange = getattr(send, "__self__", None)
    if type(exchange) is Exchange:
        exchange.respond(status, headers, body)
        return None
    return _send_messages(send, status, headers, body)


async def _send_messages(send: Send, status: int, headers: Headers, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
