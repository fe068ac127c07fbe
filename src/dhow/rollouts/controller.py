"""The rollouts of one server, started and stopped together: following the registry, canary analysis, shadows.

The pieces are built by the composition root (``dhow.server``) with their collaborators; this class only
runs their loops: ``DeploymentEditor.refresh`` every ``poll_s`` seconds, ``CanaryAnalyst.analyse`` every
``analysis_s`` seconds, and the shadow workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from dhow.rollouts.analysis import CanaryAnalyst
from dhow.rollouts.editor import DeploymentEditor
from dhow.rollouts.shadow import ShadowRunner

__all__ = ["RolloutController"]

log = logging.getLogger("dhow.rollouts")


class RolloutController:
    def __init__(
        self,
        editor: DeploymentEditor,
        analyst: CanaryAnalyst,
        shadows: ShadowRunner,
        *,
        poll_s: float = 2.0,
        analysis_s: float = 1.0,
    ) -> None:
        self.editor = editor
        self.analyst = analyst
        self.shadows = shadows
        self.poll_s = poll_s
        self.analysis_s = analysis_s
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Apply the registry's deployments, then follow it."""
        await self.editor.refresh()
        self._tasks = [
            asyncio.create_task(_every(self.poll_s, self.editor.refresh), name="registry-poll"),
            asyncio.create_task(_every(self.analysis_s, self.analyst.analyse), name="canary-analysis"),
        ]
        self.shadows.start()

    async def close(self) -> None:
        await self.shadows.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self.editor.store.close)


async def _every(seconds: float, action: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await action()
        except Exception:
            log.exception("rollout %s failed", getattr(action, "__name__", "task"))
