"""Records a store refuses: found, and written in their place as ``audit.unwritable`` records, so the chain goes on.

A writer retries a failed write until it works (records are never dropped), which is right while the store is
down, and wrong for a record the store refuses (a value it cannot hold, a limit it has, a trigger, a record our code
cannot make canonical): retried forever, that one record held every record after it in the queue, the trail
stopped, and the server refused work once its backlog was full. So a failed write is told apart:

- the store is down (``Unavailable``: it cannot be reached, is busy, full or failing its I/O; ``OSError``): the
  caller retries the whole write later, as before;
- anything else: the batch is split in halves, the first half written, then the rest, until the first record
  refused alone; what comes before it is written once (a few transactions, not one a record). In its place goes an
  ``audit.unwritable`` record that any store holds (ASCII, short texts): what the original was, as escaped JSON
  text, and the store's error, so that nothing is silently lost and the chain (``verify``) stays whole. Should the
  store refuse that too (a limit on a row's size: the stand-in of a big record is bigger still), a smaller stand-in
  goes in its place: no record body, only its size and the SHA-256 of its text (to match it to another copy) and
  the start of the store's error. Should the store refuse even that, it refuses everything (``RefusingAll``, an
  ``Unavailable``): it is treated as down (retried later, nothing replaced), and the trail says so (its log and
  ``refusing_all``, until a write works): a store refusing everything is broken, not its records.

A refusal that was only a passing fault (a record refused once, written the next time) is written in its stand-in
all the same: its text is there in full (up to ``RECORD_CHARS``), so it is kept, if not in its own fields.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dhow.core.errors import DhowError, Unavailable
from dhow.governance.audit import AuditRow, AuditStore
from dhow.governance.audit_blocks import KEY_CHARS

__all__ = [
    "RECORD_CHARS",
    "UNWRITABLE_KIND",
    "Appending",
    "RefusingAll",
    "describe",
    "record_digest",
    "unwritable_rows",
]

#: the kind of the record written in place of one the store refused
UNWRITABLE_KIND = "audit.unwritable"
#: the most characters of a refused record's text its stand-in keeps (it may have been refused for its size)
RECORD_CHARS = 65_536
#: the most characters of the store's error a stand-in keeps
ERROR_CHARS = 2000
#: the most characters of the store's error the smaller stand-in keeps (the error may quote the record)
SHORT_ERROR_CHARS = 200
#: a record's fields, in ``AuditRecord.as_tuple``'s order
_FIELDS = ("kind", "action", "actor", "tenant", "outcome", "model", "version", "request_id", "region", "latency_ms",
           "details", "at", "at_s")  # fmt: skip


def describe(exc: BaseException) -> str:
    """An error as ASCII text (the answer to the server is JSON, and a database's error may quote the value)."""
    return _escaped(exc.message if isinstance(exc, DhowError) else f"{type(exc).__name__}: {exc}")


def _escaped(text: str) -> str:
    """ASCII: what is not written with a backslash escape."""
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _record_text(row: Any) -> str:
    """A record as JSON in ASCII (``json`` writes a NUL, a lone surrogate and any integer), else its ``ascii``."""
    try:
        named = dict(zip(_FIELDS, row, strict=True)) if isinstance(row, list | tuple) and len(row) == 13 else row
        return json.dumps(named, ensure_ascii=True, default=repr, sort_keys=False)
    except Exception:  # a cycle, a key JSON has no form for, a repr that fails
        try:
            return ascii(row)
        except Exception:
            return f"<a {type(row).__name__} that has no text>"


def _ascii(value: object) -> str:
    """A field of a refused record as a stand-in keeps it: ASCII (escaped), up to a key's length."""
    if not isinstance(value, str):
        return ""
    return _escaped(value).replace("\x00", "\\x00")[:KEY_CHARS]


def record_digest(row: Any) -> tuple[int, str]:
    """The length of a record's whole text and the SHA-256 of that text's ASCII bytes, in hex: what the smaller
    stand-in keeps of a record, for an auditor to match it to another copy.

    The text (``_record_text``) is ``json.dumps(fields, ensure_ascii=True, default=repr)`` (the default separators
    ``", "`` and ``": "``, keys not sorted, NaN as ``NaN``, a value JSON has no form for as the JSON string of its
    ``repr``) of an object of the record's 13 fields in this order: ``kind``, ``action``, ``actor``, ``tenant``,
    ``outcome``, ``model``, ``version``, ``request_id``, ``region``, ``latency_ms``, ``details``, ``at``, ``at_s``,
    each as the writer received it (a writer process: as the server's JSON frame carried it). Where ``json.dumps``
    fails (a cycle, a key JSON has no form for, a ``repr`` that raises), the text is ``ascii(row)``, the row as
    received (not named by field); where that fails too, ``<a TYPE that has no text>``. A full stand-in's
    ``details.record`` holds only the first ``RECORD_CHARS`` characters of that text (``details.record_chars`` its
    length, when longer): the hash covers the whole text, which for a longer record is more than any stand-in
    holds."""
    return _digest(_record_text(row))


def _digest(text: str) -> tuple[int, str]:
    return len(text), hashlib.sha256(text.encode("ascii", "backslashreplace")).hexdigest()


def unwritable_rows(row: Any, error: str) -> list[AuditRow]:
    """The records that may be written in place of ``row``, which the store refused with ``error``, the first the
    store takes: one that keeps its tenant, region and request id as the record held them (a tenant's auditor reads
    only its tenant's records), else as ASCII (escaped: one of them may be what the store refused), else one that
    keeps none, in no tenant (tenants have names: no tenant's auditor reads it, the trail's own auditor does); each
    first with the record's text, then (a store that limits a row's size) without it: its length and SHA-256
    (``record_digest``) and the start of the error."""
    text = _record_text(row)
    details: dict[str, Any] = {"record": text[:RECORD_CHARS], "error": error[:ERROR_CHARS]}
    if len(text) > RECORD_CHARS:
        details["record_chars"] = len(text)
    chars, digest = _digest(text)
    short = {"error": error[:SHORT_ERROR_CHARS], "record_chars": chars, "record_sha256": digest}
    kept: list[tuple[str, str, str]] = []
    when = time.time()
    if isinstance(row, list | tuple) and len(row) == 13:
        tenant, region, request_id = row[3], row[8], row[7]
        if isinstance(tenant, str) and isinstance(region, str) and isinstance(request_id, str):
            kept.append((tenant, region, request_id))
        kept.append((_ascii(tenant), _ascii(region), _ascii(request_id)))
        if _plain_number(row[12]):
            when = row[12]
    return [
        (UNWRITABLE_KIND, "audit.write", "dhow:audit-writer", tenant, "UNWRITABLE", "", "", request_id, region, None,
         held, "", when)
        for held in (details, short)
        for tenant, region, request_id in dict.fromkeys([*kept, ("", "", "")])
    ]  # fmt: skip


def _plain_number(value: object) -> bool:
    """Whether a record's time is a time (the stand-in keeps the refused record's when it is)."""
    return type(value) in (int, float) and 0 <= value < 1e11  # type: ignore[operator]


def _down(exc: Exception) -> bool:
    return isinstance(exc, Unavailable | OSError)


class RefusingAll(Unavailable):
    """The store refused a record and every stand-in for it, the smallest too: it refuses everything, and is
    treated as down (the write is retried later, nothing replaced)."""


@dataclass
class Appending:
    """A batch of records being written, refused ones replaced; ``run`` again after a failure goes on from where
    the last run stopped (what was written is not written twice)."""

    rows: Sequence[AuditRow]
    #: how many of the rows, from the first, are written (or replaced)
    done: int = 0
    #: the seq of the last record written
    seq: int = 0
    #: (the seq of its stand-in, the store's error) of each record refused
    refusals: list[tuple[int, str]] = field(default_factory=list)

    def run(self, store: AuditStore) -> int:
        """Write the rows not written yet; the last seq. Raises when the store is down (``done`` says how far it
        got), or ``RefusingAll`` when it refuses even the smallest stand-in."""
        if not self.rows:
            self.seq = store.append_rows([])
        if self.done < len(self.rows):
            self._write(store, self.rows[self.done :])
        return self.seq

    def _stand_in(self, store: AuditStore, row: AuditRow, error: str) -> None:
        *first, last = unwritable_rows(row, error)
        for stand_in in first:
            try:
                self.seq = store.append_rows([stand_in])
                break
            except Exception as exc:
                if _down(exc):
                    raise
        else:
            try:
                self.seq = store.append_rows([last])
            except Exception as exc:  # refused too: the store is broken, retried as when it is down
                if _down(exc):
                    raise
                request_id = _ascii(row[7]) if isinstance(row, list | tuple) and len(row) == 13 else ""
                raise RefusingAll(
                    f"the audit store refused a record (request id {request_id!r}) and even its smallest "
                    f"audit.unwritable stand-in: treated as down, retried until it takes one: {describe(exc)}"
                ) from exc
        self.refusals.append((self.seq, error))
        self.done += 1

    def _write(self, store: AuditStore, rows: Sequence[AuditRow]) -> None:
        """Write ``rows`` in order: a part the store refuses is halved, each half written in turn, and a record it
        refuses alone is replaced by its stand-in there and then (the split goes on: ``k`` refused records of ``n``
        cost about ``k log(n/k)`` refused transactions, not a new split of all the rest after each)."""
        try:
            self.seq = store.append_rows(rows)
        except Exception as exc:
            if _down(exc):
                raise
            if len(rows) == 1:
                self._stand_in(store, rows[0], describe(exc))
                return
            half = len(rows) // 2
            self._write(store, rows[:half])
            self._write(store, rows[half:])
            return
        self.done += len(rows)
