"""What a queued payload event holds in memory, in bytes: the payload log's bound on its queue
(``--payload-log-queue-bytes``) counts requests and answers by these."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["event_bytes", "tensor_bytes"]


def tensor_bytes(tensors: Sequence[Any]) -> int:
    """The bytes of decoded tensors' arrays (a text tensor's: its texts')."""
    size = 0
    for tensor in tensors:
        size += _array_bytes(tensor.data)
    return size


def _array_bytes(data: Any) -> int:
    if type(data) is np.ndarray and not data.dtype.hasobject:  # (not ``dtype != object``: a dtype made each time)
        return data.nbytes
    try:  # text (objects: bytes or str), or a list
        return sum(len(value) if isinstance(value, bytes | str) else 8 for value in np.asarray(data).ravel())
    except (TypeError, ValueError):
        return getattr(data, "nbytes", 0)


def event_bytes(part: Any) -> int:
    """The bytes of an event's or an item's request or answer: a JSON body or answer (or a body and its number of
    tensors), else decoded tensors (``[name, datatype, shape, array]`` lists, or ``Tensor``s); none: 0."""
    if type(part) is bytes:
        return len(part)
    if type(part) is tuple:
        return len(part[0])
    if part is None:
        return 0
    size = 0
    for tensor in part:
        size += _array_bytes(tensor[3] if type(tensor) is list else tensor.data)
    return size
