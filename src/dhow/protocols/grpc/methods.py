"""The access every RPC of ``GRPCInferenceService`` needs; None: open to anyone (health checks)."""

from __future__ import annotations

from dhow.serving.guard import ACTIONS, Access

__all__ = ["METHOD_ACCESS", "METHOD_ACTIONS"]

#: the action (see ``dhow.serving.guard.ACTIONS``) of every RPC; None: open to anyone (health checks)
METHOD_ACTIONS: dict[str, str | None] = {
    "ServerLive": None,
    "ServerReady": None,
    "ModelReady": "model.ready",
    "ServerMetadata": "server.metadata",
    "ModelMetadata": "model.metadata",
    "ModelConfig": "model.config",
    "ModelStatistics": "stats.read",
    "RepositoryIndex": "repository.index",
    "RepositoryModelLoad": "model.load",
    "RepositoryModelUnload": "model.unload",
    "ModelInfer": "infer",
    "ModelStreamInfer": "infer",
}

METHOD_ACCESS: dict[str, Access | None] = {
    rpc: None if action is None else ACTIONS[action] for rpc, action in METHOD_ACTIONS.items()
}
