"""Tensors as JSON: the ``data`` member of inputs and outputs, checked against the datatype."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np

from dhow.core.datatypes import NUMPY_DTYPE, element_count
from dhow.core.errors import InvalidInput
from dhow.core.types import Tensor

__all__ = ["array_from_json", "json_data"]

#: what JSON values each kind of datatype takes, by the numpy kinds np.asarray infers from them
_ACCEPTED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_EXPECTED = {"b": "JSON booleans", "i": "integers", "u": "integers", "f": "numbers"}
_FOUND = {"b": "booleans", "i": "integers", "u": "integers", "f": "floating-point numbers", "U": "strings"}


def array_from_json(
    data: Any, datatype: str, shape: list[int], label: str, *, booleans_possible: bool = True
) -> np.ndarray:
    """A numpy array of ``shape`` from flat or nested JSON ``data``, refusing values of another type.

    ``booleans_possible``: False when the body has no ``true`` or ``false`` at all, which spares the look for them.
    """
    if not isinstance(data, list):
        raise InvalidInput(f"{label}: 'data' must be a list in row-major order, got {type(data).__name__}")
    count = element_count(shape)
    if datatype == "BYTES":
        items = _strings(data, label)
        _check_count(len(items), count, shape, label)
        array = np.empty(count, dtype=np.object_)
        array[:] = items
        return array.reshape(shape)
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidInput(f"{label}: 'data' is a ragged nested list; rows must have equal lengths") from None
    _check_count(array.size, count, shape, label)
    dtype = NUMPY_DTYPE[datatype]
    if count == 0:
        return np.empty(shape, dtype=dtype)
    if datatype == "UINT64" and array.dtype.kind == "f":
        # numpy infers float64 for integers that straddle 2**63; only UINT64 can hold them exactly
        return _uint64(data, array, label).reshape(shape)
    if array.dtype.kind not in _ACCEPTED_KINDS[dtype.kind]:
        found = _FOUND.get(array.dtype.kind, "mixed values, nulls or objects")
        raise InvalidInput(f"{label}: {datatype} data must be {_EXPECTED[dtype.kind]}, got {found}")
    if dtype.kind != "b" and booleans_possible and _holds_booleans(data, array.ndim):
        raise InvalidInput(
            f"{label}: {datatype} data must be {_EXPECTED[dtype.kind]}, got a JSON boolean (true or false) among "
            "them; send 1 or 0, or declare the input BOOL"
        )
    if array.dtype != dtype:
        array = _cast(array, dtype, datatype, label)
    return array.reshape(shape)


def _holds_booleans(data: list[Any], ndim: int) -> bool:
    """Whether a JSON boolean is among the values: numpy reads [1.5, true] as [1.5, 1.0] without a word."""
    items: Iterable[Any] = data
    for _ in range(ndim - 1):
        items = itertools.chain.from_iterable(items)
    return bool in set(map(type, items))


def _check_count(size: int, count: int, shape: list[int], label: str) -> None:
    if size != count:
        raise InvalidInput(f"{label}: shape {shape} needs {count} elements, data has {size}")


def _cast(array: np.ndarray, dtype: np.dtype, datatype: str, label: str) -> np.ndarray:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise InvalidInput(f"{label}: value {bad} is out of the {datatype} range [{info.min}, {info.max}]")
        return array.astype(dtype)
    try:
        with np.errstate(over="raise"):
            return array.astype(dtype)
    except FloatingPointError:
        raise InvalidInput(f"{label}: a value is out of the {datatype} range") from None


def _uint64(data: list[Any], inferred: np.ndarray, label: str) -> np.ndarray:
    if not all(type(item) is int for item in np.asarray(data, dtype=np.object_).reshape(-1).tolist()):
        raise InvalidInput(f"{label}: UINT64 data must be integers, got floating-point numbers")
    try:
        return np.asarray(data, dtype=np.uint64)
    except OverflowError:
        low, high = int(inferred.min()), int(inferred.max())
        bad = low if low < 0 else high
        raise InvalidInput(f"{label}: value {bad} is out of the UINT64 range [0, {2**64 - 1}]") from None


def _strings(data: list[Any], label: str) -> list[bytes]:
    """Flatten nested lists of strings into utf-8 ``bytes``, in row-major order."""
    items: list[bytes] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, str):
                items.append(item.encode("utf-8"))
            elif isinstance(item, list):
                stack.append(iter(item))
                break
            else:
                raise InvalidInput(f"{label}: BYTES data must be JSON strings, got {type(item).__name__}")
        else:
            stack.pop()
    return items


def json_data(tensor: Tensor) -> Any:
    """The flat row-major ``data`` of an output: a numpy array orjson writes natively, or strings."""
    if tensor.datatype != "BYTES":
        return tensor.data.ravel()  # a view when the data is C-contiguous (as ascontiguousarray), else a copy
    items = tensor.data.reshape(-1).tolist()
    try:
        return [item.decode("utf-8") for item in items]
    except (AttributeError, UnicodeDecodeError):
        return [_string(item, tensor.name) for item in items]


def _string(item: object, name: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, bytes | bytearray | np.bytes_):
        try:
            return bytes(item).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(
                f"output '{name}' holds bytes that are not UTF-8 and cannot travel as JSON; "
                'request it with "parameters": {"binary_data": true}'
            ) from None
    return str(item)
