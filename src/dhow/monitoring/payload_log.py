"""Payload logging: every inference's masked inputs and outputs, and every error, to a sink, off the hot path.

The data plane ``offer``s one ``PayloadEvent`` per request: a bounded deque append, never a wait. A thread
takes what is queued, masks it (the event carries its model's masker), renders each as a CloudEvent (JSON)
and hands them to the sink (``payload_sinks``: a rotating JSON Lines file, a Kafka topic, an HTTP endpoint).
A full queue drops the event and counts it; a sink that fails counts it as failed; one that took it counts it
as logged. Unlike a logger that buffers without bound, a slow sink costs dropped events, never memory or
latency (``dhow_payload_log_events_total{outcome="dropped"}`` says how many).
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["EVENT_TYPES", "PayloadCounts", "PayloadEvent", "PayloadLog", "PayloadSink", "cloud_event"]

log = logging.getLogger("dhow.payload_log")

#: the CloudEvents ``type`` of an answered request and of a failed one
EVENT_TYPES = {True: "io.dhow.inference.response", False: "io.dhow.inference.error"}
#: how long the writer sleeps when nothing is queued (no signal per event: offering stays one append)
_IDLE_S = 0.02
#: events rendered and handed to the sink at once
_CHUNK = 512

Mask = Callable[[Mapping[str, Any]], dict[str, Any]]


@dataclass(slots=True)
class PayloadEvent:
    """One request as the data plane saw it; masked and rendered later, in the writer's thread."""

    request_id: str
    model: str
    version: str
    principal: str
    tenant: str
    data_region: str
    #: "success", or the error's code (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, INTERNAL, ...)
    outcome: str
    #: the error's message (as the client got it); "" on success
    error: str
    #: when the request reached the data plane (Unix time) and how long it took
    time: float
    latency_s: float
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray] | None
    parameters: Mapping[str, Any]
    #: the model's PII masking of named tensors (its ``pii:`` rules)
    mask: Mask


#: event ids: a random prefix per process and a count, unique per source without a random draw per event
_ID_PREFIX = secrets.token_hex(6)
_ids = itertools.count(1)


def cloud_event(event: PayloadEvent, source: str) -> dict[str, Any]:
    """The event in CloudEvents 1.0 structured form: ``id`` unique per event, ``subject`` the model and version."""
    data: dict[str, Any] = {
        "request_id": event.request_id,
        "model": event.model,
        "version": event.version,
        "principal": event.principal,
        "tenant": event.tenant,
        "data_region": event.data_region,
        "outcome": event.outcome,
        "latency_ms": round(event.latency_s * 1000, 3),
        "parameters": {k: v for k, v in event.parameters.items() if isinstance(v, str | int | float | bool)},
        "inputs": event.mask(event.inputs),
    }
    if event.outputs is not None:
        data["outputs"] = event.mask(event.outputs)
    if event.error:
        data["error"] = event.error
    return {
        "specversion": "1.0",
        "id": f"{_ID_PREFIX}-{next(_ids)}",
        "source": source,
        "type": EVENT_TYPES[event.outcome == "success"],
        "subject": f"{event.model}/{event.version}" if event.version else event.model,
        "time": _rfc3339(event.time),
        "datacontenttype": "application/json",
        "data": data,
    }


_second: tuple[int, str] = (0, "")


def _rfc3339(unix: float) -> str:
    global _second
    whole = int(unix)
    if _second[0] != whole:  # events of one second share its formatting (only the writer's thread calls this)
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{min(999_999, round((unix - whole) * 1e6)):06d}Z"


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

    def write(self, events: list[tuple[str, bytes]], counts: PayloadCounts) -> None:
        """Hand over (key, CloudEvent JSON) pairs; report each as logged or failed, now or when known."""

    def idle(self) -> None:
        """Called when nothing is queued (a Kafka producer serves its delivery reports)."""

    def close(self, timeout_s: float) -> None:
        """Deliver what is pending (at most ``timeout_s``) and release the sink."""


class PayloadLog:
    """The bounded queue in front of one sink, and the thread that drains it."""

    def __init__(
        self, sink: PayloadSink, *, capacity: int, source: str, registry: CollectorRegistry | None = None
    ) -> None:
        self.sink = sink
        self.capacity = capacity
        self.source = source
        self._queue: collections.deque[PayloadEvent] = collections.deque()
        events = Counter(
            "dhow_payload_log_events",
            "Payload events by outcome: logged (the sink took it), dropped (the queue was full), failed (the sink "
            "refused or lost it)",
            ["sink", "outcome"],
            registry=registry,
        )
        self._logged = events.labels(sink.kind, "logged")
        self._dropped = events.labels(sink.kind, "dropped")
        self._failed = events.labels(sink.kind, "failed")
        self._queued = Gauge(
            "dhow_payload_log_queued",
            "Payload events waiting for the sink",
            ["sink"],
            registry=registry,
            multiprocess_mode="livesum",
        ).labels(sink.kind)
        self._stopping = threading.Event()
        self._last_failure = 0.0
        self._thread = threading.Thread(target=self._drain, name=f"dhow-payload-log-{sink.kind}", daemon=True)
        self._thread.start()

    def offer(self, event: PayloadEvent) -> None:
        """Queue an event, or drop and count it when the queue is full: never waits (the request's path)."""
        if len(self._queue) >= self.capacity:
            self._dropped.inc()
            return
        self._queue.append(event)

    # -- PayloadCounts, called by the sink --

    def logged(self, count: int) -> None:
        self._logged.inc(count)

    def dropped(self, count: int) -> None:
        self._dropped.inc(count)

    def failed(self, count: int, reason: str) -> None:
        self._failed.inc(count)
        now = time.monotonic()
        if now - self._last_failure > 10:  # one line per ten seconds: a sink that is down must not flood the log
            self._last_failure = now
            log.warning("payload log: %d event(s) to the %s sink failed: %s", count, self.sink.kind, reason)

    # -- the writer's thread --

    def _drain(self) -> None:
        while True:
            if not self._queue:
                if self._stopping.is_set():
                    return
                self.sink.idle()
                self._stopping.wait(_IDLE_S)
                continue
            chunk = [self._queue.popleft() for _ in range(min(_CHUNK, len(self._queue)))]
            self._queued.set(len(self._queue))
            rendered: list[tuple[str, bytes]] = []
            for event in chunk:
                try:
                    rendered.append((event.request_id, orjson.dumps(cloud_event(event, self.source))))
                except Exception as exc:  # a value masking or JSON cannot take: that event fails, not the others
                    self.failed(1, f"could not render the event of request {event.request_id}: {exc!r}")
            if rendered:
                try:
                    self.sink.write(rendered, self)
                except Exception as exc:
                    self.failed(len(rendered), repr(exc))

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then deliver what the sink holds, within about ``timeout_s``."""
        self._stopping.set()
        self._thread.join(timeout_s)
        self.sink.close(timeout_s)
