"""The usual records' canonical JSON made column by column: what the audit writer process does most of its time.

The writer gets a server's records as rows (``AuditRecord.as_tuple``) and must write each as the canonical JSON of its
stored fields (``audit._record_json``, what its hash covers). Record by record that is a dozen Python steps (the
texts checked, the latency rounded, the time formatted, the JSON put together), and on the writer's core, shared
with the load and the model, a Python step costs far more than on a warm one (the writer wakes every few
milliseconds with cold caches). Here the usual rows, those whose texts are printable ASCII without a quote or a
backslash, with empty details, the time to be formatted from the clock and a latency JSON writes as ``repr`` does,
are made with one check over all their texts, the times in one loop, and all the lines by one ``%`` over a template:
byte for byte what ``_record_json(seq, _content(row))`` makes (the tests compare them). A batch with any other row
goes record by record.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = ["plain_lines", "second_text"]

#: a usual record's canonical JSON (the keys sorted), its values in this order: action, actor, at (its second, then
#: its microseconds), kind, latency (as JSON writes it), model, outcome, region, request_id, seq, tenant, version
_LINE = (
    '{"action":"%s","actor":"%s","at":"%s.%06d+00:00","details":"{}","kind":"%s","latency_ms":%s,"model":"%s",'
    '"outcome":"%s","region":"%s","request_id":"%s","seq":%d,"tenant":"%s","version":"%s"}'
)
#: the characters a usual record's texts are made of: printable ASCII but a quote and a backslash (one ``translate``
#: deletes them from all the texts: what is left is not; ~3x faster than ``isprintable`` and two searches)
_PLAIN = bytes(sorted(set(range(0x20, 0x7F)) - set(b'"\\')))
#: the last second of the years the column path formats (1970 to 9999; others go record by record)
_LAST_SECOND = 253_402_300_799


def plain_lines(rows: Sequence[Sequence[Any]], seq: int) -> tuple[list[bytes], tuple[Sequence[str], ...]] | None:
    """The lines of rows that follow record ``seq``, and their actor, kind, model, outcome and tenant columns (the
    keys of their block); None when any row is not of the usual kind (see the module)."""
    count = len(rows)
    if not count or any(len(row) != 13 for row in rows):
        return None
    kind, action, actor, tenant, outcome, model, version, request_id, region, latency, details, at, at_s = zip(
        *rows, strict=True
    )
    if any(at) or any(details) or set(map(type, details)) != {dict}:
        return None
    texts = (action, actor, kind, model, outcome, region, request_id, tenant, version)
    try:
        joined = "".join(itertools.chain.from_iterable(texts))
    except TypeError:  # a text that is not a string
        return None
    if not joined.isascii() or joined.encode().translate(None, _PLAIN):  # (a character that is not plain is left)
        return None
    try:
        # as _content rounds it; + 0.0 turns -0.0 into 0.0
        rounded = [round(float(value), 3) + 0.0 for value in latency]
    except (TypeError, ValueError, OverflowError):  # None (written "null"), not a number or too large: one by one
        return None
    if not all(value == 0 or 1e-3 <= value < 1e16 for value in rounded):  # (NaN and infinities fail too)
        return None
    # as JSON writes them, all in one call (the usual latencies, as ``repr`` writes them: the tests compare them)
    latencies = orjson.dumps(rounded)[1:-1].decode().split(",")
    times = _times(at_s)
    if times is None:
        return None
    seconds, micros = times
    values = itertools.chain.from_iterable(
        zip(action, actor, seconds, micros, kind, latencies, model, outcome, region, request_id,
            range(seq + 1, seq + count + 1), tenant, version, strict=True)
    )  # fmt: skip
    lines = ("\n".join(itertools.repeat(_LINE, count)) % tuple(values)).encode().split(b"\n")
    return lines, (actor, kind, model, outcome, tenant)


def _times(at_s: Sequence[Any]) -> tuple[list[str], list[int]] | None:
    """Each time as ``audit._iso_utc`` formats it: its second (a text made once a second: a batch's records mostly
    share theirs) and its microseconds, rounded as it rounds them (the fraction's, half to even); None when a time
    is not a number in the years 1970 to 9999. A loop of its steps: numpy's dozen calls on a batch cost the writer,
    which wakes with cold caches, ~1.1 µs a record, this ~0.65 (``audit_writer_paced.py``)."""
    seconds: list[int] = []
    micros: list[int] = []
    add_second, add_micros, modf = seconds.append, micros.append, math.modf
    try:
        for stamp in at_s:
            fraction, whole = modf(value := float(stamp))
            if not 0 <= value <= _LAST_SECOND:  # (NaN fails)
                return None
            micro = round(fraction * 1e6)
            if micro >= 1_000_000:
                add_second(int(whole) + 1)
                add_micros(micro - 1_000_000)
            else:
                add_second(int(whole))
                add_micros(micro)
    except (TypeError, ValueError, OverflowError):  # not a number: record by record
        return None
    texts = {second: second_text(second) for second in set(seconds)}
    return list(map(texts.__getitem__, seconds)), micros


def second_text(second: int) -> str:
    """A whole second as ISO 8601 UTC, to the second (the date and time of ``audit._iso_utc`` too)."""
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
