"""Scoring one record batch through the core's admission point, and the tables it becomes.

One record batch is one admitted call (``CoreService.call``, action ``infer``): the caller's permission, its
quotas and the data's residency are checked for every batch exactly as for a request to the server, each
batch has its audit record, and the runtime gets the whole batch at once (the job's model is loaded with a
``max_batch_size`` of the batch's rows). A call per row would spend more on admission than on the model; one
call for the whole job would check the policies once for hours of work and hold a quota slot throughout.

A batch the model refuses (``InvalidInput``, a model fault, an answer outside its signature) is split in two
and each half tried again, down to the rows that fail alone: those go to the errors output with the model's
reason, the others are scored. Overload and unavailability are waited out and retried; any other refusal
(permission, residency) ends the job: it is the job that is refused, not a row.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa

from dhow.batch.mapping import Converted, Mapping
from dhow.batch.sources import UNREADABLE
from dhow.core.errors import DhowError, ErrorCode, InvalidInput
from dhow.core.types import InferenceRequest, Tensor
from dhow.serving.retries import retrying
from dhow.serving.traffic import Invoke

__all__ = ["ORDINAL", "PROVENANCE", "Provenance", "Scorer", "Scores", "errors_table", "result_tables", "scored_table"]

#: the provenance columns of every output row
PROVENANCE = ("dhow_model", "dhow_version", "dhow_artifact_digest", "dhow_run_id", "dhow_scored_at")
#: a row the model refuses: the batch is split until the row fails alone
_ROW_FAULTS = frozenset({ErrorCode.INVALID_ARGUMENT, ErrorCode.INTERNAL})
#: the key column's name when the job names none (the row's ordinal in the input)
ORDINAL = "row"


@dataclass(frozen=True, slots=True)
class Provenance:
    model: str
    version: int
    artifact_digest: str
    run_id: str


class Scorer:
    """Runs record batches through ``invoke``: the core service's admission point as the job's principal
    (``CoreService.invoker``), or a server's, over gRPC."""

    def __init__(self, invoke: Invoke, model: str, version: int, mapping: Mapping, data_region: str) -> None:
        self.invoke = invoke
        self.model = model
        self.version = str(version)
        self.specs = {plan.name: plan.datatype for plan in mapping.inputs}
        self.parameters = {"data_region": data_region} if data_region else {}

    async def score(self, converted: Converted) -> Scores:
        """The outputs of the good rows, the rows the model refused (their positions among the good rows), and
        why each was refused."""
        rows = int(converted.good.sum())
        if not rows:
            return {}, np.zeros(0, dtype=np.int64), []
        outputs, refused, reasons = await self._split(converted.arrays, np.arange(rows))
        return outputs, refused, reasons

    async def _split(
        self, arrays: dict[str, np.ndarray], positions: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
        try:
            return await self._call(arrays), np.zeros(0, dtype=np.int64), []
        except DhowError as exc:
            if exc.code not in _ROW_FAULTS:
                raise
            if len(positions) == 1:
                return {}, positions, [exc.message]
        half = len(positions) // 2
        first = await self._split({k: v[:half] for k, v in arrays.items()}, positions[:half])
        second = await self._split({k: v[half:] for k, v in arrays.items()}, positions[half:])
        names = first[0].keys() | second[0].keys()
        outputs = {
            name: np.concatenate([part[name] for part in (first[0], second[0]) if name in part]) for name in names
        }
        return outputs, np.concatenate([first[1], second[1]]), first[2] + second[2]

    async def _call(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = [Tensor(name, self.specs[name], list(array.shape), array) for name, array in arrays.items()]
        request = InferenceRequest(self.model, tensors, self.version, parameters=dict(self.parameters))
        response = await retrying(lambda: self.invoke(request), first_s=0.05, most_s=2.0)
        return {tensor.name: tensor.data for tensor in response.outputs}


def scored_table(
    keys: pa.Array, key_name: str, outputs: dict[str, np.ndarray], names: list[str], provenance: Provenance
) -> pa.Table:
    """The key, one column per model output (a list column for an output wider than 1), the provenance."""
    rows = len(keys)
    columns: dict[str, pa.Array] = {key_name: keys}
    for name in names:
        columns[name] = output_column(outputs[name]) if name in outputs else pa.nulls(rows)
    return pa.table({**columns, **_provenance(rows, provenance)})


def _provenance(rows: int, provenance: Provenance) -> dict[str, pa.Array]:
    """The same values on every row: dictionary columns of one entry (Parquet stores them once per page)."""
    zeros = pa.array(np.zeros(rows, dtype=np.int32))
    now = np.datetime64(datetime.datetime.now(datetime.UTC).replace(tzinfo=None), "us").astype(np.int64)
    return {
        "dhow_model": pa.DictionaryArray.from_arrays(zeros, pa.array([provenance.model])),
        "dhow_version": pa.array(np.full(rows, provenance.version, dtype=np.int64)),
        "dhow_artifact_digest": pa.DictionaryArray.from_arrays(zeros, pa.array([provenance.artifact_digest])),
        "dhow_run_id": pa.DictionaryArray.from_arrays(zeros, pa.array([provenance.run_id])),
        "dhow_scored_at": pa.array(np.full(rows, now, dtype=np.int64), pa.timestamp("us", tz="UTC")),
    }


def output_column(array: np.ndarray) -> pa.Array:
    """A model output as an Arrow column: one value per row, or a fixed-size list per row."""
    width = int(np.prod(array.shape[1:])) if array.ndim > 1 else 1
    flat = array.reshape(-1)
    values = _bytes_column(flat) if array.dtype == np.object_ else pa.array(flat)
    if array.ndim == 1 or width == 1:
        return values
    return pa.FixedSizeListArray.from_arrays(values, width)


def _bytes_column(flat: np.ndarray) -> pa.Array:
    items = [x if isinstance(x, bytes) else str(x).encode() for x in flat]
    binary = pa.array(items, pa.binary())
    try:
        return binary.cast(pa.string())
    except pa.ArrowInvalid:
        return binary


def errors_table(keys: pa.Array, key_name: str, reasons: list[str], inputs: pa.Table, rows: np.ndarray) -> pa.Table:
    """The bad rows: key, reason, the row's input as JSON (the columns the job read), and (when the key is a
    column) the row's ordinal in the input, which finds a row whose key could not be read."""
    texts = [orjson.dumps(row, default=str).decode() for row in inputs.to_pylist()]
    columns = {key_name: keys, "reason": pa.array(reasons, pa.string()), "input": pa.array(texts, pa.string())}
    if key_name != ORDINAL:
        columns[ORDINAL] = pa.array(rows)
    return pa.table(columns)


def check_outputs(names: list[str]) -> None:
    clash = [name for name in names if name in PROVENANCE]
    if clash:
        raise InvalidInput(f"the model's output {clash[0]!r} has the name of a provenance column")


#: what ``Scorer.score`` answers: the good rows' outputs, the positions the model refused, and why
Scores = tuple[dict[str, np.ndarray], np.ndarray | None, list[str]]


def result_tables(
    batch: pa.RecordBatch,
    first: int,
    converted: Converted,
    scores: Scores,
    mapping: Mapping,
    output_names: list[str],
    provenance: Provenance,
) -> tuple[pa.Table, pa.Table | None]:
    """A scored batch as its output rows and its bad rows (None: none); ``first`` is its first row's ordinal."""
    outputs, refused_at, reasons = scores
    key = mapping.key or ORDINAL
    keys = batch.column(key) if mapping.key else pa.array(np.arange(first, first + batch.num_rows))
    kept = converted.good.copy()
    good_rows = np.flatnonzero(converted.good)
    refused = good_rows[refused_at if refused_at is not None else np.zeros(0, dtype=np.int64)]
    kept[refused] = False
    scored = scored_table(keys.filter(pa.array(kept)), key, outputs, output_names, provenance)
    if kept.all():
        return scored, None
    columns = [c for c in mapping.columns if c != UNREADABLE]
    order = np.concatenate([np.flatnonzero(~converted.good), refused])
    taken = pa.array(order)
    inputs = pa.Table.from_batches([batch]).select(columns).take(taken)
    errors = errors_table(keys.take(taken), key, converted.reasons + reasons, inputs, order + first)
    return scored, errors
