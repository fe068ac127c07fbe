"""The human-readable forms of ``dhow rollout``'s answers: deployments, policies, history rows and events."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["describe_deployment", "describe_event", "describe_history_row", "describe_listing", "describe_policy"]


def describe_deployment(deployment: Any) -> str:
    """A deployment in a few lines: name and revision, last change, policy, live figures."""
    if not isinstance(deployment, dict):
        return json.dumps(deployment)
    lines = [
        f"{deployment.get('name', '?')}  revision {deployment.get('revision', '?')}, "
        f"{_who_when(deployment.get('updated_by'), deployment.get('updated_at'))}",
        f"  {describe_policy(deployment.get('policy'))}",
    ]
    status = deployment.get("status")
    if status:
        lines.append(f"  status: {_describe_status(status)}")
    return "\n".join(lines)


def describe_listing(deployments: list[dict[str, Any]]) -> str:
    """One line a deployment: name, revision, policy, last change."""
    if not deployments:
        return "no deployments"
    width = max(len(str(d.get("name", ""))) for d in deployments)
    return "\n".join(
        f"{d.get('name', '?')!s:<{width}}  rev {d.get('revision', '?')}  {describe_policy(d.get('policy'))}"
        f"  ({_who_when(d.get('updated_by'), d.get('updated_at'))})"
        for d in deployments
    )


def describe_history_row(row: dict[str, Any]) -> str:
    """``rev N  time  actor  action  "reason"  before → after``."""
    reason = row.get("reason") or ""
    quoted = f'"{reason}"' if reason else "-"
    return (
        f"rev {row.get('revision', '?')}  {_when(row)}  {row.get('actor') or 'anonymous'}  "
        f"{row.get('action', '?')}  {quoted}  {describe_policy(row.get('before'))} → "
        f"{describe_policy(row.get('after'))}"
    )


def describe_policy(policy: Any) -> str:
    """A policy in one short line, e.g. ``pinned: version 2``; ``none`` for no policy."""
    if policy is None:
        return "none"
    try:
        return _POLICY_FORMS[policy["kind"]](policy)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return json.dumps(policy, separators=(",", ":"))


def _pinned(policy: dict[str, Any]) -> str:
    return f"pinned: version {policy['version']}"


def _canary(policy: dict[str, Any]) -> str:
    steps = list(policy.get("steps") or [5, 25, 50, 100])
    step = int(policy.get("step", 0))
    state = policy.get("state", "progressing")
    weight = {"rolled_back": 0, "promoted": 100}.get(state, steps[step])
    text = (
        f"canary: version {policy['canary']} gets {weight}% (step {step + 1} of {len(steps)}), "
        f"primary version {policy['primary']}; {_guards(policy.get('guards'))}"
    )
    if policy.get("auto_promote"):
        interval = float(policy.get("step_interval_s") or 0)
        text += f"; auto-promote{f' every {interval:g} s at least' if interval else ''}"
    return f"{text}; state {state}"


def _guards(given: Any) -> str:
    guards = {"max_error_rate": 0.05, "max_p99_ratio": 2.0, "min_requests": 50, **(given or {})}
    return (
        f"guards: max error rate {_percent(guards['max_error_rate'])}, "
        f"max p99 ratio {float(guards['max_p99_ratio'])}"
        + (f" beyond {float(guards['min_p99_slack_ms']):g} ms" if "min_p99_slack_ms" in guards else "")
        + f", min {guards['min_requests']} requests"
        + (
            f", accuracy at least {float(guards['min_accuracy_ratio']):g}x the primary's"
            if guards.get("min_accuracy_ratio") is not None
            else ""
        )
    )


def _ab(policy: dict[str, Any]) -> str:
    variants = ", ".join(f"{v['name']} → version {v['version']} {v['weight']}%" for v in policy["variants"])
    return f"ab: {variants}; sticky by {policy.get('sticky_key') or 'user_id'}"


def _shadow(policy: dict[str, Any]) -> str:
    sample = policy.get("sample", 1.0)
    text = f"shadow: version {policy['primary']} answers, {_percent(sample)} copied to version {policy['shadow']}"
    labels = [f"{name} compared by label" for name, how in _pairs(policy.get("compare")) if how == "label"]
    tolerances = [
        f"{name} within rtol {tolerance.get('rtol')}, atol {tolerance.get('atol')}"
        for name, tolerance in _pairs(policy.get("tolerances"))
        if isinstance(tolerance, dict)
    ]
    return "; ".join([text, *labels, *tolerances])


def _pairs(value: Any) -> list[tuple[str, Any]]:
    """A mapping's items; none when it is absent or not a mapping (odd policies never break the output)."""
    return list(value.items()) if isinstance(value, dict) else []


def _bluegreen(policy: dict[str, Any]) -> str:
    active = policy.get("active", "blue")
    if active not in ("blue", "green"):
        raise ValueError(active)
    colours = [f"{c} version {policy[c]}{' (active)' if c == active else ''}" for c in ("blue", "green")]
    return f"bluegreen: {', '.join(colours)}"


_POLICY_FORMS: dict[str, Callable[[dict[str, Any]], str]] = {
    "pinned": _pinned,
    "canary": _canary,
    "ab": _ab,
    "shadow": _shadow,
    "bluegreen": _bluegreen,
}


def describe_event(event: dict[str, Any]) -> str:
    """``at  kind  "reason"  figures``; the figures of a canary window read as a sentence."""
    details = event.get("details")
    if not isinstance(details, dict):
        skip = {"name", "at", "time", "kind", "action"}
        details = {key: value for key, value in event.items() if key not in skip}
    parts = [_when(event), str(event.get("kind") or event.get("action") or "event")]
    reason = details.get("reason")
    if isinstance(reason, str) and reason:
        parts.append(f'"{reason}"')
    figures = [
        _figure(key, value) for key, value in details.items() if not (key == "reason" and isinstance(value, str))
    ]
    if figures:
        parts.append("; ".join(figures))
    return "  ".join(parts)


def _figure(key: str, value: Any) -> str:
    """One figure of an event, in words where it has a known meaning, else ``key=value``."""
    try:
        if isinstance(value, dict) and "requests" in value:
            return f"{key} {_window(value)}"
        if key == "error_rate" and value is not None:
            return f"error rate {_percent(value)}"
        if key == "p99_ratio" and value is not None:
            return f"p99 ratio {float(value):g}"
        if key == "weight" and value is not None:
            return f"weight {value}%"
    except (TypeError, ValueError):
        pass
    return _flatten({key: value})


def _describe_status(status: Any) -> str:
    if not isinstance(status, dict):
        return json.dumps(status)
    try:
        if "window" in status:
            return _canary_status(status)
        if isinstance(status.get("shadow"), dict):
            return _shadow_status(status["shadow"])
        if "agreed" in status:
            return _shadow_status(status)
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    return _flatten(status)


def _canary_status(status: dict[str, Any]) -> str:
    parts = [f"canary weight {status.get('weight', '?')}%"]
    parts += [f"{side} {_window(status['window'].get(side) or {})}" for side in ("primary", "canary")]
    return "; ".join(parts) + " (this step, this server)"


def _window(figures: dict[str, Any]) -> str:
    requests, errors = figures.get("requests", 0), figures.get("errors", 0)
    p99 = figures.get("p99_ms")
    latency = f", p99 {_ms(p99)}" if p99 is not None else ""
    return f"{_plural(requests, 'request')}, {_plural(errors, 'error')}{latency}"


def _shadow_status(status: dict[str, Any]) -> str:
    text = (
        f"{_plural(status.get('requests', 0), 'request')} compared, {status.get('agreed', 0)} agreed, "
        f"{status.get('disagreed', 0)} disagreed, {_plural(status.get('errors', 0), 'error')}, "
        f"{status.get('dropped', 0)} dropped"
    )
    if status.get("agreement_rate") is not None:
        text += f"; agreement {_percent(status['agreement_rate'])}"
    if status.get("mean_abs_difference") is not None:
        text += f"; mean abs difference {float(status['mean_abs_difference']):.3g}"
    if status.get("primary_p99_ms") is not None and status.get("shadow_p99_ms") is not None:
        text += f"; p99 primary {_ms(status['primary_p99_ms'])}, shadow {_ms(status['shadow_p99_ms'])}"
    return text


def _percent(fraction: Any) -> str:
    return f"{float(fraction) * 100:.4g}%"


def _ms(value: Any) -> str:
    return f"{float(value):.3g} ms"


def _plural(count: Any, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _flatten(values: Any, prefix: str = "") -> str:
    """``key=value`` pairs, nested objects as ``outer.inner=value``."""
    if not isinstance(values, dict):
        return f"{prefix}={json.dumps(values)}" if prefix else json.dumps(values)
    parts = []
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            parts.append(_flatten(value, name))
        elif isinstance(value, str):
            parts.append(f"{name}={value}" if value and " " not in value else f"{name}={json.dumps(value)}")
        else:
            parts.append(f"{name}={json.dumps(value)}")
    return " ".join(parts)


def _who_when(actor: Any, when: Any) -> str:
    return f"updated by {actor or 'anonymous'} at {when or '?'}"


def _when(row: dict[str, Any]) -> str:
    return str(row.get("time") or row.get("at") or row.get("updated_at") or "?")
