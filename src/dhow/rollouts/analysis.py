"""Canary analysis: every second, judge each progressing canary on this server's window; roll back or promote.

A decision is an edit like any other (a new revision in the registry, by ``dhow-analysis``), plus an event with
the figures it was made on. It enters through the core's admission point as that service identity, so the
audit trail records it as it records a person's edit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from dhow.core.errors import Conflict, DhowError
from dhow.rollouts.editor import DeploymentEditor, after_action
from dhow.rollouts.policy import canary_weight
from dhow.rollouts.routing import Active, Window
from dhow.serving.service import ACTIONS, CoreService, service_identity

__all__ = ["ANALYST", "CanaryAnalyst", "Quality", "judge"]

#: a version's quality figures from feedback and how many labels they rest on (``ModelWatch.quality``)
Quality = Callable[[str, int], tuple[dict[str, float], int]]

log = logging.getLogger("dhow.rollouts")

#: who makes automatic decisions, in the deployments' history and the audit trail
ANALYST = "dhow-analysis"
_IDENTITY = service_identity(ANALYST, role="deployer")


class CanaryAnalyst:
    def __init__(self, editor: DeploymentEditor, service: CoreService, registry: CollectorRegistry) -> None:
        self.editor = editor
        self.service = service
        self.events = Counter(
            "dhow_rollout_events",
            "Automatic canary decisions: rollback or promote.",
            ["deployment", "kind"],
            registry=registry,
        )

    async def analyse(self) -> None:
        """Judge every progressing canary on this server's window; roll back or promote."""
        watch = self.service.dataplane.watch
        quality = watch.quality if watch is not None else None
        for name, active in list(self.editor.table.active.items()):
            decision = _due(active, quality)
            if decision is not None:
                await self._decide(name, active, *decision)

    async def _decide(self, name: str, active: Active, action: str, reason: str, figures: dict[str, Any]) -> None:
        try:
            async with self.service.call(_IDENTITY, ACTIONS[f"deployment.{action}"], name) as call:
                policy = after_action(active.deployment.policy, action)
                await self.editor.write(name, policy, active.deployment.revision, ANALYST, action, reason)
                call.note(reason=reason, revision=active.deployment.revision + 1, **figures)
        except Conflict:
            return  # someone edited it meanwhile: the next look judges the new revision
        except DhowError as exc:
            log.error("canary %s: automatic %s failed: %s", name, action, exc.message)
            return
        await asyncio.to_thread(self.editor.store.add_event, name, action, {"reason": reason, **figures})
        self.events.labels(name, action).inc()
        log.warning("canary %s: %s (%s)", name, action, reason)


def _due(active: Active, quality: Quality | None = None) -> tuple[str, str, dict[str, Any]] | None:
    """The verdict to act on now, if any: a progressing canary, judged, promotions only when allowed and due."""
    policy = active.deployment.policy
    if policy["kind"] != "canary" or policy["state"] != "progressing" or canary_weight(policy) == 0:
        return None
    verdict = judge(active, quality)
    if verdict is None or verdict[0] == "rollback":
        return verdict
    if not policy["auto_promote"] or time.monotonic() - active.step_started < policy["step_interval_s"]:
        return None
    return verdict


def judge(active: Active, quality: Quality | None = None) -> tuple[str, str, dict[str, Any]] | None:
    """A canary's verdict on its window: ('rollback'|'promote', reason, figures), or None to wait."""
    guards: dict[str, Any] = active.deployment.policy["guards"]
    if guards.get("min_accuracy_ratio") is not None:
        verdict = _judge_quality(active, guards, quality)
        if verdict is None or verdict[0] == "rollback":
            return verdict
    canary = active.windows.get("canary", Window())
    primary = active.windows.get("primary", Window())
    if canary.requests < guards["min_requests"]:
        return None
    error_rate = canary.errors / canary.requests
    canary_p99, primary_p99 = canary.p99_ms(), primary.p99_ms()
    ratio = canary_p99 / primary_p99 if canary_p99 is not None and primary_p99 else None
    figures = {
        "canary": canary.as_dict(),
        "primary": primary.as_dict(),
        "error_rate": round(error_rate, 6),
        "p99_ratio": None if ratio is None else round(ratio, 3),
        "weight": canary_weight(active.deployment.policy),
    }
    if error_rate > guards["max_error_rate"]:
        reason = (
            f"guard max_error_rate breached: canary error rate {error_rate:.3f} > {guards['max_error_rate']} "
            f"over {canary.requests} requests"
        )
        return "rollback", reason, {**figures, "guard": "max_error_rate"}
    slower_ms = (canary_p99 or 0.0) - (primary_p99 or 0.0)
    if ratio is not None and ratio > guards["max_p99_ratio"] and slower_ms > guards["min_p99_slack_ms"]:
        reason = (
            f"guard max_p99_ratio breached: canary p99 {canary_p99:.1f} ms is {ratio:.2f}x the primary's "
            f"{primary_p99:.1f} ms (limit {guards['max_p99_ratio']}x beyond {guards['min_p99_slack_ms']} ms)"
        )
        return "rollback", reason, {**figures, "guard": "max_p99_ratio"}
    if ratio is None and primary.requests == 0 and canary_weight(active.deployment.policy) < 100:
        return None  # nothing to compare the canary's latency with yet
    return "promote", f"all guards hold over {canary.requests} canary requests", figures


def _judge_quality(
    active: Active, guards: dict[str, Any], quality: Quality | None
) -> tuple[str, str, dict[str, Any]] | None:
    """The quality guard: ('rollback', ...) when the canary's accuracy fell below min_accuracy_ratio of the
    primary's, ('pass', ...) when both have enough labels and it holds, None to wait for labels."""
    if quality is None:
        return None
    policy, name = active.deployment.policy, active.deployment.name
    (canary, canary_labels), (primary, primary_labels) = (
        quality(name, policy["canary"]),
        quality(name, policy["primary"]),
    )
    if (
        min(canary_labels, primary_labels) < guards["min_feedback"]
        or "accuracy" not in canary
        or "accuracy" not in primary
    ):
        return None
    ratio = canary["accuracy"] / primary["accuracy"] if primary["accuracy"] else 1.0
    figures = {
        "guard": "min_accuracy_ratio",
        "canary_accuracy": round(canary["accuracy"], 6),
        "primary_accuracy": round(primary["accuracy"], 6),
        "accuracy_ratio": round(ratio, 6),
        "labels": {"canary": canary_labels, "primary": primary_labels},
    }
    if ratio < guards["min_accuracy_ratio"]:
        reason = (
            f"guard min_accuracy_ratio breached: canary accuracy {canary['accuracy']:.4f} is {ratio:.3f} of the "
            f"primary's {primary['accuracy']:.4f} (limit {guards['min_accuracy_ratio']}) over {canary_labels} labels"
        )
        return "rollback", reason, figures
    return "pass", "", figures
