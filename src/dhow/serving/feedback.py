"""Feedback: labels that come after the answer, joined by request id to the predictions this process made.

Predictions are kept in memory, per model, in a bounded ``PredictionLog`` (``monitoring.feedback.pending``):
keeping them in the registry database would put a write on every request's path, which the hot path must not
pay. Alone, a label reaches only the process that answered, so with ``--workers N`` (or several replicas) a label
sent to another process is answered as unmatched; with ``--redis`` the predictions are written there in batches
off the request's path (``monitoring.shared_predictions``) and any process joins any label. The predictions are
kept as the output arrays the answer held; the label is compared with the prediction (a classifier's argmax) only
when it comes, off the request's path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from dhow.core.errors import InvalidInput
from dhow.core.model_config import ModelConfig
from dhow.core.types import InferenceRequest, InferenceResponse
from dhow.monitoring.model_metrics import ModelMetrics
from dhow.monitoring.quality import PredictionLog, QualityWindow, figures_of, label_misfit, prediction_of
from dhow.monitoring.shared_predictions import JOINED, SharedPredictions, decode_prediction, field_of
from dhow.serving.lifecycle import ModelLifecycle

__all__ = ["FeedbackDesk"]

log = logging.getLogger("dhow.monitoring")

#: unmatched (or already joined) request ids listed in an answer (the count is always whole)
_LISTED = 100
_SCALAR = (bool, int, float, str)
#: the longest id, as the client sent it, that its prediction is kept by (``feedback_id``)
_LONGEST_ID = 256


class FeedbackDesk:
    """The pending predictions and the labelled windows of the models that take feedback."""

    def __init__(self, models: ModelLifecycle, metrics: ModelMetrics, shared: SharedPredictions | None = None) -> None:
        self.models = models
        self.metrics = metrics
        #: where the predictions go with ``--redis`` (shared by every worker and replica); None: in memory here
        self.shared = shared
        self._pending: dict[str, PredictionLog] = {}
        self._windows: dict[tuple[str, str], QualityWindow] = {}
        #: each version's figures as last computed, and the labels they rest on
        self._figures: dict[tuple[str, str], tuple[dict[str, float], int]] = {}

    def keep(self, config: ModelConfig, response: InferenceResponse, tenant: str, request_id: str) -> None:
        """On the hot path: remember the answer's prediction output under the tenant of the request's principal
        and its ``feedback_id`` (a dict insert): the response's ``prediction`` when the client asked for other
        outputs (or for classes), else the output as answered."""
        feedback = config.monitoring.feedback
        if feedback is None or not request_id:
            return
        if response.prediction is not None:  # the client asked for other outputs, or for classes
            self._keep(config.name, feedback.pending, tenant, request_id, response.model_version, response.prediction)
            return
        wanted = feedback.output
        for tensor in response.outputs:
            if not wanted or tensor.name == wanted:
                self._keep(config.name, feedback.pending, tenant, request_id, response.model_version, tensor.data)
                return

    def _keep(self, name: str, capacity: int, tenant: str, request_id: str, version: str, prediction: Any) -> None:
        if self.shared is not None:
            self.shared.add(name, capacity, field_of(tenant, request_id), version, prediction)
            return
        pending = self._pending.get(name)
        if pending is None or pending.capacity != capacity:
            pending = self._pending[name] = PredictionLog(capacity)
        pending.add((tenant, request_id), version, prediction)

    async def flush(self) -> None:
        """Write the predictions kept since the last flush to the shared store (``--redis``; else nothing)."""
        if self.shared is not None:
            await self.shared.flush()

    async def close(self) -> None:
        """Write what is kept for the shared store and let go of it; a failure is logged, never raised: the server's
        shutdown goes on (its audit trail and access log close after this)."""
        if self.shared is not None:
            try:
                await self.shared.close()
            except Exception:
                log.exception("feedback: the shared store of predictions could not be closed")

    async def receive(self, name: str, labels: object, tenant: str) -> dict[str, Any]:
        """Join labels (request id -> label, or a list of labels for a request of several rows) to the predictions
        of requests of that tenant (the sender's: any principal of the tenant may label, a labelling service's
        too; ``*``, all tenants, is a tenant of its own here: an id names one request).

        The joins are dict look-ups on the event loop (the log is the request path's); the figures are computed
        on a snapshot of each window in a worker thread."""
        config = self.models.resolve(name).config
        feedback = config.monitoring.feedback
        if feedback is None:
            raise InvalidInput(
                f"model '{name}' takes no feedback: add 'monitoring: {{feedback: {{task: classification}}}}' "
                "(or regression) to its model.yaml"
            )
        if not isinstance(labels, dict) or not labels:
            raise InvalidInput("the body needs 'labels': an object of request id -> label, e.g. {\"req-1\": 1}")
        for request_id, label in labels.items():
            _check_label(request_id, label, feedback.task)
        pending = self._pending.get(name)
        if pending is None:  # (not ``or``: a log that holds no prediction now still knows those it joined)
            pending = PredictionLog(feedback.pending)
        ids = list(labels)
        unmatched: list[str] = []
        already: list[str] = []
        rejected: dict[str, str] = {}
        fitting: list[tuple[str, str, list[Any], Any]] = []
        for request_id, found in zip(ids, await self._found(name, pending, tenant, ids), strict=True):
            if not isinstance(found, tuple):  # unknown, or labelled already
                (unmatched if found is None else already).append(request_id)
                continue
            version, array = found
            label = labels[request_id]
            predictions = prediction_of(array, feedback.task)
            why = _misfit(len(predictions), label) or label_misfit(array, feedback.task, label)
            if why:  # the prediction stays: the label may be sent again as the reason says
                rejected[request_id] = why
                continue
            fitting.append((request_id, version, predictions, label))
        touched: set[str] = set()
        joined = 0
        taken = await self._take(name, pending, tenant, [request_id for request_id, *_ in fitting])
        for (request_id, version, predictions, label), took in zip(fitting, taken, strict=True):
            if not took:  # (labelled meanwhile through another process: the same label sent twice at once)
                already.append(request_id)
                continue
            window = self._window(name, version, feedback.task, feedback.window)
            for prediction, value in zip(predictions, label if isinstance(label, list) else [label], strict=True):
                window.add(prediction, value)
            touched.add(version)
            joined += 1
        counted = (("joined", joined), ("unmatched", len(unmatched)), ("already_joined", len(already)),
                   ("rejected", len(rejected)))  # fmt: skip
        for outcome, count in counted:
            self.metrics.feedback.labels(name, outcome).inc(count)
        figures = {}
        for version in sorted(touched):
            window = self._windows[(name, version)]
            computed = await asyncio.to_thread(figures_of, window.task, window.pairs())
            figures[version] = self._publish(name, version, computed, len(window))
        return {
            "joined": joined,
            "unmatched": len(unmatched),
            "unmatched_ids": unmatched[:_LISTED],
            "already_joined": len(already),
            "already_joined_ids": already[:_LISTED],
            "rejected": rejected,
            "pending": len(pending) if self.shared is None else self.shared.pending,
            "dropped": pending.dropped if self.shared is None else self.shared.dropped,
            "replaced": pending.replaced if self.shared is None else self.shared.replaced,
            "quality": figures,
        }

    async def _found(
        self, name: str, pending: PredictionLog, tenant: str, ids: list[str]
    ) -> list[tuple[str, np.ndarray] | bytes | None]:
        """Each id's version and prediction, ``JOINED`` when it was labelled already, or None (unknown)."""
        if self.shared is None:
            kept = [pending.find((tenant, request_id)) for request_id in ids]
            return [
                (found[0], np.asarray(found[1])) if found is not None
                else JOINED if pending.joined((tenant, request_id)) else None
                for request_id, found in zip(ids, kept, strict=True)
            ]  # fmt: skip
        values = await self.shared.find(name, [field_of(tenant, request_id) for request_id in ids])
        return [value if value is None or value == JOINED else decode_prediction(value) for value in values]

    async def _take(self, name: str, pending: PredictionLog, tenant: str, ids: list[str]) -> list[bool]:
        """Take the predictions of the labels that joined (a request is labelled once): False for one another
        process took first."""
        if self.shared is not None:
            return await self.shared.claim(name, [field_of(tenant, request_id) for request_id in ids])
        for request_id in ids:
            pending.take((tenant, request_id))
        return [True] * len(ids)

    def quality(self, name: str, version: str) -> tuple[dict[str, float], int]:
        """The version's figures and how many labels they rest on, as last computed."""
        return self._figures.get((name, version), ({}, 0))

    def _window(self, name: str, version: str, task: str, size: int) -> QualityWindow:
        window = self._windows.get((name, version))
        if window is None or window.task != task:
            window = self._windows[(name, version)] = QualityWindow(task, size)
        return window

    def _publish(self, name: str, version: str, figures: dict[str, float], labels: int) -> dict[str, Any]:
        self._figures[(name, version)] = (figures, labels)
        for metric, value in figures.items():
            self.metrics.quality.labels(name, version, metric).set(value)
        return {"labels": labels, **{k: round(v, 6) for k, v in figures.items()}}


def feedback_id(request: InferenceRequest, request_id: str) -> str:
    """The id a request's prediction is labelled by: the client's own as it sent it, its ``x-request-id`` else its
    ``id``, any string of up to 256 characters; else the request's (``dhow.core.ids``: the one the logs say).

    Not the logs' id alone: for an id that is no plain token the logs say one the server made, which the client
    never learns (the answer's ``id`` echoes the request's), so its label could never join."""
    sent = request.headers.get("x-request-id") or request.id
    return sent if sent and len(sent) <= _LONGEST_ID else request_id


def _check_label(request_id: object, label: object, task: str) -> None:
    values = label if isinstance(label, list) else [label]
    if not values or not all(isinstance(v, _SCALAR) for v in values):
        raise InvalidInput(
            f"label of request '{request_id}' must be a value (a class or a number) or a list of them, got {label!r}"
        )
    if task == "regression" and not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise InvalidInput(
            f"label of request '{request_id}' must be a number (the model is a regression), got {label!r}"
        )


def _misfit(rows: int, label: object) -> str:
    """Why a label does not fit the prediction of a request of that many rows, saying what to send ("": it fits)."""
    if not isinstance(label, list):
        return "" if rows == 1 else f"the request had {rows} rows: send a list of {rows} labels"
    if len(label) == rows:
        return ""
    if rows == 1:
        return f"the request had 1 row: send one label, not a list of {len(label)}"
    return f"the request had {rows} rows: send a list of {rows} labels, not {len(label)}"
