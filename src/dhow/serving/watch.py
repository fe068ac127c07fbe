"""The models watched while they serve: drift of their inputs and predictions, latency anomalies, feedback.

The request's path pays one dict look-up, one count down and, for a sampled request, one ``deque.append`` of
its arrays (``ModelWatch.observe``, on the event loop: no lock); the batcher's observer appends the batch's
queue and compute times. Everything else runs in ``ModelWatch.run``, a background task: each tick it judges the
versions whose latency window ended, scores the drift windows that are due (in a worker thread) and publishes
gauges. The start of an episode (drift above the threshold, a latency anomaly) is written once to the registry's
event history (``EventLog``: the deployments' events, by model name) and counted; its end is written too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from dhow.core.model_config import ModelConfig
from dhow.core.types import Caller, InferenceRequest, InferenceResponse
from dhow.monitoring.drift import DriftWindow, FeatureDrift, score
from dhow.monitoring.latency import PARTS, QUANTILES, LatencyBaseline, duration_text
from dhow.monitoring.model_metrics import ModelMetrics
from dhow.monitoring.sampling import sampling_gap
from dhow.monitoring.shared_predictions import SharedPredictions
from dhow.serving.feedback import FeedbackDesk, feedback_id
from dhow.serving.lifecycle import ModelLifecycle
from dhow.serving.model_version import ModelVersion

__all__ = ["EventLog", "ModelWatch"]

log = logging.getLogger("dhow.monitoring")

#: seconds between two looks of the background task
TICK_S = 0.25


class EventLog(Protocol):
    """Where episodes are recorded: the registry's event history (``rollouts.store.RegistryStore``)."""

    def add_event(self, name: str, kind: str, details: dict[str, Any]) -> object: ...


@dataclass(slots=True)
class _Watched:
    """What is watched of one loaded version."""

    model: ModelVersion
    drift: DriftWindow | None
    baseline: LatencyBaseline | None
    window_started: float = field(default_factory=time.monotonic)
    last_scored: float = field(default_factory=time.monotonic)
    scored_at: float | None = None
    scores: list[FeatureDrift] = field(default_factory=list)
    drifting: bool = False
    anomalous: bool = False
    #: the inputs and the outputs the profile has features of: what a sample keeps
    profiled_inputs: frozenset[str] = frozenset()
    profiled_outputs: frozenset[str] = frozenset()


class ModelWatch:
    def __init__(
        self,
        models: ModelLifecycle,
        metrics: ModelMetrics,
        events: EventLog | None = None,
        shared: SharedPredictions | None = None,
    ) -> None:
        self.models = models
        self.metrics = metrics
        #: where episodes are written (the server's registry); None: counted only
        self.events = events
        self.feedback = FeedbackDesk(models, metrics, shared)
        self._watched: dict[tuple[str, str], _Watched] = {}
        #: models whose observation failed (logged once)
        self._failed: set[str] = set()

    # -- the request's path ---------------------------------------------------------------------------

    def observe(
        self, config: ModelConfig, request: InferenceRequest, response: InferenceResponse, caller: Caller
    ) -> None:
        """An answered request: sampled into its version's drift window, its prediction kept for feedback. A
        failure here is logged once per model and never reaches the request, which has its answer."""
        try:
            watched = self._watched.get((config.name, response.model_version))
            if watched is None:  # the version's first answer: watched from now on, not from the next tick
                watched = self._first_answer(config.name, response.model_version)
            if watched is not None and watched.drift is not None:  # (most answers only count down to a sample)
                window = watched.drift
                window.skip -= 1
                if window.skip <= 0:
                    _sample(watched, window, request, response)
            if config.monitoring.feedback is not None:
                self.feedback.keep(config, response, caller.tenant, feedback_id(request, caller.request_id))
        except Exception:
            if config.name not in self._failed:
                self._failed.add(config.name)
                log.exception("model %s: monitoring could not observe an answer (logged once)", config.name)

    def _first_answer(self, name: str, version: str) -> _Watched | None:
        entry = self.models.entries.get(name)
        model = entry.versions.get(int(version)) if entry is not None and version.isdigit() else None
        if model is None:
            return None
        watched = self._watched[(name, version)] = self._start(model)
        return watched

    # -- reports --------------------------------------------------------------------------------------

    def drift_report(self, name: str, version: str) -> dict[str, Any]:
        """The version's last drift scores, the worst feature first."""
        model = self.models.resolve(name, version)
        watched = self._watched.get((name, model.version_label))
        if watched is not None and watched.model is not model:  # reloaded since the last look: not scored yet
            watched = None
        settings = model.config.monitoring.drift
        report: dict[str, Any] = {
            "model": name,
            "version": model.version_label,
            "profile": model.profile is not None,
            "threshold": settings.threshold,
            "sample_rate": settings.sample_rate,
        }
        if model.profile is None:
            why = model.profile_error or "the version has no reference profile: make one with 'dhow models profile'"
            return {**report, "state": "no_profile", "reason": why, "features": []}
        rows = watched.drift.held if watched is not None and watched.drift is not None else 0
        if watched is None or watched.scored_at is None:
            state = f"waiting: {rows} of {settings.min_rows} rows sampled, scored every {settings.interval_s} s"
            return {**report, "state": "waiting", "reason": state, "rows": rows, "features": []}
        return {
            **report,
            "state": "drift" if watched.drifting else "ok",
            "rows": rows,
            "scored_seconds_ago": round(time.monotonic() - watched.scored_at, 3),
            "drifted": [s.name for s in watched.scores if s.drifted],
            "features": [_feature_json(s) for s in watched.scores],
        }

    def quality(self, name: str, version: int) -> tuple[dict[str, float], int]:
        """Quality figures of a version from feedback, and how many labels they rest on."""
        return self.feedback.quality(name, str(version))

    # -- the background task --------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: judge latency windows, score due drift windows, record episodes."""
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self.look()
            except Exception:
                log.exception("model monitoring failed; trying again")

    async def look(self) -> None:
        now = time.monotonic()
        await self.feedback.flush()
        watched, ended = self._refresh()
        for gone, why in ended:
            await self._close_episodes(gone, why)
        for each in watched:
            await self._judge_latency(each, now)
            await self._score_drift(each, now)

    async def close(self) -> None:
        """Write what is kept for feedback and not written yet (``--redis``), and let go of the store."""
        await self.feedback.close()

    def _refresh(self) -> tuple[list[_Watched], list[tuple[_Watched, str]]]:
        """The watched versions, following loads and unloads (a reloaded version starts afresh), and those that
        ended since the last look, with why."""
        current: dict[tuple[str, str], _Watched] = {}
        ended: list[tuple[_Watched, str]] = []
        for entry in list(self.models.entries.values()):
            for model in list(entry.versions.values()):
                key = (model.name, model.version_label)
                watched = self._watched.get(key)
                if watched is not None and watched.model is not model:
                    # the old copy's gauges go before the new copy sets its own under the same labels
                    self._forget(watched)
                    ended.append((watched, _reloaded(watched.model, model)))
                if watched is None or watched.model is not model:
                    watched = self._start(model)
                current[key] = watched
        for key in set(self._watched) - set(current):
            self._forget(self._watched[key])
            ended.append((self._watched[key], "the version was unloaded"))
        self._watched = current
        return list(current.values()), ended

    async def _close_episodes(self, watched: _Watched, why: str) -> None:
        """An episode of a version that reloaded or unloaded ends with it: its window and baseline are gone."""
        labels = {"version": watched.model.version_label, "reason": why}
        if watched.drifting:
            await self._record(watched.model.name, "drift_cleared", labels)
        if watched.anomalous:
            await self._record(watched.model.name, "latency_normal", labels)

    def _start(self, model: ModelVersion) -> _Watched:
        monitoring = model.config.monitoring
        drift = None
        if model.profile is not None:
            drift = DriftWindow(monitoring.drift.window, monitoring.drift.sample_rate)
        baseline = LatencyBaseline(monitoring.latency) if model.latency is not None else None
        self.metrics.profile.labels(model.name, model.version_label).set(1 if model.profile is not None else 0)
        features = model.profile.features if model.profile is not None else ()
        inputs = frozenset(f.tensor for f in features if f.side == "input")
        outputs = frozenset(f.tensor for f in features if f.side == "output")
        return _Watched(model, drift, baseline, profiled_inputs=inputs, profiled_outputs=outputs)

    def _forget(self, watched: _Watched) -> None:
        """An unloaded or reloaded version's gauges go with it (a reloaded copy starts its own). Where a series
        cannot be removed (several worker processes), the drift and anomaly figures it set fall to 0: no alert
        stays on a window that is gone."""
        labels = (watched.model.name, watched.model.version_label)
        metrics = self.metrics
        drift: list[tuple[Any, tuple[str, ...]]] = [(metrics.drifted, labels), (metrics.drift_rows, labels)]
        drift += [(metrics.drift, (*labels, s.name, s.side, s.method)) for s in watched.scores]
        anomaly = [(metrics.anomaly, (*labels, part, quantile)) for part in PARTS for quantile in QUANTILES]
        if not metrics.removable:
            reset = (drift if watched.scored_at is not None else []) + (anomaly if watched.anomalous else [])
            for gauge, values in reset:
                gauge.labels(*values).set(0)
            return
        gone = [(metrics.profile, labels), *drift, *anomaly]
        for part in PARTS:
            for quantile in QUANTILES:
                gone += [(gauge, (*labels, part, quantile)) for gauge in (metrics.latency, metrics.latency_baseline)]
        for gauge, values in gone:
            with contextlib.suppress(KeyError):  # never set
                gauge.remove(*values)

    async def _judge_latency(self, watched: _Watched, now: float) -> None:
        model, baseline = watched.model, watched.baseline
        if baseline is None or model.latency is None or now - watched.window_started < baseline.config.window_s:
            return
        watched.window_started = now
        # percentiles of up to 100k times: in a worker thread (the baseline is only ever touched by this task)
        figures, anomalies = await asyncio.to_thread(baseline.judge, *model.latency.take())
        if not figures:
            return
        labels = (model.name, model.version_label)
        for (part, quantile), seconds in figures.items():
            self.metrics.latency.labels(*labels, part, quantile).set(seconds)
            median = baseline.median(part, quantile)
            if median is not None:
                self.metrics.latency_baseline.labels(*labels, part, quantile).set(median)
            found = next((a for a in anomalies if (a.part, a.quantile) == (part, quantile)), None)
            self.metrics.anomaly.labels(*labels, part, quantile).set(found.ratio if found is not None else 0)
        # the state first, the record after: a report asked while the event is written says what the figures say
        was, watched.anomalous = watched.anomalous, bool(anomalies)
        if anomalies and not was:
            worst = max(anomalies, key=lambda a: a.ratio)
            details = {
                "version": model.version_label,
                "part": worst.part,
                "quantile": worst.quantile,
                "ratio": worst.ratio,
                "anomalies": [_anomaly_json(a) for a in anomalies],
            }
            log.warning(
                "model %s version %s: %s %s latency %s is %.1fx its baseline %s",
                model.name, model.version_label, worst.part, worst.quantile, duration_text(worst.seconds), worst.ratio,
                duration_text(worst.baseline),
            )  # fmt: skip
            await self._episode(model, "latency_anomaly", details)
        elif not anomalies and was:
            await self._record(model.name, "latency_normal", {"version": model.version_label})

    async def _score_drift(self, watched: _Watched, now: float) -> None:
        model, window = watched.model, watched.drift
        settings = model.config.monitoring.drift
        if window is None or model.profile is None or now - watched.last_scored < settings.interval_s:
            return
        if window.held < settings.min_rows:
            return
        watched.last_scored = now
        scores = await asyncio.to_thread(score, model.profile, window.snapshot(), settings.threshold)
        watched.scores, watched.scored_at = scores, time.monotonic()
        labels = (model.name, model.version_label)
        for found in scores:
            self.metrics.drift.labels(*labels, found.name, found.side, found.method).set(found.score)
        drifted = [s for s in scores if s.drifted]
        self.metrics.drifted.labels(*labels).set(len(drifted))
        self.metrics.drift_rows.labels(*labels).set(window.held)
        # the state first, the record after: a report asked while the event is written (the registry, in a worker
        # thread) says "drift" with the features it names, not "ok"
        was, watched.drifting = watched.drifting, bool(drifted)
        if drifted and not was:
            details = {
                "version": model.version_label,
                "threshold": settings.threshold,
                "rows": window.held,
                "drifted": [_feature_json(s) for s in drifted],
                "worst": _feature_json(drifted[0]),
            }
            log.warning(
                "model %s version %s: drift in %s (worst %s: %s %.3f)",
                model.name, model.version_label, ", ".join(s.name for s in drifted), drifted[0].name,
                drifted[0].method, drifted[0].score,
            )  # fmt: skip
            await self._episode(model, "drift", details)
        elif not drifted and was:
            await self._record(model.name, "drift_cleared", {"version": model.version_label, "rows": window.held})

    async def _episode(self, model: ModelVersion, kind: str, details: dict[str, Any]) -> None:
        self.metrics.events.labels(model.name, model.version_label, kind).inc()
        await self._record(model.name, kind, details)

    async def _record(self, name: str, kind: str, details: dict[str, Any]) -> None:
        if self.events is None:
            return
        try:
            await asyncio.to_thread(self.events.add_event, name, kind, details)
        except Exception as exc:  # the registry being down must not stop the watch; the metric still says it
            log.error("model %s: could not record the %s event in the registry: %s", name, kind, exc)


def _reloaded(old: ModelVersion, new: ModelVersion) -> str:
    if old.profile is not None and new.profile is None:
        return "the version reloaded without its reference profile"
    return "the version reloaded: its drift window and latency baseline start afresh"


def _feature_json(found: FeatureDrift) -> dict[str, Any]:
    return {
        "name": found.name,
        "side": found.side,
        "method": found.method,
        "score": found.score,
        "drifted": found.drifted,
        "rows": found.rows,
    }


def _anomaly_json(anomaly: Any) -> dict[str, Any]:
    return {
        "part": anomaly.part,
        "quantile": anomaly.quantile,
        "seconds": round(anomaly.seconds, 6),
        "baseline_seconds": round(anomaly.baseline, 6),
        "ratio": anomaly.ratio,
        "mads": anomaly.score,
    }


def _sample(watched: _Watched, window: DriftWindow, request: InferenceRequest, response: InferenceResponse) -> None:
    """A sampled answer's rows into its version's drift window (``watched``), and the next sample drawn."""
    window.skip = sampling_gap(window.rate)
    tensors = request.inputs
    first = tensors[0].data if tensors else None
    rows = min(first.shape[0] if first is not None and first.ndim else 1, window.rows)
    # only the profiled tensors, copied (a view would keep the whole request body alive in the window), by plain
    # loops: a comprehension is a function made and called, dear on a path that runs cold (10.7 -> 8.7 µs a sample
    # in a loaded server, ``benchmarks/monitoring_insitu.py``)
    inputs: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    names = watched.profiled_inputs
    for tensor in tensors:
        if tensor.name in names and tensor.data.ndim:
            inputs[tensor.name] = tensor.data[:rows].copy()
    names = watched.profiled_outputs
    for tensor in response.outputs:
        if tensor.name in names and tensor.data.ndim:
            outputs[tensor.name] = tensor.data[:rows].copy()
    window.add(rows, inputs, outputs)
