"""The sinks of the payload log, each named by a URL (``--payload-log``):

- ``file:///var/log/dhow/payloads.jsonl?max_bytes=104857600&backups=5`` (its path percent-decoded, its query the
  options; or a plain path, the file name as written, with the default options): JSON Lines, one CloudEvent a
  line, rotated at ``max_bytes`` into ``.1`` … ``.<backups>`` as logrotate would;
- ``kafka://broker1:9092,broker2:9092/topic?acks=all``: one message per event (key: the request id, header
  ``content-type: application/cloudevents+json``: the CloudEvents Kafka binding's structured mode); every query
  parameter is a librdkafka producer setting (``security.protocol``, ``message.timeout.ms``, ...);
- ``http://collector:8080/events`` (or https): CloudEvents over HTTP, a batch per POST
  (``application/cloudevents-batch+json``), or ``?mode=structured`` for one event per POST (Knative brokers).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import httpx

from dhow.core.errors import InvalidInput
from dhow.core.file_urls import local_path
from dhow.monitoring.payload_log import PayloadCounts, PayloadSink

__all__ = ["FileSink", "HttpSink", "KafkaSink", "open_sink", "worker_sink_url"]

_CLOUDEVENT = "application/cloudevents+json"
_FILE_OPTIONS = {"max_bytes", "backups"}


def open_sink(url: str) -> PayloadSink:
    """The sink a ``--payload-log`` URL names; a URL it cannot use is refused saying what is expected."""
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query))
    if not parts.scheme:  # a plain path: the file name as written, "?" and "#" included (options need file://)
        return FileSink(_plain_file(url), **_file_options({}, url))
    if parts.scheme == "file":
        return FileSink(Path(local_path(url, "--payload-log", query=True)), **_file_options(options, url))
    if parts.scheme == "kafka":
        topic = parts.path.strip("/")
        if not parts.netloc or not topic or "/" in topic:
            raise InvalidInput(f"--payload-log {url!r}: expected kafka://HOST:PORT[,HOST:PORT]/TOPIC")
        return KafkaSink(parts.netloc, topic, options)
    if parts.scheme in ("http", "https"):
        mode = options.pop("mode", "batch")
        if mode not in ("batch", "structured"):
            raise InvalidInput(f"--payload-log {url!r}: mode must be batch or structured, got {mode!r}")
        timeout = _number(options.pop("timeout", "5"), "timeout", url)
        endpoint = parts._replace(query="&".join(f"{k}={v}" for k, v in options.items())).geturl()
        return HttpSink(endpoint, batch=mode == "batch", timeout_s=timeout)
    raise InvalidInput(
        f"--payload-log {url!r}: expected file:///PATH.jsonl, kafka://HOST:PORT/TOPIC or http(s)://HOST/PATH"
    )


def worker_sink_url(url: str, worker: int) -> str:
    """The sink of worker ``worker`` of several sharing the ports: a file of its own (``events.worker-2.jsonl``:
    two processes rotating one file would lose lines); Kafka and HTTP sinks take several producers as they are."""
    parts = urlsplit(url)
    if parts.scheme not in ("", "file") or not url:
        return url
    if not parts.scheme:
        try:
            return str(_worker_file(_plain_file(url), worker))
        except InvalidInput:
            return url  # refused when the worker opens its sink, as the user wrote it
    try:
        path = Path(local_path(url, "--payload-log", query=True))
    except InvalidInput:
        return url  # refused when the worker opens its sink, as the user wrote it (the message shows their URL)
    if not path.name:
        return url  # refused when the worker opens its sink: a file sink needs a file name
    # the name read decoded, the URL's path encoded again (the same path decoded: what the worker opens)
    return parts._replace(path=quote(os.fsencode(_worker_file(path, worker)), safe="/")).geturl()


def _plain_file(url: str) -> Path:
    """The file a plain path names, as written; refused when what follows its ``?`` reads as the file sink's
    options (``e.jsonl?max_bytes=1000``): as a name, it would silently be a file of that name with the default
    options. The refusal shows the file URL that holds them (``file:///…/e.jsonl?max_bytes=1000``)."""
    name = url.rfind("/") + 1  # (a '?' in a folder's name is that folder's)
    at = url.rfind("?")
    while at >= name:  # each '?' of the file's name, the last first
        if {key for key, _ in parse_qsl(url[at + 1 :])} & _FILE_OPTIONS:
            meant = "file://" + quote(os.fsencode(os.path.abspath(url[:at])), safe="/") + url[at:]
            raise InvalidInput(
                f"--payload-log {url!r}: a plain path is the file name as written, '?' included; the file's options "
                f"go in a file URL's query: {meant}"
            )
        at = url.rfind("?", name, at)
    return Path(url)


def _worker_file(path: Path, worker: int) -> Path:
    return path.with_name(f"{path.stem}.worker-{worker}{path.suffix}") if path.name else path


def _number(value: str, name: str, url: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number <= 0:
        raise InvalidInput(f"--payload-log {url!r}: {name} must be a positive number, got {value!r}")
    return number


def _file_options(options: dict[str, str], url: str) -> dict[str, int]:
    unknown = set(options) - _FILE_OPTIONS
    if unknown:
        raise InvalidInput(f"--payload-log {url!r}: unknown option(s) {sorted(unknown)}; known: max_bytes, backups")
    return {
        "max_bytes": int(_number(options.get("max_bytes", str(100 * 1024 * 1024)), "max_bytes", url)),
        "backups": int(_number(options.get("backups", "5"), "backups", url)),
    }


class FileSink:
    """JSON Lines, rotated by size (``payloads.jsonl`` → ``.1`` → … → ``.<backups>``, the oldest removed)."""

    kind = "file"
    idle_s: float | None = None

    def __init__(self, path: Path, *, max_bytes: int, backups: int) -> None:
        if not path.name:
            raise InvalidInput("--payload-log: a file sink needs a file name, e.g. file:///var/log/dhow/payloads.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file = path.open("ab")
        self._size = self._file.tell()

    def write(self, events: list[tuple[str, bytes]], counts: PayloadCounts) -> None:
        try:
            lines = b"\n".join([event for _, event in events]) + b"\n"
            if self._size + len(lines) <= self.max_bytes:  # most chunks: one write, no line by line
                self._file.write(lines)
                self._size += len(lines)
            else:
                self._write_rotating(events)
            self._file.flush()
        except OSError as exc:
            counts.failed(len(events), f"{self.path}: {exc}")
            return
        counts.logged(len(events))

    def _write_rotating(self, events: list[tuple[str, bytes]]) -> None:
        """Line by line, rotating before the line that would take the file past ``max_bytes``."""
        for _, event in events:
            if self._size and self._size + len(event) + 1 > self.max_bytes:
                self._rotate()
            self._file.write(event + b"\n")
            self._size += len(event) + 1

    def _rotate(self) -> None:
        self._file.close()
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = self.path.open("ab")
        self._size = 0

    def idle(self) -> None:
        pass

    def close(self, timeout_s: float) -> None:
        self._file.close()


class KafkaSink:
    """A confluent-kafka (librdkafka) producer: asynchronous, each event reported when the broker acknowledges it."""

    kind = "kafka"
    #: how often its delivery reports are served when nothing else is to do
    idle_s: float | None = 0.02

    def __init__(self, brokers: str, topic: str, options: dict[str, str]) -> None:
        from dhow.core.kafka import KafkaProducer

        # librdkafka buffers up to 1 GB for an unreachable broker by default: 64 MB is the bound here (past it
        # events are dropped and counted, as when the payload log's own queue is full)
        settings: dict[str, Any] = {
            "bootstrap.servers": brokers,
            "linger.ms": 20,
            "compression.type": "lz4",
            "queue.buffering.max.kbytes": 65536,
        }
        settings.update(options)
        self._producer = KafkaProducer(
            settings, what=f"--payload-log kafka://{brokers}/{topic}", needs="pip install 'dhow[payload-kafka]'"
        )
        self.topic = topic
        self._counts: PayloadCounts | None = None

    def write(self, events: list[tuple[str, bytes]], counts: PayloadCounts) -> None:
        self._counts = counts
        headers = [("content-type", _CLOUDEVENT)]
        # (never raises once an event is queued: the writer counts what ``write`` raises as failed, all the events
        # it was given, and the queued ones are counted by their delivery reports)
        taken = self._producer.produce_many(
            self.topic, [(event, key, headers) for key, event in events], self._delivered, self._refused
        )
        if taken < len(events):  # librdkafka's own buffer is full (the brokers are away or slow): dropped, counted
            counts.dropped(len(events) - taken)
        try:
            self._producer.poll()
        except Exception as exc:  # (the reports it served are counted, the others come with the next poll)
            counts.failed(0, f"the kafka sink failed serving delivery reports: {exc!r}")

    def _refused(self, index: int, error: Exception) -> None:
        """An event the client refused outright (larger than ``message.max.bytes``): it alone fails."""
        if self._counts is not None:
            self._counts.failed(1, f"refused by the Kafka client: {error}")

    def _delivered(self, error: Any, message: Any) -> None:
        if self._counts is None:
            return
        if error is None:
            self._counts.logged(1)
        else:
            self._counts.failed(1, str(error))

    def idle(self) -> None:
        self._producer.poll()

    def close(self, timeout_s: float) -> None:
        left = self._producer.close(timeout_s)
        if left and self._counts is not None:
            self._counts.failed(left, f"not acknowledged within {timeout_s:g} s at shutdown")


class HttpSink:
    """CloudEvents over HTTP: a batch per POST, or one structured event per POST; a non-2xx answer fails them."""

    kind = "http"
    idle_s: float | None = None

    def __init__(self, endpoint: str, *, batch: bool, timeout_s: float) -> None:
        self.endpoint = endpoint
        self.batch = batch
        self._client = httpx.Client(timeout=timeout_s)

    def write(self, events: list[tuple[str, bytes]], counts: PayloadCounts) -> None:
        if self.batch:
            body = b"[" + b",".join(event for _, event in events) + b"]"
            self._post(body, "application/cloudevents-batch+json", len(events), counts)
            return
        for _, event in events:
            self._post(event, _CLOUDEVENT, 1, counts)

    def _post(self, body: bytes, content_type: str, count: int, counts: PayloadCounts) -> None:
        try:
            answer = self._client.post(self.endpoint, content=body, headers={"content-type": content_type})
        # (any error, not httpx's alone: one event per POST, the events posted before it are counted already, and
        # what ``write`` raises the writer counts failed, all of them)
        except Exception as exc:
            counts.failed(count, f"{self.endpoint}: {exc!r}")
            return
        if answer.is_success:
            counts.logged(count)
        else:
            counts.failed(count, f"{self.endpoint} answered {answer.status_code}")

    def idle(self) -> None:
        pass

    def close(self, timeout_s: float) -> None:
        self._client.close()
