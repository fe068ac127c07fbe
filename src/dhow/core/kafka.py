"""One Kafka producer (librdkafka through ``confluent-kafka``, the optional extras ``kafka``/``payload-kafka``) for
the two layers that write to Kafka: the stream door's replies (``streaming/kafka.py``) and the payload log's
sink (``monitoring/payload_sinks.py``). It lives in core, as the v2 codec does, because it is the one layer both
may import.

What it settles once: the settings librdkafka refuses become an ``InvalidInput`` naming the destination; many
messages are queued in one tight loop that stops (and says how far it got) when the client's queue is full
instead of raising, and that hands a message the client refuses to the caller and goes on, if asked; delivery
reports are served by whoever polls, or by a thread of its own (``serve_reports``); closing stops that thread
before the last flush, so reports are never served by two threads at once (a report callback may then keep plain
counters without a lock).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from dhow.core.errors import InvalidInput

__all__ = ["DeliveryReport", "KafkaProducer", "OutgoingMessage"]

#: called once per message with the broker's verdict: (error or None, message)
DeliveryReport = Callable[[Any, Any], None]
#: the partitioner's choice (librdkafka's RD_KAFKA_PARTITION_UA), as ``produce`` takes it when none is given
_ANY_PARTITION = -1
#: value, key, headers (a list of (name, bytes, str or None), as the client takes them)
OutgoingMessage = tuple[bytes, bytes | str | None, Any]


class KafkaProducer:
    def __init__(self, settings: dict[str, Any], *, what: str, needs: str = "pip install 'dhow[kafka]'") -> None:
        """``what`` names the destination in errors (``--sink kafka://…``); ``needs``: how to install the client."""
        try:
            from confluent_kafka import Producer
        except ImportError:  # pragma: no cover - an optional dependency
            raise InvalidInput(f"{what} needs confluent-kafka: {needs}") from None
        try:
            self.client = Producer(settings)
        except Exception as exc:  # librdkafka names the setting it refuses
            raise InvalidInput(f"{what}: {exc}") from None
        self._closing = threading.Event()
        self._reports: threading.Thread | None = None

    def produce_many(
        self,
        topic: str,
        messages: Sequence[OutgoingMessage],
        on_delivery: DeliveryReport,
        on_refused: Callable[[int, Exception], None] | None = None,
    ) -> int:
        """Queue messages in order until the client's queue is full: how many were taken (each queued one is
        reported to ``on_delivery`` once the broker acknowledged or refused it). A message the client refuses
        outright (too large, an unknown topic) raises ``KafkaException``; given ``on_refused``, it is handed to it
        instead (its index and the error), counted as taken, and the next ones are queued."""
        produce = self.client.produce
        taken = 0
        for value, key, headers in messages:
            try:
                # positional (topic, value, key, partition, on_delivery, its alias, timestamp, headers): the client
                # looks each keyword up in the call's dict by name, a third of the call's instructions
                produce(topic, value, key, _ANY_PARTITION, on_delivery, None, 0, headers)
            except BufferError:  # the client's queue is full: the broker is slower than we are
                break
            except Exception as exc:
                if on_refused is None:
                    raise
                on_refused(taken, exc)
            taken += 1
        return taken

    def poll(self, timeout_s: float = 0.0) -> None:
        """Serve the delivery reports that came (on the caller's thread)."""
        self.client.poll(timeout_s)

    def serve_reports(self, name: str) -> None:
        """Serve delivery reports on a thread of their own until ``close``."""
        if self._reports is None:
            self._reports = threading.Thread(target=self._serve, name=name, daemon=True)
            self._reports.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            self.client.poll(0.05)

    def close(self, timeout_s: float) -> int:
        """Deliver what is queued (for up to ``timeout_s``): how many messages were left undelivered. Blocks."""
        self._closing.set()
        if self._reports is not None:
            self._reports.join()
        return int(self.client.flush(timeout_s))
