"""A poll's messages sent to the model as requests of many rows.

A request per message would spend more in the core's path (placement, routing, signature checks, the
batcher's future, statistics) than the model spends on the row. So the rows of a poll's messages travel as a
``Stack``: one request whose first dimension holds one row per message (``--format json`` builds it straight
from the messages; one-row v2 requests of the same inputs, types, row shapes and parameters are stacked with
``stack_requests``). A stack is sent in requests of up to the model's ``max_batch_size`` rows (the dynamic
batcher still cuts the batches); one the model refuses (a bad row, a model fault) is sent again a row at a
time, so that only the bad row's message is dead-lettered, with its own reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

import numpy as np

from dhow.core.errors import DhowError, ErrorCode
from dhow.core.types import InferenceRequest, InferenceResponse, Tensor

__all__ = ["Answered", "Infer", "Stack", "run_stack", "split_rows", "stack_requests"]

#: refusals that may be one row's: the rows are then tried one by one
_ROW_FAULTS = frozenset({ErrorCode.INVALID_ARGUMENT, ErrorCode.INTERNAL})

Infer = Callable[[InferenceRequest], Awaitable[InferenceResponse]]


@dataclass(slots=True)
class Stack:
    """A request and the messages (their indices in the poll) whose rows it holds along its first dimension;
    ``whole``: it is one message's request as it came (not rows: sent and answered as it is)."""

    request: InferenceRequest
    indices: list[int]
    whole: bool = False


@dataclass(slots=True)
class Answered:
    """The model's response to rows of a stack: row ``j`` of each output answers message ``indices[j]`` (or, when
    ``whole``, the response is the one message's)."""

    response: InferenceResponse
    indices: list[int]
    whole: bool = False


async def run_stack(infer: Infer, stack: Stack, max_rows: int) -> tuple[list[Answered], dict[int, BaseException]]:
    """The stack's answers, and the messages that got none with the reason."""
    if stack.whole:
        try:
            return [Answered(await infer(stack.request), stack.indices, True)], {}
        except Exception as exc:
            return [], dict.fromkeys(stack.indices, exc)
    rows = max(max_rows, 1)
    chunks = [(start, min(start + rows, len(stack.indices))) for start in range(0, len(stack.indices), rows)]
    return await _gathered(infer, stack, chunks)


async def _chunk(infer: Infer, stack: Stack, start: int, stop: int) -> tuple[list[Answered], dict[int, BaseException]]:
    indices = stack.indices[start:stop]
    try:
        response = await infer(_rows(stack.request, start, stop))
    except DhowError as exc:
        if exc.code not in _ROW_FAULTS or len(indices) == 1:
            return [], dict.fromkeys(indices, exc)
        return await _one_by_one(infer, stack, start, stop)
    except Exception as exc:
        return [], dict.fromkeys(indices, exc)
    if any(not t.shape or t.shape[0] != len(indices) for t in response.outputs):
        if len(indices) == 1:  # an answer without rows: the one message's as it is
            return [Answered(response, indices, True)], {}
        return await _one_by_one(infer, stack, start, stop)  # an output without a row per request
    return [Answered(response, indices)], {}


async def _one_by_one(
    infer: Infer, stack: Stack, start: int, stop: int
) -> tuple[list[Answered], dict[int, BaseException]]:
    return await _gathered(infer, stack, [(row, row + 1) for row in range(start, stop)])


async def _gathered(
    infer: Infer, stack: Stack, ranges: list[tuple[int, int]]
) -> tuple[list[Answered], dict[int, BaseException]]:
    """The ranges of rows run at once, their answers and failures put together."""
    results = await asyncio.gather(*(_chunk(infer, stack, start, stop) for start, stop in ranges))
    answered: list[Answered] = []
    failed: dict[int, BaseException] = {}
    for done, errors in results:
        answered.extend(done)
        failed.update(errors)
    return answered, failed


def _rows(request: InferenceRequest, start: int, stop: int) -> InferenceRequest:
    """Rows ``start:stop`` of a stacked request (views, not copies)."""
    if start == 0 and stop == request.inputs[0].shape[0]:
        return request
    tensors = [Tensor(t.name, t.datatype, [stop - start, *t.shape[1:]], t.data[start:stop]) for t in request.inputs]
    return InferenceRequest(request.model_name, tensors, request.model_version, request.id,
                            dict(request.parameters))  # fmt: skip


def split_rows(answered: Answered, ids: list[str]) -> list[InferenceResponse]:
    """One response per row (message), with the given ids."""
    response = answered.response
    if answered.whole:
        return [response]
    return [
        InferenceResponse(
            response.model_name,
            response.model_version,
            [Tensor(t.name, t.datatype, [1, *t.shape[1:]], t.data[j : j + 1]) for t in response.outputs],
            id=ids[j],
            parameters=dict(response.parameters),
        )
        for j in range(len(answered.indices))
    ]


def stack_requests(requests: dict[int, InferenceRequest]) -> list[Stack]:
    """The one-row requests of the same signature (inputs, types, row shapes, parameters) stacked; any other
    request is a stack of its own, sent as it is."""
    groups: dict[Hashable, list[int]] = {}
    stacks = []
    for index, request in requests.items():
        signature = _signature(request)
        if signature is None:
            stacks.append(Stack(request, [index], whole=True))
        else:
            groups.setdefault(signature, []).append(index)
    for indices in groups.values():
        first = requests[indices[0]]
        if len(indices) == 1:
            stacks.append(Stack(first, indices))
            continue
        tensors = [
            Tensor(t.name, t.datatype, [len(indices), *t.shape[1:]],
                   np.concatenate([requests[i].inputs[k].data for i in indices]))
            for k, t in enumerate(first.inputs)
        ]  # fmt: skip
        stacks.append(Stack(InferenceRequest(first.model_name, tensors, first.model_version,
                                             parameters=dict(first.parameters)), indices))  # fmt: skip
    return stacks


def _signature(request: InferenceRequest) -> Hashable | None:
    """What must be equal for requests to be stacked; None when this one cannot be (not one row, outputs or
    parameters of its own)."""
    if request.outputs is not None or not request.inputs:
        return None
    if any(not t.shape or t.shape[0] != 1 or set(t.parameters) - {"binary_data_size"} for t in request.inputs):
        return None
    try:
        parameters = tuple(sorted(request.parameters.items()))
        hash(parameters)
    except TypeError:
        return None
    return (request.model_name, request.model_version, parameters,
            tuple((t.name, t.datatype, tuple(t.shape[1:])) for t in request.inputs))  # fmt: skip
