"""``--model-control poll``: follow the repository on disk, as the service identity ``dhow:repository-poll``.

Each load or unload the files asked for enters the core's admission point like a deployer's request through
the API would, so it is checked and audited the same way (by that name, with the versions it left serving).
"""

from __future__ import annotations

import asyncio
import logging

from dhow.core.errors import DhowError, ModelLoadError
from dhow.serving.lifecycle import ModelLifecycle
from dhow.serving.service import ACTIONS, CoreService, service_identity

__all__ = ["POLLER", "RepositoryPoller"]

log = logging.getLogger("dhow.models")

POLLER = service_identity("dhow:repository-poll", role="deployer")


class RepositoryPoller:
    def __init__(self, models: ModelLifecycle, service: CoreService, interval_s: float) -> None:
        self.models = models
        self.service = service
        self.interval_s = interval_s

    async def run(self) -> None:
        """Load new or changed models, unload removed ones, every ``interval_s`` seconds."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll_once()
            except Exception:
                log.exception("polling the model repository failed")

    async def poll_once(self) -> None:
        gone, changed = await self.models.changes_on_disk()
        for name in gone:
            await self._apply("model.unload", name)
        for name in changed:
            await self._apply("model.load", name)

    async def _apply(self, action: str, name: str) -> None:
        try:
            async with self.service.call(POLLER, ACTIONS[action], name) as call:
                if action == "model.unload":
                    await self.models.unload(name)
                    call.note(versions=[], reason="removed from disk")
                    return
                await self.models.load(name)
                entry = self.models.entries.get(name)
                versions = sorted(entry.versions) if entry is not None else []
                call.note(versions=versions, reason=entry.reason if entry is not None else "")
                if entry is not None and entry.state != "READY":
                    raise ModelLoadError(entry.reason or f"model '{name}' is {entry.state}")
        except DhowError as exc:
            log.warning("repository poll: %s of %s: %s", action, name, exc.message)
