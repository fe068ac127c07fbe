"""Shadow copies: a sampled copy of an answered request runs on the shadow version, off the request's path.

The routing side offers copies to a bounded ``ShadowQueue`` (a full queue drops and counts them: shadowing
never slows live traffic); ``ShadowRunner`` workers run them through the core's admission point as the service
identity ``dhow:shadow`` and compare the answers with the primary's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from dhow.core.errors import DhowError
from dhow.core.types import InferenceRequest, InferenceResponse, Tensor
from dhow.rollouts.policy import DEFAULT_TOLERANCE, CompiledPolicy
from dhow.serving.traffic import Invoke

__all__ = ["ShadowFigures", "ShadowQueue", "ShadowRunner", "compare_outputs"]

log = logging.getLogger("dhow.rollouts")

SHADOW_QUEUE = 256
SHADOW_CONCURRENCY = 4
#: latencies kept per role, for the p99
SAMPLES = 4096


def _p99(values: deque[float]) -> float | None:
    return round(float(np.percentile(np.fromiter(values, float), 99)), 3) if values else None


@dataclass(slots=True)
class ShadowFigures:
    requests: int = 0
    agreed: int = 0
    disagreed: int = 0
    errors: int = 0
    dropped: int = 0
    difference_sum: float = 0.0
    difference_count: int = 0
    primary: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    shadow: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))

    def as_dict(self) -> dict[str, Any]:
        compared = self.agreed + self.disagreed
        return {
            "requests": self.requests,
            "agreed": self.agreed,
            "disagreed": self.disagreed,
            "errors": self.errors,
            "dropped": self.dropped,
            "agreement_rate": round(self.agreed / compared, 6) if compared else None,
            "mean_abs_difference": self.difference_sum / self.difference_count if self.difference_count else None,
            "primary_p99_ms": _p99(self.primary),
            "shadow_p99_ms": _p99(self.shadow),
        }


@dataclass(frozen=True, slots=True)
class _Copy:
    deployment: str
    figures: ShadowFigures
    #: the deployment's policy when the request was answered: the shadow version, and how to compare
    policy: CompiledPolicy
    request: InferenceRequest
    primary: InferenceResponse
    primary_seconds: float


class ShadowQueue:
    """Copies waiting for a shadow worker; bounded."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.queue: asyncio.Queue[_Copy] = asyncio.Queue(SHADOW_QUEUE)
        self.results = Counter(
            "dhow_shadow_requests",
            "Shadow copies by result: agree, disagree, error or dropped (queue full).",
            ["deployment", "result"],
            registry=registry,
        )

    def offer(
        self,
        deployment: str,
        figures: ShadowFigures,
        policy: CompiledPolicy,
        request: InferenceRequest,
        response: InferenceResponse,
        seconds: float,
    ) -> None:
        """Queue a copy of an answered request for the shadow version, if the policy's sampling picks it."""
        if policy.shadow is None:
            return
        try:
            self.queue.put_nowait(_Copy(deployment, figures, policy, request, response, seconds))
        except asyncio.QueueFull:
            figures.dropped += 1
            self.results.labels(deployment, "dropped").inc()


class ShadowRunner:
    """The workers that run queued copies and compare their answers."""

    def __init__(self, queue: ShadowQueue, invoke: Invoke, registry: CollectorRegistry) -> None:
        self.queue = queue
        self.invoke = invoke
        self.difference = Histogram(
            "dhow_shadow_output_difference",
            "Mean absolute difference between the shadow's and the primary's float outputs.",
            ["deployment"],
            buckets=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, float("inf")),
            registry=registry,
        )
        self.seconds = Histogram(
            "dhow_shadow_latency_seconds",
            "Latency of the primary and of its shadow, for the same requests.",
            ["deployment", "role"],
            registry=registry,
        )
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name="shadow") for _ in range(SHADOW_CONCURRENCY)]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _work(self) -> None:
        while True:
            copy = await self.queue.queue.get()
            copy.figures.requests += 1
            start = time.perf_counter()
            try:
                answer = await self.invoke(_shadow_request(copy))
            except Exception as exc:
                if not isinstance(exc, DhowError):
                    log.exception("shadow request to %s failed", copy.deployment)
                copy.figures.errors += 1
                self.queue.results.labels(copy.deployment, "error").inc()
                continue
            self._compare(copy, answer, time.perf_counter() - start)

    def _compare(self, copy: _Copy, answer: InferenceResponse, shadow_seconds: float) -> None:
        name, figures = copy.deployment, copy.figures
        policy = copy.policy
        agree, difference = compare_outputs(copy.primary.outputs, answer.outputs, policy.compare, policy.tolerances)
        figures.primary.append(copy.primary_seconds * 1000)
        figures.shadow.append(shadow_seconds * 1000)
        self.seconds.labels(name, "primary").observe(copy.primary_seconds)
        self.seconds.labels(name, "shadow").observe(shadow_seconds)
        if difference is not None:
            figures.difference_sum += difference
            figures.difference_count += 1
            self.difference.labels(name).observe(difference)
        if agree:
            figures.agreed += 1
        else:
            figures.disagreed += 1
        self.queue.results.labels(name, "agree" if agree else "disagree").inc()


def _shadow_request(copy: _Copy) -> InferenceRequest:
    """The copy names the shadow version, and keeps the original's data region (placement decides it again)."""
    request = copy.request
    return InferenceRequest(
        request.model_name,
        request.inputs,
        model_version=str(copy.policy.shadow),
        id=request.id,
        parameters=request.parameters,
        outputs=request.outputs,
        headers=request.headers,
    )


def compare_outputs(
    primary: list[Tensor],
    shadow: list[Tensor],
    compare: Mapping[str, str] | None = None,
    tolerances: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[bool, float | None]:
    """Do two answers agree? Every output must have the same shape, and then the same label where
    ``compare`` says ``label`` (a classifier's probabilities: the argmax), else the same values: integers,
    booleans and bytes equal, floats within the output's ``tolerances`` (``DEFAULT_TOLERANCE`` when none).
    Also the mean absolute difference over the float outputs (None when there are none)."""
    how, within = compare or {}, tolerances or {}
    theirs = {tensor.name: tensor for tensor in shadow}
    agree = True
    differences: list[float] = []
    for mine in primary:
        other = theirs.get(mine.name)
        if other is None or list(other.shape) != list(mine.shape):
            agree = False
            continue
        a, b = np.asarray(mine.data), np.asarray(other.data)
        if a.dtype.kind == "f" and b.dtype.kind == "f":
            differences.append(float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0)
        if how.get(mine.name) == "label":
            agree = agree and bool(np.array_equal(_labels(a), _labels(b)))
        else:
            agree = agree and _same_values(a, b, within.get(mine.name, DEFAULT_TOLERANCE))
    return agree, (sum(differences) / len(differences) if differences else None)


def _labels(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Each row's class: the argmax over the last axis of scores; a one-dimensional output is its labels."""
    return np.argmax(values, axis=-1) if values.ndim >= 2 else values


def _same_values(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any], tolerance: Mapping[str, float]) -> bool:
    if a.dtype.kind == "f" and b.dtype.kind == "f":
        rtol, atol = tolerance["rtol"], tolerance["atol"]
        return bool(np.allclose(a.astype(np.float64), b.astype(np.float64), rtol=rtol, atol=atol))
    return a.shape == b.shape and bool(np.array_equal(a, b))
