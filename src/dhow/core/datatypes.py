"""The datatypes of the Open Inference Protocol and their numpy and byte forms."""

from __future__ import annotations

import struct

import numpy as np

from dhow.core.errors import InvalidInput

#: v2 datatype name -> numpy dtype (little-endian); BYTES is an object array of ``bytes``.
NUMPY_DTYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}

DATATYPES: frozenset[str] = frozenset(NUMPY_DTYPE)

_FROM_NUMPY: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}


def datatype_of(array: np.ndarray) -> str:
    """The v2 datatype name of a numpy array (strings and bytes are BYTES)."""
    kind = array.dtype.kind
    if kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return _FROM_NUMPY[array.dtype.name]
    except KeyError:
        raise InvalidInput(f"numpy dtype {array.dtype} has no v2 datatype") from None


def element_size(datatype: str) -> int:
    """Bytes per element for fixed-size datatypes; BYTES has none (returns 0)."""
    if datatype == "BYTES":
        return 0
    return NUMPY_DTYPE[datatype].itemsize


def element_count(shape: tuple[int, ...] | list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def triton_type(datatype: str) -> str:
    """Triton model-configuration name of a datatype: FP32 -> TYPE_FP32, BYTES -> TYPE_STRING."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def array_from_buffer(buffer: bytes | bytearray | memoryview, datatype: str, shape: list[int]) -> np.ndarray:
    """Decode a raw little-endian tensor (binary extension, gRPC raw contents) without copying.

    ``shape`` has no negative dimension (the doors refuse one first): numpy's reshape would infer it.
    """
    if datatype == "BYTES":
        return _bytes_from_buffer(buffer, shape)
    dtype = NUMPY_DTYPE[datatype]
    # numpy checks the size (frombuffer: whole elements; reshape: their count), so the common case computes none
    try:
        return np.frombuffer(buffer, dtype).reshape(shape)
    except (ValueError, OverflowError):
        pass
    expected = element_count(shape) * dtype.itemsize
    raise InvalidInput(
        f"tensor of datatype {datatype} and shape {list(shape)} needs {expected} bytes, got {len(buffer)}"
    )


def _bytes_from_buffer(buffer: bytes | bytearray | memoryview, shape: list[int]) -> np.ndarray:
    view = memoryview(buffer)
    count = element_count(shape)
    items: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidInput("BYTES tensor is truncated: a 4-byte length prefix is cut short")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidInput(f"BYTES tensor element {len(items)} claims {length} bytes past the end of the data")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidInput(f"BYTES tensor of shape {list(shape)} needs {count} elements, got {len(items)}")
    array = np.empty(count, dtype=np.object_)
    array[:] = items
    return array.reshape(shape)


def array_to_bytes(array: np.ndarray, datatype: str) -> bytes:
    """Encode an array as the raw little-endian form (BYTES: 4-byte length, then the bytes)."""
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            data = as_bytes(item)
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    dtype = NUMPY_DTYPE[datatype]
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def as_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, (bytearray, memoryview, np.bytes_)):
        return bytes(item)
    return str(item).encode("utf-8")
