"""Payload logging: every inference's masked request and outputs, and every error, to a sink, off the hot path.

The data plane queues one item per request, never a wait: an answered request's placement, times, request and
answer as they are (``answered``: one call on the request's path; the REST door then puts the JSON answer it
sent in the item, in place of the answer's arrays), or an error's event, a plain list (``FIELDS``, ``offer``).
Every 10 ms at most (``writer_pipe.FLUSH_S``), what was queued becomes events in one loop (``_frame``: the
request's JSON body as the client sent it, or its decoded tensors, and the JSON answer as the client got it, or
the answer's tensors) and is written into the pipe of a **writer process** of the server's own
(``dhow.serving.payload_writer``) as one frame (``frame_events``): the events in one ``orjson`` call (numpy arrays
as they are), the JSON bodies and answers after them as they came, neither escaped nor parsed. Made there, with
the others, an event costs the event loop less than made on each request's path between two requests
(``tabular``, REST, c=16, all monitoring on: the loop's CPU a request 1.5-5 µs less in paired rounds,
2026-12-07); an item holding bytes, not the answer's tensors, is released for less there. That process masks
each event by its model's ``pii:`` rules (handed over once per model), renders it as a CloudEvent and hands it to
the sink (``payload_sinks``: a rotating JSON Lines file, a Kafka topic, an HTTP endpoint); it answers with counts of
logged, dropped and failed events, which a thread here adds to the counters. Masking, rendering and the sink's
work never take the server's interpreter lock or its CPU time.

The queue is bounded twice: here (events waiting for the pipe, which fills only when the writer is far behind) and
in the writer (``capacity`` events waiting for the sink). A full queue drops the event and counts it; a sink that
fails counts it as failed; one that took it counts it as logged. Unlike a logger that buffers without bound, a slow
sink costs dropped events, never memory or latency (``dhow_payload_log_events_total{outcome="dropped"}``).
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import orjson
from prometheus_client import CollectorRegistry

from dhow.core.frames import HEADER_SIZE, decode_frame_length, frame
from dhow.core.types import InferenceRequest, InferenceResponse
from dhow.monitoring.payload_bytes import event_bytes as _event_bytes
from dhow.monitoring.payload_bytes import tensor_bytes as _tensor_bytes
from dhow.monitoring.writer_pipe import WriterPipe

__all__ = [
    "ANSWER",
    "EVENT_TYPES",
    "FIELDS",
    "MASKING",
    "MAX_MASKINGS",
    "QUEUE_BYTES",
    "TENSORS",
    "Answered",
    "Masking",
    "PayloadCounts",
    "PayloadLog",
    "PayloadSink",
    "encode_frame",
    "frame_events",
    "read_events",
    "top_level",
]

#: the CloudEvents ``type`` of an answered request and of a failed one
EVENT_TYPES = {True: "io.dhow.inference.response", False: "io.dhow.inference.error"}
#: an event as the data plane offers it: a list in this order (``outcome``: "success" or the error's code;
#: ``error``: the message the client got; ``time``: the ``perf_counter`` when it reached the data plane, made Unix
#: time once per frame; ``inputs``: the request's Open Inference Protocol JSON body as the client sent it and the
#: number of tensors the server decoded from it (a ``(bytes, int)`` tuple), or its decoded tensors as ``[name,
#: datatype, shape, array]`` lists; ``outputs``: the answer's tensors in that form, None when it failed).
#: ``offer`` appends the number of the model's masking; the frame (``PayloadLog._frame``, which makes an
#: ``answered`` request's event in this form too, its ``outputs`` there the JSON answer the REST door sent when it
#: sent one) carries a JSON body and a JSON answer after the events, leaving their lengths in ``inputs`` and
#: ``outputs``, and for a JSON body appends its number of tensors (``TENSORS``), in the writer a body's proof that
#: it holds no string but the protocol's (``payload_render``).
FIELDS = ("request_id", "model", "version", "principal", "tenant", "data_region", "outcome", "error", "time",
          "latency_s", "parameters", "inputs", "outputs")  # fmt: skip
#: an answered request's placement, as ``PayloadLog.answered`` takes it: its model's config, its data region, the
#: version placed and its caller (never None there)
Answered = tuple[Any, str, Any, Any]
#: the indexes the data plane sets after the request ran
VERSION, OUTCOME, ERROR, LATENCY, OUTPUTS = 2, 6, 7, 9, 12
TIME, PARAMETERS, INPUTS = 8, 10, 11
#: the indexes of the masking's number and of a JSON body's number of tensors, appended to ``FIELDS``
MASKING, TENSORS = 13, 14
#: where, in an ``answered`` request's item (``InferenceRequest.payload_item``), the door that sent the answer as
#: JSON puts those bytes, in place of the answer
ANSWER = 7

_NUMPY = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
#: a ``frame_events`` frame's two lengths (``core.frames``': 4 bytes, big-endian): the frame's, then its header's
_LENGTHS = struct.Struct(">II")
#: masking rules remembered at most (one per model config; past it they are handed over again)
MAX_MASKINGS = 4096
#: bytes of requests (JSON bodies, decoded tensors) waiting at most, here and again in the writer (its bodies and
#: answers), unless ``--payload-log-queue-bytes`` says otherwise: a sink slower than traffic of large bodies (JSON
#: images) must drop events before the queue's count of them (``--payload-log-queue``) holds gigabytes
QUEUE_BYTES = 256 << 20


class Masking(Protocol):
    """A model's PII masking, as the writer process rebuilds it (``Masker.spec``)."""

    def spec(self) -> dict[str, Any]: ...


class PayloadCounts(Protocol):
    """What a sink reports, from any thread: events it took (``logged``), events its own bounded buffer had no room
    for (``dropped``) and events it lost (``failed``)."""

    def logged(self, count: int) -> None: ...

    def dropped(self, count: int) -> None: ...

    def failed(self, count: int, reason: str) -> None: ...


class PayloadSink(Protocol):
    """Where rendered events go. ``write`` runs in the writer's thread; it may report later (a Kafka delivery)."""

    #: how the metrics and the log name it: file, kafka or http
    kind: str
    #: how often ``idle`` must be called while nothing is queued (None: it has nothing to do then, and the sink's
    #: thread sleeps until events come)
    idle_s: float | None

    def write(self, events: list[tuple[str, bytes]], counts: PayloadCounts) -> None:
        """Hand over (key, CloudEvent JSON) pairs; report each as logged or failed, now or when known."""

    def idle(self) -> None:
        """Called every ``idle_s`` when nothing is queued (a Kafka producer serves its delivery reports)."""

    def close(self, timeout_s: float) -> None:
        """Deliver what is pending (at most ``timeout_s``) and release the sink."""


def _plain(value: Any) -> Any:
    """What orjson does not write by itself: text tensors' bytes, arrays it cannot take as they are."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def encode_frame(document: Any) -> bytes:
    """A frame of the pipes between the server and its writer: a 4-byte big-endian length, then JSON."""
    return frame(_json(document))


def _json(document: Any) -> bytes:
    try:
        return orjson.dumps(document, default=_plain, option=_NUMPY)
    except TypeError:  # an array orjson refuses as it is (not native-endian): as lists
        return orjson.dumps(_lists(document), default=_plain, option=_NUMPY)


def frame_events(maskings: list[Any], clock: float, events: list[Any], bodies: list[bytes]) -> bytes:
    """The payload log's frame: a 4-byte length, then ``[maskings, clock, events]`` as JSON (``clock``: what makes
    the events' ``perf_counter`` times Unix times), then ``bodies`` as they are: the JSON bodies and answers of the
    events whose ``inputs`` or ``outputs`` is a number (their length), in the events' order, an event's body
    before its answer."""
    header = _json([maskings, clock, events])
    # both lengths in front, then every piece joined once (the bodies are most of a frame: copied once, not twice)
    size = HEADER_SIZE + len(header) + sum(map(len, bodies))
    return b"".join([_LENGTHS.pack(size, len(header)), header, *bodies])


def read_events(body: bytes) -> tuple[list[Any], list[Any]]:
    """A ``frame_events`` frame's body: its maskings and its events, each with its Unix ``time``, and its JSON body
    (bytes) in ``inputs`` and its JSON answer (bytes) in ``outputs`` where it had them."""
    end = HEADER_SIZE + decode_frame_length(body[:HEADER_SIZE])
    maskings, clock, events = orjson.loads(body[HEADER_SIZE:end])
    for event in events:
        event[TIME] += clock
        size = event[INPUTS]
        if type(size) is int:
            event[INPUTS] = body[end : end + size]
            end += size
        size = event[OUTPUTS]
        if type(size) is int:
            event[OUTPUTS] = body[end : end + size]
            end += size
    return maskings, events


def _lists(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_lists(item) for item in value]
    return value


class PayloadLog(WriterPipe):
    """The bounded queue in front of the writer process (``command``, given the sink's ``url``), and the thread
    that reads its counts."""

    what = "payload log"
    metrics = (
        "dhow_payload_log_events",
        "Payload events by outcome: logged (the sink took it), dropped (the queue was full), failed (the sink "
        "refused or lost it)",
        "dhow_payload_log_queued",
        "Payload events waiting for the sink",
    )
    by_sink = True

    def __init__(
        self,
        url: str,
        *,
        capacity: int,
        source: str,
        command: Sequence[str],
        registry: CollectorRegistry | None = None,
        close_timeout_s: float = 5.0,
        priority: str = "idle",
        capacity_bytes: int = QUEUE_BYTES,
    ) -> None:
        #: the bytes of the requests queued at most (``QUEUE_BYTES``), and those queued (about: a close on another
        #: thread counts them out as the loop queues)
        self.capacity_bytes = capacity_bytes
        self._bytes = 0
        self._maskings: dict[Masking, int] = {}
        #: per model: the config its masking's number was found for, and the number (one lookup an answer)
        self._by_config: dict[str, tuple[Any, int | None]] = {}
        #: a model's masking by its config (``use_masking``: the data plane's, which holds the masking key)
        self._masking_of: Callable[[Any], Masking] | None = None
        self._masking_count = 0
        self._new_maskings: list[tuple[int, dict[str, Any]]] = []
        #: held while a masking is numbered and while the frame takes the new ones: ``offer`` on the loop and a
        #: close's ``_frame`` on its own thread may both number one (a number is published, in ``_maskings``, only
        #: once its rules are among those to hand over)
        self._numbering = threading.Lock()
        #: models whose masking could not be made for an answered request (logged once each)
        self._unmasked: set[str] = set()
        settings = {"url": url, "source": source, "priority": priority, "capacity_bytes": capacity_bytes}
        super().__init__(command, settings, capacity=capacity, registry=registry, close_timeout_s=close_timeout_s)

    def use_masking(self, masking_of: Callable[[Any], Masking]) -> None:
        """How an ``answered`` request's masking is found from its model's config (the data plane's, once)."""
        self._masking_of = masking_of

    # -- the request's path (the event loop's thread) --

    def answered(
        self, placement: Answered, start: float, request: InferenceRequest, response: InferenceResponse
    ) -> None:
        """An answered request's event, or dropped and counted when the queue is full: never waits. ``placement``:
        its model's config, data region, version and caller (with an id); ``start``: the ``perf_counter`` when it
        reached the data plane. The request's path only queues what it holds: the event (``FIELDS``) is made with
        the others when the frame is (``_frame``), in one loop: cheaper there than one by one between requests.

        For a request that came as a JSON body, the item is left in ``request.payload_item``: the door that then
        sends the answer as JSON puts those bytes at ``ANSWER``, in place of the answer (whose tensors are then
        released on the request's path, where they are at hand, and never written again)."""
        queue = self._queue
        # the request's JSON body, else its decoded tensors (not the request: a body's decoded arrays are not kept)
        body = request.json_body
        # (a JSON request's answer, the JSON the door sends, is counted by the writer: here it would cost every
        # answer a loop over its tensors, ~1.6k instructions of the event loop's)
        size = len(body) if body is not None else _tensor_bytes(request.inputs) + _tensor_bytes(response.outputs)
        # (counted here: a close may empty the queue meanwhile; an event larger than the bound alone goes into an
        # empty queue: a bound set below one request must not drop them all)
        if len(queue) >= self.capacity or self._gone or (self._bytes and self._bytes + size > self.capacity_bytes):
            self._refuse()
            return
        self._bytes += size
        item = [placement, start, time.perf_counter(), request.parameters, request.inputs if body is None else body,
                len(request.inputs), response.model_version, response]  # fmt: skip
        if body is not None:  # (``ANSWER`` is its last place: the door writes ``item[-1]``)
            request.payload_item = item
        queue.append(item)
        if not self._scheduled:
            self._schedule()

    def offer(self, event: list[Any], masking: Masking) -> None:
        """Queue an event (``FIELDS``), or drop and count it when the queue is full: never waits."""
        size = _offered_bytes(event)
        if self._refused():
            return
        if self._bytes and self._bytes + size > self.capacity_bytes:
            self._refuse()
            return
        self._bytes += size
        number = self._maskings.get(masking)
        if number is None:
            number = self._masking_number(masking)
        event.append(number)
        self._put((event,))  # (a tuple: an ``answered`` item is a list)

    def _took(self, items: list[Any], everything: bool) -> None:
        if everything:
            self._bytes = 0
        else:  # (a chunk: a writer behind; about what was counted in, the answer's bytes for its tensors: exact
            # again once the queue is taken whole)
            self._bytes = max(0, self._bytes - sum(map(_item_bytes, items)))

    def _masking_number(self, masking: Masking) -> int:
        """A number for the model's masking, its rules handed over with the next frame (once per masking)."""
        spec = masking.spec()
        with self._numbering:
            number = self._maskings.get(masking)  # (numbered meanwhile by the other thread)
            if number is not None:
                return number
            if len(self._maskings) >= MAX_MASKINGS:  # config reloads: the old ones are handed over again if used
                self._maskings.clear()
                self._by_config.clear()
            self._masking_count += 1
            number = self._masking_count
            self._new_maskings.append((number, spec))
            self._maskings[masking] = number
        return number

    def _config_number(self, config: Any) -> int | None:
        """The number of a model's masking, found by its config (a model not seen before, or reloaded); None when
        it cannot be made (logged once per model, and remembered for the config: its events fail, the frame's
        others go)."""
        number: int | None = None
        try:
            if self._masking_of is None:
                raise RuntimeError("PayloadLog.answered needs use_masking first")
            masking = self._masking_of(config)
            number = self._maskings.get(masking)
            if number is None:
                number = self._masking_number(masking)
        except Exception:
            if config.name not in self._unmasked:
                self._unmasked.add(config.name)
                self._log.exception("model %s: its masking could not be made; its payload events fail", config.name)
        self._by_config[config.name] = (config, number)
        return number

    def _frame(self, items: list[Any]) -> bytes:
        """Every queued item as one frame (``_flush`` and ``close`` take them all), each made an event here: an
        answered request's from what it holds (one whose model's masking cannot be made is counted failed instead,
        ``_unframed``), an offered event's as it is. A JSON body and a JSON answer go after the events, as they
        came (the event holds their lengths, and the body's number of tensors)."""
        events: list[Any] = []
        bodies: list[bytes] = []
        by_config = self._by_config
        # the frame's items are cold (queued up to ``FLUSH_S`` ago): each look-up and call here costs more than its
        # instructions, so the usual model's masking number is kept from one item to the next, and the event made
        # by plain statements, not comprehensions (each a function made and called)
        last: Any = None
        number: int | None = None
        for item in items:
            if type(item) is list:  # an answered request (``answered``)
                (config, region, _, caller), start, end, parameters, inputs, tensors, version, answer = item
                if config is not last:
                    known = by_config.get(config.name)
                    number = known[1] if known is not None and known[0] is config else self._config_number(config)
                    last = config
                if number is None:  # its masking could not be made: failed, not handed over
                    self._failed.inc()
                    self._unframed += 1
                    continue
                if type(inputs) is list:  # decoded tensors (gRPC, the binary extension), written as lists
                    event = [
                        caller.request_id, config.name, version, caller.principal, caller.tenant, region,
                        "success", "", start, end - start, parameters,
                        [[t.name, t.datatype, t.shape, t.data] for t in inputs], None, number,
                    ]  # fmt: skip
                else:  # a JSON body: after the events, as it came (its length, then its number of tensors)
                    bodies.append(inputs)
                    event = [
                        caller.request_id, config.name, version, caller.principal, caller.tenant, region,
                        "success", "", start, end - start, parameters, len(inputs), None, number, tensors,
                    ]  # fmt: skip
                if type(answer) is bytes:  # the JSON answer as the door sent it: after the body, as it is
                    bodies.append(answer)
                    event[OUTPUTS] = len(answer)
                else:
                    written = []
                    for tensor in answer.outputs:
                        written.append([tensor.name, tensor.datatype, tensor.shape, tensor.data])
                    event[OUTPUTS] = written
            else:
                event = item[0]
                inputs = event[INPUTS]
                if type(inputs) is tuple:  # a JSON body and its number of tensors
                    body, tensors = inputs
                    bodies.append(body)
                    event[INPUTS] = len(body)
                    event.append(tensors)
            events.append(event)
        with self._numbering:
            maskings, self._new_maskings = self._new_maskings, []
        clock = time.time() - time.perf_counter()
        try:
            try:
                return frame_events(maskings, clock, events, bodies)
            except (TypeError, RecursionError):  # an event JSON cannot hold (a client's parameters nested past
                # orjson's limit, or past Python's in ``_lists``)
                _writable(events)
                return frame_events(maskings, clock, events, bodies)
        except Exception:  # (the frame fails whole: its maskings go with the next one)
            with self._numbering:
                self._new_maskings[:0] = maskings
            raise


def _offered_bytes(event: list[Any]) -> int:
    """What ``offer`` counts in for an event: its request and its answer, if any."""
    return _event_bytes(event[INPUTS]) + _event_bytes(event[OUTPUTS])


def _item_bytes(item: Any) -> int:
    """What ``answered`` or ``offer`` counted in for a queued item (a JSON request: its body alone)."""
    if type(item) is tuple:  # an offered event
        return _offered_bytes(item[0])
    inputs = item[4]
    return len(inputs) if type(inputs) is bytes else _event_bytes(inputs) + _tensor_bytes(item[ANSWER].outputs)


def _writable(events: list[Any]) -> None:
    """Make every event JSON can hold: one it cannot (parameters nested past orjson's or Python's limits, a
    client's choice, answered all the same; or, should any reach it, text with a lone surrogate or an integer past
    64 bits, which the doors' decoders refuse today but a model's outputs may hold) keeps of its parameters what
    the writer would write of them anyway, the top-level scalars (``payload_render``: masked there by the model's
    rules, ``parameters.<name>``), with such text escaped and such an integer as its digits, and so its error
    message and its tensors' data: one request costs neither its own event nor the frame's others (an event still
    refused fails the frame: counted failed)."""
    for event in events:
        try:
            _json(event)
        except (TypeError, RecursionError):
            parameters = event[PARAMETERS]
            if isinstance(parameters, dict):
                event[PARAMETERS] = {
                    _escaped(str(name)): _scalar(value) for name, value in top_level(parameters).items()
                }
            if type(event[ERROR]) is str:
                event[ERROR] = _escaped(event[ERROR])
            for index in (INPUTS, OUTPUTS):
                if type(event[index]) is list:
                    event[index] = [[name, kind, shape, _scalars(data)] for name, kind, shape, data in event[index]]


def top_level(value: Any) -> Any:
    """Of a dict or a list, its text, numbers and booleans, what is nested in it left out (what an event shows of a
    request's parameters, ``payload_render``); anything else as it is."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if isinstance(v, str | int | float)}
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str | int | float)]
    return value


def _scalar(value: Any) -> Any:
    """A scalar parameter as JSON holds it: text escaped, an integer past 64 bits as its digits."""
    if isinstance(value, str):
        return _escaped(value)
    if type(value) is int and not -(2**63) <= value < 2**64:
        return str(value)
    return value


def _scalars(value: Any) -> Any:
    """An array's or a list's items as JSON holds them (``_scalar``; bytes as text), nested as they were."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_scalars(item) for item in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return _escaped(bytes(value).decode("utf-8", "replace"))
    return _scalar(value)


def _escaped(text: str) -> str:
    """``text`` with what UTF-8 cannot hold (a lone surrogate) as its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
