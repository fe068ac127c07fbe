"""Deployments kept in step with the registry, and edited through it.

The registry (``RegistryStore``) is the truth; this server keeps a compiled copy of every deployment in its
``DeploymentTable``, checks the registry's generation every ``poll_s`` seconds for edits made by other servers,
and applies its own edits through ``write``: validate, load the versions the new policy needs (the lifecycle warms
them as their model.yaml says before they can be routed to), write with the expected revision, then swap the
compiled policy in one assignment (so a switch is atomic for requests).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from dhow.core.errors import Conflict, DhowError, InvalidInput, NotFound, unknown_model
from dhow.core.spelling import did_you_mean
from dhow.rollouts.policy import CompiledPolicy, canary_weight, normalize, versions_of
from dhow.rollouts.routing import Active, DeploymentTable
from dhow.rollouts.store import Deployment, RegistryStore
from dhow.serving.traffic import VersionControl

__all__ = ["DeploymentEditor", "after_action"]

log = logging.getLogger("dhow.rollouts")


class DeploymentEditor:
    def __init__(self, store: RegistryStore, models: VersionControl, table: DeploymentTable) -> None:
        self.store = store
        self.models = models
        self.table = table
        self._generation = -1
        self._edit_lock = asyncio.Lock()

    @property
    def active(self) -> dict[str, Active]:
        return self.table.active

    # -- following the registry -----------------------------------------------------------

    async def refresh(self) -> None:
        """Apply what changed in the registry since the last look (edits by any server)."""
        generation = await asyncio.to_thread(self.store.generation)
        if generation == self._generation:
            return
        deployments = {d.name: d for d in await asyncio.to_thread(self.store.list)}
        for name in sorted(set(self.active) - set(deployments)):
            removed = self.active.pop(name)
            await self.models.release_versions(name)
            log.info("deployment %s removed (was revision %d)", name, removed.deployment.revision)
        for name, deployment in deployments.items():
            current = self.active.get(name)
            if current is not None and current.deployment.revision == deployment.revision:
                continue
            try:
                await self._apply(deployment)
            except DhowError as exc:
                log.error("deployment %s revision %d cannot be applied here: %s", name, deployment.revision, exc)
        self._generation = generation

    async def _apply(self, deployment: Deployment) -> None:
        needed = versions_of(deployment.policy)
        await self.models.require_versions(deployment.name, needed)  # loaded and warmed (model.yaml's warmup)
        self._install(deployment)
        await self.models.release_versions(deployment.name, keep=needed)

    def _install(self, deployment: Deployment) -> None:
        previous = self.active.get(deployment.name)
        active = Active(deployment, CompiledPolicy(deployment.policy))
        if previous is not None and _same_step(previous.deployment.policy, deployment.policy):
            active.windows, active.step_started = previous.windows, previous.step_started
        if previous is not None and previous.deployment.policy == deployment.policy:
            active.shadow = previous.shadow
        self.table.active[deployment.name] = active  # one assignment: requests see the old or the new policy
        log.info("deployment %s at revision %d: %s", deployment.name, deployment.revision, _describe(deployment.policy))

    # -- edits (the admin API) ------------------------------------------------------------

    def get(self, name: str) -> dict[str, Any]:
        active = self.active.get(name)
        if active is None:
            raise NotFound(f"no deployment '{name}'; GET /v2/admin/deployments lists them")
        return active.as_dict()

    def list_all(self) -> list[dict[str, Any]]:
        return [self.active[name].as_dict() for name in sorted(self.active)]

    async def put(self, name: str, policy: Any, revision: Any, actor: str, reason: Any) -> dict[str, Any]:
        canonical = normalize(policy)
        expected = _revision(revision)
        action = "create" if expected == 0 else "edit"
        await self.write(name, canonical, expected, actor, action, reason)
        return self.get(name)

    async def act(self, name: str, action: str, revision: Any, actor: str, reason: Any) -> dict[str, Any]:
        """promote, rollback, switch or release, on the current (or the given) revision."""
        await self.refresh()
        current = self.active.get(name)
        if current is None:
            raise NotFound(f"no deployment '{name}'; GET /v2/admin/deployments lists them")
        if revision is not None and _revision(revision) != current.deployment.revision:
            raise Conflict(
                f"deployment '{name}' is at revision {current.deployment.revision}, not {revision}: "
                "read it again and retry"
            )
        policy = after_action(current.deployment.policy, action)
        await self.write(name, policy, current.deployment.revision, actor, action, reason)
        return self.get(name)

    async def delete(self, name: str, revision: Any, actor: str, reason: Any) -> None:
        expected = _revision(revision)
        async with self._edit_lock:
            await asyncio.to_thread(
                self.store.delete, name, expected_revision=expected, actor=actor, reason=_reason(reason)
            )
            self.active.pop(name, None)
            await self.models.release_versions(name)

    async def history(self, name: str) -> list[dict[str, Any]]:
        """Every change of the model's deployment; a deleted deployment or a model gone from the repository keeps
        its history, a name never known is refused (a typo would otherwise read as a model never deployed)."""
        rows = await asyncio.to_thread(self.store.history, name)
        if not rows and not self.models.knows(name):
            raise unknown_model(name)
        return [row.as_dict() for row in rows]

    async def events(self, name: str) -> list[dict[str, Any]]:
        """The model's events; a model gone from the repository keeps its history, a name never known is refused
        (a typo would otherwise read as a model with no events)."""
        events = await asyncio.to_thread(self.store.events, name)
        if not events and not self.models.knows(name):
            raise unknown_model(name)
        return [event.as_dict() for event in events]

    async def write(
        self, name: str, policy: dict[str, Any], expected: int, actor: str, action: str, reason: str
    ) -> None:
        """Load what the policy needs, write it at the expected revision, then apply it; all or nothing."""
        async with self._edit_lock:
            needed = versions_of(policy)
            before = self.active.get(name)
            keep = versions_of(before.deployment.policy) if before is not None else frozenset()
            await self.models.require_versions(name, needed | keep)
            try:
                _check_outputs(self.models, name, policy)
                deployment = await asyncio.to_thread(
                    self.store.put,
                    name,
                    policy,
                    expected_revision=expected,
                    actor=actor or "anonymous",
                    action=action,
                    reason=_reason(reason),
                )
            except BaseException:
                await self.models.release_versions(name, keep=keep)
                raise
            self._install(deployment)
            await self.models.release_versions(name, keep=needed)


def after_action(policy: Mapping[str, Any], action: str) -> dict[str, Any]:
    kind = policy["kind"]
    result = dict(policy)
    if action in ("promote", "rollback"):
        if kind != "canary":
            raise InvalidInput(f"{action} applies to canary deployments; this one is {kind}")
        if policy["state"] != "progressing":
            raise InvalidInput(f"the canary is {policy['state'].replace('_', ' ')}; set a new policy to start again")
        if action == "rollback":
            result["state"] = "rolled_back"
        elif policy["step"] + 1 < len(policy["steps"]):
            result["step"] = policy["step"] + 1
        else:
            result["state"] = "promoted"
        return normalize(result, keep_state=True)
    if action in ("switch", "release"):
        if kind != "bluegreen":
            raise InvalidInput(f"{action} applies to bluegreen deployments; this one is {kind}")
        if action == "switch":
            result["active"] = "green" if policy["active"] == "blue" else "blue"
            return normalize(result)
        return {"kind": "pinned", "version": policy[policy["active"]]}
    raise InvalidInput(f"unknown action {action!r}; use promote, rollback, switch or release")


def _check_outputs(models: VersionControl, name: str, policy: Mapping[str, Any]) -> None:
    """A shadow's per-output settings must name outputs the model has: a misspelt one would compare nothing."""
    if policy["kind"] != "shadow":
        return
    outputs = models.resolve(name, str(policy["primary"])).outputs
    unknown = sorted({*policy["compare"], *policy["tolerances"]} - set(outputs))
    if unknown:
        hint = did_you_mean(unknown[0], outputs)
        raise InvalidInput(
            f"the shadow policy names output {unknown[0]!r}, which {name} version {policy['primary']} does not "
            f"have{f' ({hint})' if hint else ''}; its outputs are {', '.join(outputs)}"
        )


def _same_step(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    keys = ("kind", "primary", "canary", "steps", "step", "state")
    return all(old.get(k) == new.get(k) for k in keys)


def _revision(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(
            f"'revision' must be the deployment's current revision (an integer; 0 to create), got {value!r}"
        )
    return value


def _reason(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"'reason' must be a string, got {value!r}")
    return value


def _describe(policy: Mapping[str, Any]) -> str:
    kind = policy["kind"]
    if kind == "pinned":
        return f"pinned to version {policy['version']}"
    if kind == "canary":
        return (
            f"canary version {policy['canary']} at {canary_weight(policy)}% over version {policy['primary']} "
            f"({policy['state'].replace('_', ' ')})"
        )
    if kind == "shadow":
        return f"version {policy['primary']} answers, version {policy['shadow']} shadows {policy['sample']:.0%}"
    if kind == "bluegreen":
        live = policy["active"]
        return f"{live} (version {policy[live]}) live; blue {policy['blue']}, green {policy['green']}"
    return "A/B " + ", ".join(f"{v['name']}=v{v['version']}:{v['weight']}%" for v in policy["variants"])
