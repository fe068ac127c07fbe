"""Messages of one row each (``--format json``) sent to the model as requests of many rows.

A request per message would spend more in the core's path (placement, routing, signature checks, the
batcher's future, statistics) than the model spends on the row. The ``RowStacker`` takes the one-row requests
of a poll as they are decoded and sends them stacked, up to the model's ``max_batch_size`` rows a request; the
dynamic batcher still cuts the batches. A stacked request the model refuses (a bad row, a model fault) is sent
again a row at a time, so that only the bad row's message is dead-lettered, with its own reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np

from dhow.core.errors import DhowError, ErrorCode
from dhow.core.types import InferenceRequest, InferenceResponse, Tensor

__all__ = ["Infer", "RowStacker"]

#: refusals that may be one row's: the rows are then tried one by one
_ROW_FAULTS = frozenset({ErrorCode.INVALID_ARGUMENT, ErrorCode.INTERNAL})

Infer = Callable[[InferenceRequest], Awaitable[InferenceResponse]]
_Pending = tuple[InferenceRequest, "asyncio.Future[InferenceResponse]"]


class RowStacker:
    def __init__(self, infer: Infer, max_rows: int) -> None:
        self._infer = infer
        self.max_rows = max(max_rows, 1)
        self._pending: list[_Pending] = []
        self._scheduled = False
        self._running: set[asyncio.Task[None]] = set()

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """The answer to a one-row request, computed in a stacked one."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[InferenceResponse] = loop.create_future()
        self._pending.append((request, future))
        if len(self._pending) >= self.max_rows:
            self._dispatch()
        elif not self._scheduled:
            # after the other messages of the poll were decoded (their tasks run first): they join this request
            self._scheduled = True
            loop.call_soon(self._dispatch)
        return await future

    def _dispatch(self) -> None:
        self._scheduled = False
        chunk, self._pending = self._pending, []
        if chunk:
            task = asyncio.get_running_loop().create_task(self._run(chunk))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, chunk: list[_Pending]) -> None:
        groups: dict[tuple[tuple[str, str, tuple[int, ...]], ...], list[_Pending]] = {}
        for pending in chunk:  # rows of other shapes or types than the others' go on their own
            groups.setdefault(_signature(pending[0]), []).append(pending)
        await asyncio.gather(*(self._group(group) for group in groups.values()))

    async def _group(self, group: list[_Pending]) -> None:
        if len(group) == 1 or any(not t.shape or t.shape[0] != 1 for t in group[0][0].inputs):
            await asyncio.gather(*(self._one(request, future) for request, future in group))
            return
        try:
            response = await self._infer(_stacked([request for request, _ in group]))
        except DhowError as exc:
            if exc.code in _ROW_FAULTS:
                await asyncio.gather(*(self._one(request, future) for request, future in group))
            else:
                _fail(group, exc)
            return
        except Exception as exc:
            _fail(group, exc)
            return
        rows = _split(response, [request.id for request, _ in group])
        if rows is None:  # an output without a row per request: answered one by one instead
            await asyncio.gather(*(self._one(request, future) for request, future in group))
            return
        for (_, future), row in zip(group, rows, strict=True):
            if not future.done():
                future.set_result(row)

    async def _one(self, request: InferenceRequest, future: asyncio.Future[InferenceResponse]) -> None:
        try:
            response = await self._infer(request)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(response)


def _signature(request: InferenceRequest) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    return tuple((t.name, t.datatype, tuple(t.shape[1:])) for t in request.inputs)


def _stacked(requests: list[InferenceRequest]) -> InferenceRequest:
    """One request of the rows (of one signature: the same inputs, types and row shapes)."""
    first = requests[0]
    tensors = [
        Tensor(t.name, t.datatype, [len(requests), *t.shape[1:]], np.concatenate([r.inputs[i].data for r in requests]))
        for i, t in enumerate(first.inputs)
    ]
    return InferenceRequest(first.model_name, tensors, first.model_version, parameters=dict(first.parameters))


def _split(response: InferenceResponse, ids: list[str]) -> list[InferenceResponse] | None:
    rows = len(ids)
    if any(not t.shape or t.shape[0] != rows for t in response.outputs):
        return None
    return [
        InferenceResponse(
            response.model_name,
            response.model_version,
            [Tensor(t.name, t.datatype, [1, *t.shape[1:]], t.data[j : j + 1]) for t in response.outputs],
            id=ids[j],
            parameters=dict(response.parameters),
        )
        for j in range(rows)
    ]


def _fail(chunk: list[_Pending], error: BaseException) -> None:
    for _, future in chunk:
        if not future.done():
            future.set_exception(error)
