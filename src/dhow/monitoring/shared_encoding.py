"""How a shared prediction (``shared_predictions``) is held in Redis, and the backlog a flush writes: each
prediction encoded, per model the newest ``pending`` kept, and what a cut flush hands back. Apart from the client
(no I/O here): a flush encodes its backlog in a thread, and the module that writes it stays small."""

from __future__ import annotations

import numpy as np
import orjson

__all__ = ["decode_prediction", "encode_prediction", "encoded_by_model", "newest_of"]


def encode_prediction(version: str, array: np.ndarray) -> bytes:
    """A kept prediction as its bucket holds it: the version, then the array (numbers as their bytes, dtype and
    shape in front; any other array as JSON)."""
    array = np.asarray(array)
    shape = ",".join(map(str, array.shape)).encode()
    if array.dtype.kind in "biuf":
        return b"\x00".join([version.encode(), array.dtype.str.encode(), shape, array.tobytes()])
    items = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()]
    written = orjson.dumps(items, default=str, option=orjson.OPT_SERIALIZE_NUMPY)  # (numpy scalars; else as text)
    return b"\x00".join([version.encode(), b"json", shape, written])


def decode_prediction(value: bytes) -> tuple[str, np.ndarray]:
    """``encode_prediction``'s version and array."""
    version, dtype, shape, data = value.split(b"\x00", 3)
    dims = tuple(int(n) for n in shape.split(b",")) if shape else ()
    if dtype == b"json":
        array = np.asarray(orjson.loads(data), dtype=object).reshape(dims)
    else:
        array = np.frombuffer(data, dtype=np.dtype(dtype.decode())).reshape(dims)
    return version.decode(), array


def encoded_by_model(
    outgoing: list[tuple[str, int, bytes, str, np.ndarray]],
) -> tuple[dict[str, tuple[int, list[tuple[bytes, bytes]], int]], int, int]:
    """Per model: its ``pending``, its newest ``pending`` predictions encoded (one per field: the newest), and how
    many of them an answer of the same key replaced within this write; then how many were left out as past
    ``pending`` and how many could not be encoded."""
    by_model: dict[str, tuple[int, dict[bytes, bytes], int]] = {}
    unfit = 0
    for model, pending, field, version, prediction in outgoing:
        entry = by_model.get(model)
        if entry is None:
            entry = by_model[model] = (pending, {}, 0)
        fields = entry[1]
        try:
            value = encode_prediction(version, prediction)
        except (TypeError, ValueError):  # (and an older answer of the same key is not written in its place)
            unfit += 1 + (fields.pop(field, None) is not None)
            continue
        repeated = entry[2] + (field in fields)
        fields.pop(field, None)  # (the newest last: the trim below keeps the newest)
        fields[field] = value
        by_model[model] = (pending, fields, repeated)
    skipped = 0
    result: dict[str, tuple[int, list[tuple[bytes, bytes]], int]] = {}
    for model, (pending, fields, repeated) in by_model.items():
        items = list(fields.items())
        if len(items) > pending:
            skipped += len(items) - pending
            items = items[len(items) - pending :]
        result[model] = (pending, items, repeated)
    return result, skipped, unfit


def newest_of(
    outgoing: list[tuple[str, int, bytes, str, np.ndarray]], left: set[tuple[str, bytes]]
) -> list[tuple[str, int, bytes, str, np.ndarray]]:
    """The newest of ``outgoing`` of each (model, field) in ``left``, in their order: what a flush cut off hands
    back (not those it counted, written, failed or dropped, nor an older answer that one replaced)."""
    newest: dict[tuple[str, bytes], int] = {}
    for place, (model, _, field, _, _) in enumerate(outgoing):
        if (model, field) in left:
            newest[(model, field)] = place
    return [outgoing[place] for place in sorted(newest.values())]
