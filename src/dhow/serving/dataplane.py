"""The transport-neutral data plane: every door (REST, gRPC, batch, stream) calls this.

Answers are plain data (dicts and lists ready for JSON, or ``InferenceResponse``), so that
a door only translates; policies, validation, statistics and metrics live here once.
"""

from __future__ import annotations

from typing import Any

from dhow.core.types import InferenceRequest, InferenceResponse


class DataPlane:
    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        raise NotImplementedError

    def live(self) -> bool:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def server_metadata(self) -> dict[str, Any]:
        """``{"name", "version", "extensions": [...]}``."""
        raise NotImplementedError

    def model_ready(self, name: str, version: str = "") -> bool:
        """Raises ``NotFound`` for a model or version the repository does not have."""
        raise NotImplementedError

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        """``{"name", "versions", "platform", "inputs": [{name, datatype, shape}], "outputs": [...]}``."""
        raise NotImplementedError

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        """Triton's model-configuration JSON (dims without the batch dimension)."""
        raise NotImplementedError

    def model_statistics(self, name: str = "", version: str = "") -> dict[str, Any]:
        """Triton's statistics: ``{"model_stats": [{name, version, last_inference, ...}]}``."""
        raise NotImplementedError

    def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """``[{"name", "version", "state", "reason"}]`` for every model the repository holds."""
        raise NotImplementedError

    async def load_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        raise NotImplementedError

    async def unload_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        raise NotImplementedError
