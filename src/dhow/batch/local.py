"""The embedded engine: the input streamed in record batches through the core, the output committed in parts.

A thread reads and converts the next record batch (Arrow and numpy release the interpreter lock) while the
event loop has the previous ones in the core: a few batches are in flight, so the runtime's instances always
have the next batch queued, and memory holds only those batches and the part being filled (flat in the
input's size). Parts are cut by input row (``part_rows``), not by batch, so a resumed run cuts them where the
first run did.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from dhow.batch.mapping import Converted, Mapping, convert
from dhow.batch.scoring import Provenance, Scorer, result_tables
from dhow.batch.sources import Source

__all__ = ["Counts", "LocalEngine"]


@dataclass(slots=True)
class Counts:
    rows: int = 0
    scored: int = 0
    errors: int = 0
    parts: int = 0


@dataclass(slots=True)
class _Chunk:
    """A slice of the input inside one part, converted, then scored."""

    part: int
    first: int
    batch: pa.RecordBatch
    converted: Converted
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    refused: np.ndarray | None = None
    reasons: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Part:
    index: int
    first: int
    rows: int = 0
    scored: list[pa.Table] = field(default_factory=list)
    errors: list[pa.Table] = field(default_factory=list)


#: commits a part: (index, scored rows, bad rows or None, journal fields) -> None
Commit = Callable[[int, pa.Table, pa.Table | None, dict[str, Any]], None]


class LocalEngine:
    def __init__(
        self,
        source: Source,
        mapping: Mapping,
        scorer: Scorer,
        provenance: Provenance,
        output_names: list[str],
        *,
        part_rows: int,
        batch_rows: int,
        in_flight: int,
    ) -> None:
        self.source = source
        self.mapping = mapping
        self.scorer = scorer
        self.provenance = provenance
        self.output_names = output_names
        self.part_rows = part_rows
        self.batch_rows = batch_rows
        self.in_flight = max(in_flight, 2)

    async def run(self, first_row: int, first_part: int, commit: Commit, advance: Callable[[int], None]) -> None:
        """Score the input from ``first_row`` (the start of part ``first_part``) on, committing each part."""
        mapping = self.mapping
        text = mapping.text_columns
        if mapping.key and self.source.kind == "csv":
            # a CSV key as its text, as Spark reads it: an id "00123" stays "00123" (a number would be 123, no
            # longer the input's), and a later block's "A-1" is a key, not a conversion error that fails the job
            text = text | {mapping.key}
        chunks = self._chunks(self.source.batches(mapping.columns, text, first_row), first_row)
        pending: deque[asyncio.Task[_Chunk]] = deque()
        part = _Part(first_part, first_row)
        while True:
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                break
            pending.append(asyncio.create_task(self._score(chunk)))
            while len(pending) >= self.in_flight:
                part = await self._collect(await pending.popleft(), part, commit, advance)
        try:
            while pending:
                part = await self._collect(await pending.popleft(), part, commit, advance)
        finally:
            for task in pending:
                task.cancel()
        if part.rows:
            await asyncio.to_thread(self._commit, part, commit)

    def _chunks(self, batches: Iterator[pa.RecordBatch], row: int) -> Iterator[_Chunk]:
        """Slices of at most ``batch_rows`` that never cross a part's end, converted (in the reading thread)."""
        for batch in batches:
            offset = 0
            while offset < batch.num_rows:
                part = row // self.part_rows
                take = min(batch.num_rows - offset, (part + 1) * self.part_rows - row, self.batch_rows)
                piece = batch.slice(offset, take)
                yield _Chunk(part, row, piece, convert(piece, self.mapping))
                offset += take
                row += take

    async def _score(self, chunk: _Chunk) -> _Chunk:
        chunk.outputs, chunk.refused, chunk.reasons = await self.scorer.score(chunk.converted)
        return chunk

    async def _collect(self, chunk: _Chunk, part: _Part, commit: Commit, advance: Callable[[int], None]) -> _Part:
        if chunk.part != part.index:
            await asyncio.to_thread(self._commit, part, commit)
            part = _Part(chunk.part, chunk.first)
        scored, errors = self._tables(chunk)
        part.rows += chunk.batch.num_rows
        part.scored.append(scored)
        if errors is not None:
            part.errors.append(errors)
        advance(chunk.batch.num_rows)
        return part

    def _tables(self, chunk: _Chunk) -> tuple[pa.Table, pa.Table | None]:
        return result_tables(
            chunk.batch, chunk.first, chunk.converted, (chunk.outputs, chunk.refused, chunk.reasons),
            self.mapping, self.output_names, self.provenance,
        )  # fmt: skip

    def _commit(self, part: _Part, commit: Commit) -> None:
        scored = pa.concat_tables(part.scored, promote_options="permissive") if part.scored else None
        errors = pa.concat_tables(part.errors, promote_options="permissive") if part.errors else None
        assert scored is not None
        line = {"first_row": part.first, "rows": part.rows, "scored": scored.num_rows}
        line["errors"] = errors.num_rows if errors is not None else 0
        commit(part.index, scored, errors, line)
