"""The actions a caller may ask for: each needs one permission and has one name in the audit trail.

An action is what a request does (``infer``, ``deployment.put``, ``key.rotate``), as the audit trail names
it. Every door maps each of its routes or methods to one of these (``dhow.protocols.routes``), so that the
same permission guards the same action whichever way it comes in.
"""

from __future__ import annotations

from dataclasses import dataclass

from dhow.access.permissions import Permission

__all__ = ["ACTIONS", "Access"]


@dataclass(frozen=True, slots=True)
class Access:
    """What a route or RPC needs, and how the audit trail names what it does."""

    permission: Permission
    action: str


def _actions(*pairs: tuple[Permission, str]) -> dict[str, Access]:
    return {action: Access(permission, action) for permission, action in pairs}


_P = Permission
#: every action a door may map a route or RPC to, by its name in the audit trail
ACTIONS: dict[str, Access] = _actions(
    (_P.SERVER_READ, "server.metadata"),
    (_P.SERVER_READ, "server.openapi"),
    (_P.METRICS_READ, "metrics.read"),
    (_P.STATS_READ, "stats.read"),
    # a version's live drift against its reference profile
    (_P.STATS_READ, "model.drift"),
    (_P.MODEL_READ, "model.metadata"),
    (_P.MODEL_READ, "model.ready"),
    (_P.MODEL_READ, "model.config"),
    (_P.MODEL_READ, "repository.index"),
    (_P.INFER, "infer"),
    # a batch job's run: one record with its rows, errors and file digests (each batch is an ``infer``)
    (_P.INFER, "batch.run"),
    # a stream consumer's start and end, with its counts (each batch of messages is an ``infer``)
    (_P.INFER, "stream.run"),
    # ground truth for earlier answers: whoever may ask the model may say how right it was
    (_P.INFER, "model.feedback"),
    (_P.MODEL_MANAGE, "model.load"),
    (_P.MODEL_MANAGE, "model.unload"),
    (_P.DEPLOYMENT_READ, "deployment.read"),
    (_P.DEPLOYMENT_WRITE, "deployment.put"),
    (_P.DEPLOYMENT_WRITE, "deployment.delete"),
    (_P.DEPLOYMENT_WRITE, "deployment.action"),
    # the canary analysis' automatic decisions: no route, the in-process identity ``dhow-analysis``
    (_P.DEPLOYMENT_WRITE, "deployment.promote"),
    (_P.DEPLOYMENT_WRITE, "deployment.rollback"),
    (_P.ACCESS_MANAGE, "key.list"),
    (_P.ACCESS_MANAGE, "key.create"),
    (_P.ACCESS_MANAGE, "key.revoke"),
    (_P.ACCESS_MANAGE, "key.rotate"),
    (_P.AUDIT_READ, "audit.read"),
    (_P.AUDIT_READ, "audit.verify"),
)
