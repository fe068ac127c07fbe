"""What serving asks of a traffic policy, and what a traffic policy may ask of serving.

``serving`` defines these small protocols; ``rollouts`` implements ``TrafficRouter`` (deployments: canary,
A/B, shadow, blue/green) and uses ``VersionControl`` and ``Invoke``. So the dependency points one way:
nothing in ``serving`` imports ``rollouts``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from dhow.core.model_config import TensorSpec
from dhow.core.types import InferenceRequest, InferenceResponse

__all__ = ["Invoke", "Routing", "ServedVersion", "TrafficRouter", "VersionControl"]


class Routing(Protocol):
    """Where a traffic policy sent one request, and the ear it wants to hear how it went."""

    @property
    def version(self) -> int: ...

    @property
    def variant(self) -> str: ...

    def observe(
        self, request: InferenceRequest, response: InferenceResponse | None, outcome: str, seconds: float
    ) -> None:
        """The request ended with ``outcome`` (``success`` or an error code) after ``seconds``."""


class TrafficRouter(Protocol):
    def route(self, request: InferenceRequest) -> Routing | None:
        """The version a request that names none goes to; None: the model's newest ready version."""


class ServedVersion(Protocol):
    """A loaded version as a traffic policy sees it: its outputs, that a shadow policy's per-output settings
    name."""

    @property
    def outputs(self) -> Mapping[str, TensorSpec]: ...


class VersionControl(Protocol):
    """The model lifecycle as a traffic policy uses it: keep the versions its policy needs loaded."""

    def resolve(self, name: str, version: str = "") -> ServedVersion: ...

    def tenant_of(self, name: str) -> str: ...

    def knows(self, name: str) -> bool: ...

    async def require_versions(self, name: str, versions: frozenset[int]) -> None: ...

    async def release_versions(self, name: str, keep: frozenset[int] = frozenset()) -> None: ...


#: run one request through the one admission point as an in-process service identity
Invoke = Callable[[InferenceRequest], Awaitable[InferenceResponse]]
