"""Checking the audit trail's hash chain (``AuditStore.verify``): one pass over the records in seq order."""

from __future__ import annotations

from dataclasses import dataclass

from dhow.governance.audit_blocks import HASH_DIGITS, block_lines, line_hash

__all__ = ["GENESIS_HASH", "MAX_PROBLEMS", "ChainCheck", "VerifyReport"]

#: the prev_hash of the first record
GENESIS_HASH = "0" * 64
#: problems listed by ``verify``; the rest are counted
MAX_PROBLEMS = 50


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What ``verify`` found: the records read, the head to anchor elsewhere, and each problem by seq."""

    count: int
    head_seq: int
    head_hash: str
    problems: list[str]
    #: problems found beyond the ``MAX_PROBLEMS`` listed
    omitted: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.omitted

    def describe(self) -> str:
        # the head as --expect-head takes it, to be copied where the store's writers cannot change it
        head = f"{self.count} records, head {self.head_seq}:{self.head_hash}"
        if self.ok:
            return f"audit trail ok: {head}"
        total = len(self.problems) + self.omitted
        lines = [f"audit trail NOT ok: {total} problem{'s' if total != 1 else ''} in {head}"]
        lines += [f"  {problem}" for problem in self.problems]
        if self.omitted:
            lines.append(f"  ... and {self.omitted} more")
        return "\n".join(lines)


class ChainCheck:
    """Walks the records in seq order once, remembering only the previous record."""

    def __init__(self, expect_head: tuple[int, str] | None) -> None:
        self.count = self.last_seq = 0
        self.last_hash = GENESIS_HASH
        self.problems: list[str] = []
        self.omitted = 0
        self.expect = expect_head
        self.anchor_seen = False

    def _problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        else:
            self.omitted += 1

    def feed_block(
        self, first_seq: int, prev_hash: str, hashes: str, records: str, last_seq: int, block_hash: str
    ) -> list[bytes]:
        """The records of a block, each checked by its line's hash; its seq is the one its line names. Then the
        columns that ``read``, ``export_jsonl`` and the next append go by (first_seq, last_seq, hash, and as many
        hashes as lines): an edit of one leaves every record intact, yet hides records or forges the head. Answers
        the lines whose hash matched (whose keys ``verify`` then looks up)."""
        computed_before = prev_hash
        intact: list[bytes] = []
        seqs: list[int] = []
        stored = prev_hash
        for seq, placed, before, stored, line in block_lines(first_seq, prev_hash, hashes, records):
            computed = line_hash(before, line)
            # a record whose hash follows from the one before as that one's line makes it, not as it is stored: it
            # is intact, and the stored hash before it was changed
            written = computed != stored and computed_before != before and line_hash(computed_before, line) == stored
            self.check(seq, before, stored, computed, linked=placed > first_seq, follows_written=written)
            computed_before = computed
            seqs.append(seq)
            if computed == stored:
                intact.append(line)
        if not seqs:
            self._problem(f"the block from record {first_seq} holds no records: they were deleted")
            return intact
        columns = (
            ("first_seq", first_seq == seqs[0]),
            ("last_seq", last_seq == seqs[-1]),
            ("hash", block_hash == stored),
            ("hashes", len(hashes) == HASH_DIGITS * len(seqs)),
        )
        for column, matches in columns:
            if not matches:
                self._problem(f"the block from record {first_seq} was edited: its {column} does not match its records")
        return intact

    def missing_key(self, first_seq: int, name: str, value: str) -> None:
        """A key of a block's intact record that ``dhow_audit_keys`` lacks (``audit_blocks.missing_keys``)."""
        self._problem(
            f"the block from record {first_seq} lacks its key {name} {value!r} (dhow_audit_keys): read by {name} "
            "skips its records"
        )

    def check(
        self,
        seq: int,
        prev_hash: str,
        stored_hash: str,
        computed_hash: str,
        *,
        linked: bool = False,
        follows_written: bool = False,
    ) -> None:
        """One record: its seq, the hash before it and its own as stored, and its hash computed from its content.

        ``linked``: the hash before it is not stored apart but is the stored hash of the record before it in its
        block, so a mismatch may be that record's doing (its hash rewritten), and a record right after a gap cannot be
        checked (the one it follows is gone: the gap is reported). ``follows_written``: its hash follows from the
        record before it as that record's content makes it (so it is intact, and that record's hash was changed)."""
        in_place = self._check_place(seq)
        before = f"record {seq - 1}" if seq > 1 else "the start of the chain"
        follows = (
            f"record {seq} does not follow {before}: records were reordered, or one before it was deleted or rewritten"
        )
        if computed_hash != stored_hash:
            if not linked:
                self._problem(f"record {seq} was edited: its content does not match its hash")
            elif in_place:
                self._problem(
                    follows
                    if follows_written
                    else f"record {seq} was edited: its content does not match its hash (or {before} was rewritten "
                    "with its hash made again)"
                )
        elif in_place and prev_hash != self.last_hash:
            self._problem(follows)
        if self.expect is not None and seq == self.expect[0]:
            self.anchor_seen = True
            if stored_hash != self.expect[1]:
                self._problem(
                    f"the anchored record {seq} differs: its hash is now {stored_hash}, not {self.expect[1]}; "
                    "the trail up to it was rewritten"
                )
        self.count += 1
        self.last_seq, self.last_hash = max(seq, self.last_seq), stored_hash

    def _check_place(self, seq: int) -> bool:
        """Whether the record comes right after the previous one; reports the gap if not."""
        expected = self.last_seq + 1
        if seq == expected + 1:
            self._problem(f"record {expected} is missing: deleted?")
        elif seq > expected:
            self._problem(f"records {expected} to {seq - 1} are missing: deleted?")
        elif seq < 1:
            self._problem(f"record {seq} should not exist: sequence numbers start at 1")
        elif seq < expected:  # (only in a block: its lines were moved)
            self._problem(f"record {seq} is out of place: it comes after record {self.last_seq}")
        return seq == expected

    def report(self) -> VerifyReport:
        if self.expect is not None and not self.anchor_seen:
            seq = self.expect[0]
            if seq > self.last_seq:
                self._problem(
                    f"the anchored record {seq} is gone: the trail ends at record {self.last_seq}, "
                    "so its newest records were truncated"
                )
            else:
                self._problem(f"the anchored record {seq} is gone: deleted")
        return VerifyReport(self.count, self.last_seq, self.last_hash, self.problems, self.omitted)
