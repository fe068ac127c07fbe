"""How the input's columns become the model's input tensors, and which rows cannot.

``plan_inputs`` decides once, from the input's columns and the model's declared inputs, which columns feed
which input; what cannot work for any row (a missing column, a wrong count of columns, a column no value of
which could be a number) fails the job before it starts. ``convert`` turns one record batch into arrays of
the rows that can be scored, and says of every other row why not (a null, a value that is not a number, a
list of the wrong length, a JSON line that does not parse): those rows go to the errors output.

- ``--map INPUT=f0,f1,f2`` or ``--map INPUT=f*`` stacks those columns (a glob in the file's column order).
- Without ``--map`` an input takes the column of its own name (a list column for a tensor input).
- A single-input model without such a column takes every numeric column but the key.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from dhow.batch.sources import NON_FINITE, UNREADABLE
from dhow.core.datatypes import NUMPY_DTYPE
from dhow.core.errors import InvalidInput
from dhow.core.model_config import TensorSpec
from dhow.core.wire.json_refusals import json_refusal

__all__ = ["Converted", "InputPlan", "Mapping", "convert", "plan_inputs"]


@dataclass(frozen=True, slots=True)
class InputPlan:
    """Where one model input's values come from."""

    name: str
    datatype: str
    #: the shape of one row's value (the declared shape without its batch dimension; -1: any)
    dims: tuple[int, ...]
    columns: tuple[str, ...]
    #: one list column holds each row's values (else: one value per column)
    listed: bool

    @property
    def width(self) -> int:
        """Values per row; -1 when a dimension is variable."""
        return -1 if any(d < 0 for d in self.dims) else math.prod(self.dims)


@dataclass(frozen=True, slots=True)
class Mapping:
    inputs: tuple[InputPlan, ...]
    #: the key column ("": the row's ordinal is its key)
    key: str

    @property
    def columns(self) -> list[str]:
        """The input columns the job reads: the key, then every input's."""
        names = [self.key] if self.key else []
        for plan in self.inputs:
            names.extend(c for c in plan.columns if c not in names)
        return names

    @property
    def text_columns(self) -> set[str]:
        """Columns read as text from CSV and JSON Lines (converted per row here, so one bad value is one bad row)."""
        return {c for plan in self.inputs for c in plan.columns}


def plan_inputs(
    specs: Sequence[TensorSpec], schema: pa.Schema, maps: Sequence[tuple[str, str]], key: str, option: str = "--map"
) -> Mapping:
    """Decide which columns feed which input; refuse what no row could satisfy, naming ``option``, the
    command's option that gave ``maps``."""
    names = [n for n in schema.names if n != UNREADABLE]
    if key and key not in names:
        raise InvalidInput(f"--key {key}: the input has no such column (its columns: {_listing(names)})")
    by_name = {spec.name: spec for spec in specs}
    mapped = dict(maps)
    for name in mapped:
        if name not in by_name:
            raise InvalidInput(f"--map {name}=...: the model has no input '{name}' (its inputs: {', '.join(by_name)})")
    plans = []
    for spec in specs:
        if spec.optional and spec.name not in mapped and spec.name not in names:
            continue
        plans.append(_plan(spec, schema, names, mapped.get(spec.name), key, len(specs) == 1, option))
    return Mapping(tuple(plans), key)


def _plan(
    spec: TensorSpec, schema: pa.Schema, names: list[str], columns: str | None, key: str, single: bool, option: str
) -> InputPlan:
    dims = tuple(spec.shape[1:])
    if columns is not None:
        chosen = _columns(columns, names, f"{option} {spec.name}")
    elif spec.name in names:
        chosen = [spec.name]
    elif single:
        chosen = [n for n in names if n != key and _numeric(schema.field(n).type)]
        if not chosen:
            raise InvalidInput(f"input '{spec.name}': the input has no numeric column (its columns: {_listing(names)})")
    else:
        raise InvalidInput(
            f"the model's input '{spec.name}' has no column of its name; name its columns with "
            f"--map {spec.name}=COLUMNS (its columns: {_listing(names)})"
        )
    plan = InputPlan(spec.name, spec.datatype, dims, tuple(chosen), listed=False)
    if len(chosen) == 1:
        kind = schema.field(chosen[0]).type
        # a text column for a tensor input: JSON lines whose values disagree, read as their JSON text
        text = (pa.types.is_string(kind) or pa.types.is_large_string(kind)) and plan.width != 1
        plan = InputPlan(spec.name, spec.datatype, dims, tuple(chosen), listed=_is_list(kind) or text)
    listed = plan.listed
    for name in chosen:
        _check_type(plan, name, schema.field(name).type)
    if not listed and plan.width not in (-1, len(chosen)) and not (plan.width == 1 and len(chosen) == 1):
        raise InvalidInput(
            f"input '{spec.name}' takes {plan.width} values per row (shape {list(spec.shape)}), "
            f"but {len(chosen)} column(s) are mapped to it: {_listing(chosen)}"
        )
    return plan


def _columns(text: str, names: list[str], given: str) -> list[str]:
    chosen: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        matched = [n for n in names if fnmatch.fnmatchcase(n, part)] if any(c in part for c in "*?[") else [part]
        missing = [n for n in matched if n not in names]
        if not matched or missing:
            raise InvalidInput(
                f"{given}={text}: no column {missing[0] if missing else part!r} in the input "
                f"(its columns: {_listing(names)})"
            )
        chosen.extend(n for n in matched if n not in chosen)
    return chosen


def _check_type(plan: InputPlan, column: str, kind: pa.DataType) -> None:
    value = kind.value_type if _is_list(kind) else kind
    fits = pa.types.is_string(value) or pa.types.is_large_string(value) or pa.types.is_null(value)
    fits = fits or (_numeric(value) if plan.datatype != "BYTES" else pa.types.is_binary(value) or _numeric(value))
    if not fits:
        raise InvalidInput(f"column '{column}' holds {kind}, which cannot feed input '{plan.name}' ({plan.datatype})")


def _numeric(kind: pa.DataType) -> bool:
    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind))


def _is_list(kind: pa.DataType) -> bool:
    return bool(pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind))


def _listing(names: Sequence[str], most: int = 12) -> str:
    shown = ", ".join(names[:most])
    return f"{shown}, … ({len(names)} in all)" if len(names) > most else shown


@dataclass(slots=True)
class Converted:
    """One record batch as model inputs: the arrays of its good rows, and why each other row is bad."""

    arrays: dict[str, np.ndarray]
    #: per row of the batch: whether it is scored
    good: np.ndarray
    #: per bad row, in order: why
    reasons: list[str] = field(default_factory=list)


class _Rows:
    """The rows of one batch found bad so far, each with its first reason."""

    def __init__(self, count: int) -> None:
        self.bad = np.zeros(count, dtype=bool)
        self.why: dict[int, str] = {}

    def mark(self, mask: np.ndarray, reason: Any) -> None:
        for found in np.flatnonzero(mask & ~self.bad):
            row = int(found)
            self.why[row] = reason(row) if callable(reason) else reason
        self.bad |= mask


def convert(batch: pa.RecordBatch, mapping: Mapping) -> Converted:
    rows = _Rows(batch.num_rows)
    if UNREADABLE in batch.schema.names:
        unreadable = batch.column(UNREADABLE)
        texts = unreadable.to_pylist()
        rows.mark(pc.is_valid(unreadable).to_numpy(zero_copy_only=False), lambda row: texts[row])
    values = {plan.name: _values(batch, plan, rows) for plan in mapping.inputs}
    good = ~rows.bad
    arrays = {name: array[good] if not good.all() else array for name, array in values.items()}
    return Converted(arrays, good, [rows.why[int(row)] for row in np.flatnonzero(rows.bad)])


def _values(batch: pa.RecordBatch, plan: InputPlan, rows: _Rows) -> np.ndarray:
    if plan.listed:
        return _listed(batch.column(plan.columns[0]), plan, rows)
    dtype = NUMPY_DTYPE[plan.datatype]
    columns = [_scalars(batch.column(name), name, plan.datatype, rows) for name in plan.columns]
    if len(columns) == 1:
        flat = columns[0]
        return flat.reshape(-1, *[1] * len(plan.dims)) if plan.dims else flat
    out = np.empty((batch.num_rows, len(columns)), dtype=dtype)
    for index, column in enumerate(columns):
        out[:, index] = column
    shape = tuple(d if d > 0 else len(columns) for d in plan.dims)
    return out.reshape(-1, *shape) if len(shape) > 1 else out


def _scalars(column: pa.Array, name: str, datatype: str, rows: _Rows) -> np.ndarray:
    """One column as one value per row (a placeholder where the row is bad)."""
    if column.null_count:
        rows.mark(pc.is_null(column).to_numpy(zero_copy_only=False), f"null in column '{name}'")
    if datatype == "BYTES":
        return _texts(column)
    target = pa.from_numpy_dtype(NUMPY_DTYPE[datatype])
    blank = False if datatype == "BOOL" else 0
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        filled = column.fill_null(blank) if column.null_count else column
        try:
            return _numpy(filled.cast(target))
        except pa.ArrowInvalid as exc:  # e.g. a fraction for an integer: no row of the column can be trusted
            raise InvalidInput(
                f"column '{name}' holds {column.type} values that {datatype} cannot hold ({exc})"
            ) from None
    try:
        return np.asarray(column.cast(target).fill_null(blank).to_numpy(zero_copy_only=False))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return _parsed(column.to_pylist(), name, NUMPY_DTYPE[datatype], rows)


def _numpy(array: pa.Array) -> np.ndarray:
    """A column without nulls as numpy: a view of its buffer where the type allows (no conversion machinery,
    which would import pandas: half a second of every job's start)."""
    if not array.null_count and (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
        return np.asarray(array.to_numpy(zero_copy_only=True))
    return np.asarray(array.to_numpy(zero_copy_only=False))


def _parsed(texts: list[Any], name: str, dtype: np.dtype, rows: _Rows) -> np.ndarray:
    """Text values one by one: what is not a number makes its row bad."""
    out = np.zeros(len(texts), dtype=dtype)
    for row, text in enumerate(texts):
        if text is None:
            continue
        try:
            out[row] = orjson.loads(text) if dtype.kind != "b" else _boolean(text)
        except (orjson.JSONDecodeError, TypeError, ValueError, OverflowError):
            rows.mark(_one(len(texts), row), f"column '{name}': {str(text)[:80]!r} is not a {dtype.name} value")
    return out


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "1", "0"):
        raise ValueError(text)
    return lowered in ("true", "1")


def _one(count: int, row: int) -> np.ndarray:
    mask = np.zeros(count, dtype=bool)
    mask[row] = True
    return mask


def _texts(column: pa.Array) -> np.ndarray:
    items = column.to_pylist()
    out = np.empty(len(items), dtype=np.object_)
    out[:] = [v if isinstance(v, bytes) else b"" if v is None else str(v).encode() for v in items]
    return out


def _listed(column: pa.Array, plan: InputPlan, rows: _Rows) -> np.ndarray:
    """A list column: each row's list, of the input's width, as one row of the tensor."""
    name, count = plan.columns[0], len(column)
    if not _is_list(column.type):  # JSON lines whose values disagree: their JSON text
        column = _relisted(column, name, rows)
    rows.mark(pc.is_null(column).to_numpy(zero_copy_only=False), f"null in column '{name}'")
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    width = plan.width if plan.width > 0 else _common_length(lengths, rows.bad)
    wrong = (lengths != width) & ~rows.bad
    rows.mark(wrong, lambda row: f"column '{name}' holds {lengths[row]} values; input '{plan.name}' takes {width}")
    flat = _kept(column, rows.bad).flatten()
    if flat.null_count:
        _mark_null_items(column, name, rows)
        flat = _kept(column, rows.bad).flatten()
    dtype = NUMPY_DTYPE[plan.datatype]
    values = (
        _texts(flat)
        if plan.datatype == "BYTES"
        else flat.cast(pa.from_numpy_dtype(dtype)).to_numpy(zero_copy_only=False)
    )
    out = np.zeros((count, width), dtype=dtype)
    out[~rows.bad] = values.reshape(-1, width)
    shape = tuple(d if d > 0 else width for d in plan.dims)
    return out.reshape(count, *shape)


def _common_length(lengths: np.ndarray, bad: np.ndarray) -> int:
    good = lengths[~bad]
    if not len(good):
        return 1
    found, counts = np.unique(good, return_counts=True)
    return int(found[np.argmax(counts)])


def _mark_null_items(column: pa.Array, name: str, rows: _Rows) -> None:
    for row, items in enumerate(column.to_pylist()):
        if items is not None and any(item is None for item in items):
            rows.mark(_one(len(column), row), f"a null in the list of column '{name}'")


def _kept(column: pa.Array, bad: np.ndarray) -> pa.Array:
    return column if not bad.any() else column.filter(pa.array(~bad))


def _relisted(column: pa.Array, name: str, rows: _Rows) -> pa.Array:
    """A text column of JSON lists, as a list column; a value that is no list of numbers makes its row bad."""
    items: list[list[Any] | None] = []
    for row, text in enumerate(column.to_pylist()):
        value = None
        if text is not None:
            refused = ""
            try:
                value = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                # (the place in the cell, which the parser's "line 1" would have read as the file's first line)
                refusal = json_refusal(exc, NON_FINITE, f"{exc.msg} at character {exc.colno} of the cell")
                value, refused = None, f" ({refusal})"
            if not (isinstance(value, list) and all(isinstance(v, int | float) for v in value)):
                why = f"column '{name}': {str(text)[:80]!r} is not a list of numbers{refused}"
                rows.mark(_one(len(column), row), why)
                value = None
        items.append(value)
    return pa.array(items, pa.list_(pa.float64()))
