"""One stream consumer's settings: the same for ``dhow stream run`` and a ``streams:`` entry of ``dhow serve``'s
settings file, checked here once.

    streams:
      - model: tabular            # NAME or NAME:VERSION
        source: kafka://127.0.0.1:9092/requests
        sink: kafka://127.0.0.1:9092/replies
        dead_letter: kafka://127.0.0.1:9092/requests.dlq
        group: scoring            # default dhow.<name>
        format: json              # v2-json (default), v2-binary, json
        data_region: ae           # the source's data region, checked against --region at start
        exactly_once: false       # Kafka transactions (replies, dead letters and offsets committed together;
                                  # Kafka ends only: Kinesis has no transactions)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from dhow.core.errors import InvalidInput
from dhow.core.names import check_model_name, check_region_name
from dhow.streaming.endpoints import Endpoint, parse_endpoint
from dhow.streaming.formats import FORMATS

__all__ = ["ON_ERROR", "StreamSpec", "parse_model_ref", "parse_streams"]

#: what happens to a message that cannot be answered
ON_ERROR = ("dead-letter", "skip")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_FIELDS = (
    "name", "model", "source", "sink", "dead_letter", "group", "format", "on_error", "max_in_flight", "data_region",
    "exactly_once",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class StreamSpec:
    name: str
    model: str
    #: "" answers with the version the server routes to (the newest, or a deployment's choice)
    version: str
    source: Endpoint
    sink: Endpoint
    dead_letter: Endpoint | None
    group: str
    format: str = "v2-json"
    on_error: str = "dead-letter"
    #: messages read and not yet answered, at most; past it the source's partitions are paused
    max_in_flight: int = 1024
    #: the data region of the source's messages ("" = the model's)
    data_region: str = ""
    #: Kafka transactions: a batch's replies, dead letters and consumed offsets are committed together
    exactly_once: bool = False

    @classmethod
    def build(
        cls,
        *,
        model: str,
        source: str,
        sink: str,
        dead_letter: str = "",
        group: str = "",
        name: str = "",
        format: str = "v2-json",
        on_error: str = "",
        max_in_flight: int = 1024,
        data_region: str = "",
        exactly_once: bool = False,
        where: str = "",
    ) -> StreamSpec:
        """Check every field, saying ``where`` it came from; refuse a stream that could lose a bad message."""
        prefix = f"{where}: " if where else ""
        model_name, version = parse_model_ref(model, prefix)
        src = parse_endpoint(source, f"{prefix}source")
        out = parse_endpoint(sink, f"{prefix}sink")
        dlq = parse_endpoint(dead_letter, f"{prefix}dead_letter") if dead_letter else None
        name = name or f"{model_name}.{src.topic}"
        if not _NAME.match(name):
            raise InvalidInput(f"{prefix}stream name {name!r}: letters, digits, '.', '_' and '-' only")
        if format not in FORMATS:
            raise InvalidInput(f"{prefix}format {format!r}: expected one of {', '.join(FORMATS)}")
        if on_error and on_error not in ON_ERROR:
            raise InvalidInput(f"{prefix}on_error {on_error!r}: expected one of {', '.join(ON_ERROR)}")
        if dlq is None and on_error != "skip":
            raise InvalidInput(
                f"{prefix}stream {name!r} has no dead-letter destination: a message that cannot be answered would "
                "be lost; give one (--dead-letter kafka://HOST:PORT/TOPIC) or accept skipping them (--on-error skip)"
            )
        if dlq is not None and on_error == "skip":
            raise InvalidInput(f"{prefix}stream {name!r}: --on-error skip and a dead-letter destination; choose one")
        if {src.topic} & {out.topic, dlq.topic if dlq else ""} and src.servers == out.servers:
            raise InvalidInput(f"{prefix}stream {name!r} would write into the topic it reads ({src.topic!r})")
        if not 1 <= max_in_flight <= 1_000_000:
            raise InvalidInput(f"{prefix}max_in_flight must be between 1 and 1000000, got {max_in_flight}")
        region = check_region_name(data_region, f"{prefix}data_region") if data_region else ""
        if exactly_once:
            _check_exactly_once(f"{prefix}stream {name!r}", src, out, dlq)
        return cls(
            name, model_name, version, src, out, dlq, group or f"dhow.{name}", format,
            on_error or "dead-letter", max_in_flight, region, exactly_once,
        )  # fmt: skip


def _check_exactly_once(stream: str, source: Endpoint, sink: Endpoint, dead_letter: Endpoint | None) -> None:
    """Refuse what one Kafka transaction cannot cover: a Kinesis end, a dead-letter topic on other brokers."""
    kinesis = [what for what, end in (("source", source), ("sink", sink), ("dead_letter", dead_letter))
               if end is not None and end.scheme == "kinesis"]  # fmt: skip
    if kinesis:
        ends = " and ".join([", ".join(kinesis[:-1]), kinesis[-1]] if len(kinesis) > 1 else kinesis)
        raise InvalidInput(
            f"{stream}: exactly_once (--exactly-once) needs Kafka transactions and Kinesis has none: its {ends} "
            f"{'is a Kinesis stream' if len(kinesis) == 1 else 'are Kinesis streams'}; run it without "
            "--exactly-once (at-least-once: after a crash a reply may be written twice, never lost)"
        )
    if dead_letter is not None and dead_letter.servers != sink.servers:
        raise InvalidInput(
            f"{stream}: with exactly_once the dead-letter topic must be on the sink's brokers "
            f"({sink.servers}): one transaction writes both"
        )


def parse_model_ref(text: str, prefix: str = "") -> tuple[str, str]:
    """``NAME`` or ``NAME:VERSION`` (an integer)."""
    name, _, version = text.partition(":")
    if version and not version.isdigit():
        raise InvalidInput(f"{prefix}model {text!r}: the version after ':' must be an integer")
    return check_model_name(name), version


def parse_streams(data: object, where: str) -> tuple[StreamSpec, ...]:
    """The ``streams:`` list of a settings file (each entry a mapping of the fields above)."""
    if data is None or data == ():
        return ()
    if not isinstance(data, list | tuple):
        raise InvalidInput(f"{where}: 'streams' must be a list of streams (model, source, sink, ...)")
    specs = []
    for index, entry in enumerate(data):
        label = f"{where}: streams[{index}]"
        if not isinstance(entry, Mapping):
            raise InvalidInput(f"{label} must be a mapping (model, source, sink, ...), got {entry!r}")
        fields = {str(key).replace("-", "_"): value for key, value in entry.items()}
        unknown = sorted(set(fields) - set(_FIELDS))
        if unknown:
            raise InvalidInput(f"{label}: unknown field {unknown[0]!r} (known: {', '.join(_FIELDS)})")
        for needed in ("model", "source", "sink"):
            if not isinstance(fields.get(needed), str):
                raise InvalidInput(f"{label} needs '{needed}'")
        try:
            in_flight = int(fields.pop("max_in_flight", 1024))
        except (TypeError, ValueError):
            raise InvalidInput(f"{label}: max_in_flight must be an integer") from None
        once = fields.pop("exactly_once", False)
        if once not in (True, False, "true", "false"):
            raise InvalidInput(f"{label}: exactly_once must be true or false, got {once!r}")
        texts = {key: str(value) for key, value in fields.items() if value is not None}
        specs.append(StreamSpec.build(**texts, max_in_flight=in_flight, exactly_once=once in (True, "true"),
                                      where=label))  # fmt: skip
    names = [spec.name for spec in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidInput(f"{where}: two streams are named {twice[0]!r}; give each a distinct 'name'")
    return tuple(specs)
