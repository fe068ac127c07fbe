"""The core service and its one way in: every door's every request goes through ``CoreService.call``.

    async with service.call(credentials, access, model) as call:
        response = await call.infer(request)

``call`` authenticates (or takes an in-process service identity), authorizes, takes quota, then hands the
door a ``Call``; when the block ends, however it ends, it frees the quota and writes one audit record with
the outcome. Placement (residency), routing and running happen inside ``Call.infer``, whose outcome comes
back to the call instead of being written into a shared object. A door cannot skip a policy: the data plane
is reachable only through a ``Call``.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import replace
from types import TracebackType
from typing import Any, cast

from dhow.access.actions import ACTIONS, Access
from dhow.access.authenticator import ANONYMOUS, Credentials
from dhow.access.permissions import ALL_TENANTS, Grant, Permission, Principal
from dhow.core.errors import CallCancelled, DhowError, InternalError
from dhow.core.ids import is_client_request_id, new_request_id
from dhow.core.names import check_model_name
from dhow.core.types import Caller, InferenceRequest, InferenceResponse, Outcome
from dhow.monitoring.tracing import RequestTrace, Sampled, Tracing
from dhow.serving.dataplane import SERVICE_PREFIX, DataPlane
from dhow.serving.guard import AccessGuard, Admission
from dhow.serving.traffic import Invoke

__all__ = ["ACTIONS", "UNREAD", "Access", "Call", "CoreService", "Credentials", "Principal", "service_identity"]

log = logging.getLogger("dhow.service")


def service_identity(name: str, role: str = "invoker") -> Principal:
    """An in-process caller (``dhow:shadow``, a repository poll, a batch job), named so in the audit trail: checked like
    any other principal, never authenticated (it holds no credential to steal)."""
    return Principal(name, ALL_TENANTS, (Grant(role),))


class _Unread(enum.Enum):
    UNREAD = "unread"


#: a door that does not read the ``traceparent`` itself: the request's headers decide whether it is traced
UNREAD = _Unread.UNREAD


class Call:
    """One request through the admission point, as a door's handler sees it: ``async with`` admits it (or
    raises the refusal), and its end, however it ends, frees its quota and writes its audit record."""

    __slots__ = (
        "_access", "_admission", "_admitted_ns", "_answered_ns", "_dataplane", "_details", "_entered_ns",
        "_guard", "_model", "_named", "_outcome", "_region", "_sampled", "_trace", "_tracing", "_who", "principal",
        "request_id",
    )  # fmt: skip

    def __init__(
        self,
        dataplane: DataPlane,
        guard: AccessGuard,
        who: Credentials | Principal,
        access: Access | None,
        model: str,
        request_id: str = "",
        tracing: Tracing | None = None,
        traceparent: str | _Unread | None = UNREAD,
    ) -> None:
        self._dataplane = dataplane
        self._guard = guard
        self._who = who
        self._access = access
        self._model = model
        self._admission = _OPEN
        #: who was let in (attributes, not properties: a door reads them on every request)
        self.principal = _OPEN.principal
        #: whether the id is decided (a header named the call, or its first inference was looked at)
        self._named = bool(request_id)
        #: the id of this request everywhere (``dhow.core.ids``): the one the door read from a header, else the
        #: request's own (``infer`` adopts it), else one made here, before admission: a refusal's audit record and
        #: the door's access log line then say the same (an open route's, never audited, is the door's to make)
        self.request_id = request_id or (new_request_id() if access is not None else "")
        #: what inference decided (None: it did not end, or was not asked), and the data region placement gave
        #: (None: not placed): the outcome is built only when an audit record asks for it
        self._outcome: Outcome | None = None
        self._region: str | None = None
        #: what ``note`` adds to the audit record (None until a change notes something)
        self._details: dict[str, Any] | None = None
        #: tracing (None: off, or this request is not sampled: then nothing below costs anything), the sampling
        #: decision (UNREAD: the door did not read the traceparent, the request's headers decide) and the trace
        self._tracing = tracing
        self._sampled: Sampled | _Unread | None = None
        if tracing is not None:
            if traceparent is None and tracing.skip > 1:  # (most requests: not their turn, no call; ``sample``)
                tracing.skip -= 1
                self._tracing = None
            else:
                self._sampled = tracing.sample(traceparent) if traceparent is not UNREAD else UNREAD
                if self._sampled is None:
                    self._tracing = None
        self._trace: RequestTrace | None = None
        self._entered_ns = self._admitted_ns = self._answered_ns = 0

    async def __aenter__(self) -> Call:
        if self._tracing is not None:
            self._entered_ns = time.time_ns()
        if self._model:
            check_model_name(self._model)  # it may become a path or a log word: checked before anything else
        if self._access is not None:
            # the guard's admit, awaited only when it must wait (a token to verify, a quota to count)
            admitted = self._guard.admit(self._who, self._access, self._model, self.request_id)
            admission = self._admission = admitted if isinstance(admitted, Admission) else await admitted
            self.principal, self.request_id = admission.principal, admission.caller.request_id
        if self._tracing is not None:
            self._admitted_ns = time.time_ns()
        return self

    def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, trace: TracebackType | None
    ) -> Awaitable[None]:
        # a plain method: the usual call's end (no exception) is what to await for its record, or ``_NOTHING``, with
        # no coroutine of its own to make and, for an audited inference, none to resume when its record has left
        if exc is not None:
            return self._ended(exc)
        waiting = self.leave()
        return _NOTHING if waiting is None else waiting

    def leave(self) -> Awaitable[None] | None:
        """The end of a call whose work raised nothing (``__aexit__``'s, and that of a door that sends its answer
        once the record has left without resuming its coroutine for it): what to wait for first; None: nothing. The
        guard raises when the audit trail cannot take the record: fail closed."""
        if self._trace is not None:
            self._trace.finish(self._outcome.version if self._outcome else "", self._answered_ns, "")
        return self._finish("success")

    async def _ended(self, exc: BaseException) -> None:
        """The end of a call that raised: its record says how, and an unexpected exception becomes an id."""
        if self._trace is not None:
            self._trace.finish(self._outcome.version if self._outcome else "", self._answered_ns, _error_code(exc))
        if isinstance(exc, DhowError):
            await self._finished(exc.code.value, exc.message)
        elif isinstance(exc, CallCancelled | asyncio.CancelledError):
            await self._finished("CANCELLED")
        elif isinstance(exc, Exception):
            error_id = secrets.token_hex(4)
            log.error("internal error (id %s) in %s", error_id, self._admission.access.action, exc_info=exc)
            await self._finished("INTERNAL", f"internal error (id {error_id})")
            raise InternalError(error_id) from exc
        else:
            # GeneratorExit (the coroutine was closed), SystemExit, KeyboardInterrupt: nothing may be awaited now,
            # yet the call ends: its quota and in-flight count are freed and its record queued (a change's durable
            # write goes on without it); a refusal from the audit trail is logged, never put in their place
            try:
                waiting = self._finish("CANCELLED")
            except Exception as err:
                log.error("the audit record of a call ended by %s failed: %s", type(exc).__name__, err)
            else:
                if isinstance(waiting, asyncio.Future):
                    waiting.add_done_callback(_left)
                elif inspect.iscoroutine(waiting):  # a wait for room in the writer's pipe: the record was sent
                    waiting.close()

    @property
    def caller(self) -> Caller:
        return self._admission.caller

    @property
    def actor(self) -> str:
        """Who asks for a change: the principal; without authentication, the name the caller gave itself."""
        if self._admission.principal is ANONYMOUS and isinstance(self._who, Credentials):
            return self._who.actor or ANONYMOUS.name
        return self._admission.principal.name

    def visible(self, name: str) -> bool:
        """Whether the caller may see a model: lists of models show only those (no tenant sees another's)."""
        return self._guard.may_see(self._admission.principal, name)

    def note(self, **details: Any) -> None:
        """What the audit record of this call says about the change it made (a key's id, a revision)."""
        if self._details is None:
            self._details = {}
        self._details.update(details)

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        if request.id and not self._named:
            self._adopt(request.id)
        if self._tracing is not None:
            times = (self._entered_ns, self._admitted_ns, time.time_ns())
            sampled = self._sampled
            if sampled is UNREAD:
                sampled = self._tracing.sample(request.headers.get("traceparent"))
            if isinstance(sampled, tuple):
                self._trace = self._tracing.begin(sampled, request.model_name, self.request_id, times)
                request.trace = self._trace
        placement = self._dataplane.place(request, self._admission.caller)
        self._region = placement.region  # a refusal by residency is audited in its region
        response, self._outcome = await self._dataplane.infer(request, placement)
        if self._trace is not None:
            self._answered_ns = time.time_ns()
        return response

    def _adopt(self, request_id: str) -> None:
        """Name the call by its request's own id, when the door read none from a header and it is a plain token: the
        audit record, the access log, the payload log and the trace then all say it. An in-process
        identity's call keeps its own (a stream's call infers many requests; a shadow's copy is not the client's)."""
        self._named = True
        admission = self._admission
        if admission is _OPEN or admission.principal.name.startswith(SERVICE_PREFIX):
            return
        if is_client_request_id(request_id):
            admission.caller = replace(admission.caller, request_id=request_id)
            self.request_id = request_id

    def _finish(self, outcome: str, message: str = "") -> Awaitable[None] | None:
        """The guard's end of the call (none for an open route): what to await, None when nothing must be (the
        usual request: no coroutine)."""
        if self._admission is _OPEN:
            return None
        return self._guard.finish(self._admission, outcome, message, self._served(), self._details)

    async def _finished(self, outcome: str, message: str = "") -> None:
        waiting = self._finish(outcome, message)
        if waiting is not None:
            await waiting

    def _served(self) -> Outcome | None:
        """What inference decided, for the audit record: its outcome, else (it failed) the region it was placed in."""
        if self._outcome is None and self._region is not None:
            return Outcome(data_region=self._region)
        return self._outcome


class _Nothing(tuple[()]):
    """What a call's end awaits when nothing must be waited for: done at once, its ``__await__`` tuple's own
    iterator (C), so that awaiting it makes no coroutine and runs no Python frame."""

    __slots__ = ()
    __await__ = tuple.__iter__


_NOTHING = cast(Awaitable[None], _Nothing())


def _left(written: asyncio.Future[None]) -> None:
    """The end of the durable write of a record whose call could not wait for it."""
    if not written.cancelled() and written.exception() is not None:
        log.error("the audit record of a call ended by a BaseException was not written: %s", written.exception())


class CoreService:
    """The data plane behind its admission point; the composition root builds one per server process."""

    def __init__(self, dataplane: DataPlane, guard: AccessGuard, tracing: Tracing | None = None) -> None:
        self.dataplane = dataplane
        self.guard = guard
        #: OpenTelemetry spans of inference requests (``--otlp-endpoint``); None: off
        self.tracing = tracing

    def call(
        self,
        who: Credentials | Principal,
        access: Access | None,
        model: str = "",
        request_id: str = "",
        traceparent: str | _Unread | None = UNREAD,
    ) -> Call:
        """One request, to enter with ``async with`` (see the module's docstring); ``request_id`` is the one the
        client gave (else the guard makes one); ``traceparent`` the W3C header the door read (None: it has none;
        ``UNREAD``: the door did not look, the request's headers are asked when it is inferred).

        ``access`` None is an open route (health checks): no credentials asked, nothing audited. Errors leave
        as ``DhowError`` (an unexpected exception becomes an ``InternalError`` with an id in the log); a
        client that went away leaves as ``CallCancelled``.
        """
        return Call(self.dataplane, self.guard, who, access, model, request_id, self.tracing, traceparent)

    async def authenticate(self, who: Credentials, access: Access) -> Principal:
        """Authenticate once for many calls (a gRPC stream's messages); a refusal is audited and raised."""
        return await self.guard.authenticate(who, access)

    def invoker(self, identity: Principal) -> Invoke:
        """Runs a request as an in-process service identity, through the same admission point: what a traffic
        policy gets to run shadow copies."""

        async def invoke(request: InferenceRequest) -> InferenceResponse:
            async with self.call(identity, ACTIONS["infer"], request.model_name) as call:
                return await call.infer(request)

        return invoke


def _error_code(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    return exc.code.value if isinstance(exc, DhowError) else type(exc).__name__


#: the admission of an open route (health checks): nobody in particular, nothing held, nothing audited
_OPEN = Admission(ANONYMOUS, Access(Permission.SERVER_READ, "health"), "", Caller(ANONYMOUS.name, ALL_TENANTS, ""), 0)
