"""The usual records' canonical JSON made column by column: what the audit writer process does most of its time.

The writer gets a server's records as rows (``AuditRecord.as_tuple``) and must write each as the canonical JSON of its
stored fields (``audit._record_json``, what its hash covers). Record by record that is a dozen Python steps (the
texts checked, the latency rounded, the time formatted, the JSON put together), and on the writer's core, shared
with the load and the model, a Python step costs far more than on a warm one (the writer wakes every few
milliseconds with cold caches). Here the usual rows, those whose texts are printable ASCII without a quote or a
backslash, with empty details, the time to be formatted from the clock and a latency JSON writes as ``repr`` does,
are made with one check over all their texts, the times by whole columns, and all the lines by one ``%`` over one
template per batch (a text every record of the batch shares written into it once): byte for byte what
``_record_json(seq, _content(row))`` makes (the tests compare them). A batch with any other row goes record by record.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = ["plain_lines", "second_text"]

#: a usual record's canonical JSON (the keys sorted) as the text before each of its values and the value's column:
#: action, actor, at (its second, then its microseconds), kind, latency (as JSON writes it), model, outcome, region,
#: request_id, seq, tenant, version
_SHAPE = (
    ('{"action":"', "action"), ('","actor":"', "actor"), ('","at":"', "second"), (".", "micros"),
    ('+00:00","details":"{}","kind":"', "kind"), ('","latency_ms":', "latency"), (',"model":"', "model"),
    ('","outcome":"', "outcome"), ('","region":"', "region"), ('","request_id":"', "request_id"),
    ('","seq":', "seq"), (',"tenant":"', "tenant"), ('","version":"', "version"),
)  # fmt: skip
_END = '"}'
#: each column's ``%`` conversion (``%s`` for the others)
_SPECS = {"micros": "%06d", "seq": "%d"}
#: the columns a batch's records mostly share (a batch of one key's calls to one model): one value for the whole batch
#: goes into the batch's template once, not into each line by ``%``
_SHARED = frozenset(("action", "actor", "second", "kind", "model", "outcome", "region", "tenant", "version"))
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
    columns = {
        "action": action, "actor": actor, "second": seconds, "micros": micros, "kind": kind, "latency": latencies,
        "model": model, "outcome": outcome, "region": region, "request_id": request_id,
        "seq": range(seq + 1, seq + count + 1), "tenant": tenant, "version": version,
    }  # fmt: skip
    template, varying = _template(columns, count)
    values = itertools.chain.from_iterable(zip(*varying, strict=True))
    lines = ("\n".join(itertools.repeat(template, count)) % tuple(values)).encode().split(b"\n")
    return lines, (actor, kind, model, outcome, tenant)


def _template(columns: dict[str, Sequence[Any]], count: int) -> tuple[str, list[Sequence[Any]]]:
    """The batch's line as a ``%`` template, with the value of each shared column that is the same in every record
    written into it (its ``%`` doubled), and the columns left to fill, in the template's order."""
    parts: list[str] = []
    varying: list[Sequence[Any]] = []
    for before, name in _SHAPE:
        column = columns[name]
        parts.append(before)
        if name in _SHARED and column.count(column[0]) == count:
            parts.append(column[0].replace("%", "%%"))
        else:
            parts.append(_SPECS.get(name, "%s"))
            varying.append(column)
    parts.append(_END)
    return "".join(parts), varying


def _times(at_s: Sequence[Any]) -> tuple[list[str], list[int]] | None:
    """Each time as ``audit._iso_utc`` formats it: its second (a text made once a second: a batch's records mostly
    share theirs) and its microseconds, rounded as it rounds them (the fraction's, half to even); None when a time
    is not a number in the years 1970 to 9999. Made by whole columns (``map``, one list comprehension): numpy's dozen
    calls on a batch cost the writer, which wakes with cold caches, ~1.1 µs a record, a loop of the steps ~0.65."""
    try:
        values = list(map(float, at_s))
    except (TypeError, ValueError, OverflowError):  # not a number: record by record
        return None
    # a NaN makes the sum NaN (min and max may pass over one), and so do infinities of both signs
    total = sum(values)
    if total != total or min(values) < 0 or max(values) > _LAST_SECOND:
        return None
    seconds = list(map(int, values))
    # (the fraction of a time is its value less its whole second, exactly: ``math.modf``'s)
    micros = [round((value - second) * 1e6) for value, second in zip(values, seconds, strict=True)]
    if 1_000_000 in micros:  # a fraction that rounds up to the next second
        for at, micro in enumerate(micros):
            if micro == 1_000_000:
                seconds[at], micros[at] = seconds[at] + 1, 0
    texts = {second: second_text(second) for second in set(seconds)}
    return list(map(texts.__getitem__, seconds)), micros


def second_text(second: int) -> str:
    """A whole second as ISO 8601 UTC, to the second (the date and time of ``audit._iso_utc`` too)."""
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
