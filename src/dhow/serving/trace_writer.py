"""Tracing's writer process: makes the spans of the requests a server traced, writes them as OTLP protobuf and
posts them to the collector, off the server's interpreter.

``python -m dhow.serving.trace_writer`` is run by ``monitoring.tracing.Tracing`` (``writer_main``'s loop): its
settings are the collector's ``url``, the ``service`` name, ``capacity`` and ``close_timeout_s``; then it takes
frames of finished requests (``tracing.Record``). The payload writer's queue and sink thread carry them (at most
``capacity`` waiting, past it dropped and counted); a step's spans (64 requests or more, ``Writer._render_steps``) are
written at once from its records (``trace_chunk.chunk_fields``; one that cannot be fails alone), and the steps of
up to 512 requests are one export, posted with ``http.client``, about one a second. Counts of exported and failed
requests go back to the server.
"""

from __future__ import annotations

import http.client
import sys
from operator import itemgetter
from typing import Any
from urllib.parse import urlsplit

from dhow.monitoring.otlp import export_request_of, resource_bytes
from dhow.monitoring.payload_log import PayloadCounts
from dhow.monitoring.trace_chunk import chunk_fields
from dhow.monitoring.tracing import record_fields
from dhow.serving.payload_writer import Writer
from dhow.serving.writer_main import Answer, serve

__all__ = ["OtlpSink", "TraceWriter", "main"]


class OtlpSink:
    """The collector (OTLP/HTTP): one post per chunk of requests, over one connection (opened again after an error)."""

    kind = "otlp"
    idle_s: float | None = None

    def __init__(self, url: str, service: str) -> None:
        self.url = url
        self._resource = resource_bytes(service)
        target = urlsplit(url)
        kind = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
        self._connection = kind(target.netloc, timeout=10)
        self._path = target.path or "/"

    def write(self, events: list[tuple[str, bytes]], counts: PayloadCounts) -> None:
        body = export_request_of(self._resource, "dhow", b"".join(fields for _, fields in events))
        try:
            self._connection.request("POST", self._path, body, {"content-type": "application/x-protobuf"})
            answer = self._connection.getresponse()
            answer.read()
            failure = "" if 200 <= answer.status < 300 else f"the collector answered {answer.status}"
        except (OSError, http.client.HTTPException) as exc:
            self._connection.close()  # the next export connects again
            failure = repr(exc)
        if failure:
            counts.failed(len(events), f"not exported to {self.url}: {failure}")
        else:
            counts.logged(len(events))

    def idle(self) -> None:
        pass

    def close(self, timeout_s: float) -> None:
        self._connection.close()


class TraceWriter(Writer):
    """The payload writer's queue and sink thread, for traced requests: rendered as their spans, sent a second apart."""

    pause_s = 1.0

    def take(self, frame: list[Any]) -> None:
        self.queue(frame)

    def render_chunk(self, chunk: list[Any]) -> tuple[list[tuple[str, bytes]], list[tuple[Any, Exception]]]:
        """A step's spans written at once (``chunk_fields``), held by its first request (the sink joins them and
        counts requests); a chunk with a record that cannot be written is written one record at a time, and that
        record fails alone."""
        if not chunk:
            return [], []
        try:
            fields = chunk_fields(chunk)
        except Exception:  # which record: ``records`` finds it, and it alone fails
            return self.records(chunk)
        keys = list(map(str, map(itemgetter(4), chunk)))
        return list(zip(keys, [fields] + [b""] * (len(chunk) - 1), strict=True)), []

    def records(self, chunk: list[Any]) -> tuple[list[tuple[str, bytes]], list[tuple[Any, Exception]]]:
        """The chunk's records written one by one: one that cannot be is a failure of its own."""
        rendered, failures = [], []
        for record in chunk:
            try:
                rendered.append((str(record[4]), record_fields(record)))
            except Exception as exc:  # a record that cannot be written: that one fails, not the others
                failures.append((record, exc))
        return rendered, failures


def _open(settings: dict[str, Any], answer: Answer) -> TraceWriter:
    sink = OtlpSink(str(settings["url"]), str(settings["service"]))
    return TraceWriter(sink, capacity=int(settings["capacity"]), source="", report=answer)


def main() -> int:
    return serve(_open, "--otlp-endpoint")


if __name__ == "__main__":
    sys.exit(main())
