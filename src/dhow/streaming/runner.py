"""Stream consumers started and stopped: by ``dhow stream run`` (a process with the core and no port) and by
``dhow serve`` for the ``streams:`` of its settings.

What can be refused is refused before anything is read: the model must be loaded, the identity must be allowed
to invoke it (the ``stream.run`` record through the admission point), the source's data region must be one this
server may process (``--region`` and the residency policy), the brokers must answer and the topics exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

from dhow.core.errors import DhowError, ModelLoadError, NotFound
from dhow.core.heap import settle_heap
from dhow.serving.composition import CorePolicies, compose_core
from dhow.serving.lifecycle import ModelLifecycle
from dhow.serving.security import Security
from dhow.serving.service import ACTIONS, CoreService
from dhow.settings import ServerSettings
from dhow.streaming.consumer import StreamConsumer, stream_identity
from dhow.streaming.shards import ShardStoreOpener
from dhow.streaming.spec import StreamSpec
from dhow.streaming.status import Meter, status_folder
from dhow.streaming.transports import open_transports

__all__ = ["StreamGroup", "load_stream_models", "open_consumer", "run_streams"]

log = logging.getLogger("dhow.streaming")


async def open_consumer(
    spec: StreamSpec, service: CoreService, *, meter: Meter | None = None, status_dir: Path | None = None,
    shard_stores: ShardStoreOpener | None = None, worker: int = 0,
) -> StreamConsumer:  # fmt: skip
    """A consumer ready to run: its checks passed (see the module's docstring), its clients connected;
    ``shard_stores`` opens the registry's checkpoint store (a Kinesis source's checkpoints and leases)."""
    region = service.dataplane.check_residency(spec.model, spec.version, spec.data_region)
    async with service.call(stream_identity(spec.name), ACTIONS["stream.run"], spec.model) as call:
        call.note(stream=spec.name, phase="start", source=str(spec.source), sink=str(spec.sink),
                  dead_letter=str(spec.dead_letter or ""), group=spec.group, data_region=region)  # fmt: skip
    opened = await open_transports(spec, f"dhow-{spec.name}", shard_stores)
    return StreamConsumer(spec, service, opened.source, opened.replies, opened.dead_letters,
                          transactions=opened.transactions, meter=meter, status_dir=status_dir,
                          worker=worker)  # fmt: skip


class StreamGroup:
    """The consumers of one process, run as tasks until ``stop``; each one's end is audited (``stream.run``)."""

    def __init__(self, service: CoreService) -> None:
        self.service = service
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, consumer: StreamConsumer) -> None:
        self._tasks.append(asyncio.create_task(self._run(consumer), name=f"stream {consumer.spec.name}"))

    async def _run(self, consumer: StreamConsumer) -> None:
        error = ""
        try:
            await consumer.run(self.stopping)
        except Exception as exc:
            error = str(exc)
            raise
        finally:
            await self._audit_end(consumer, error)

    async def _audit_end(self, consumer: StreamConsumer, error: str) -> None:
        status = consumer.status
        try:
            async with self.service.call(consumer.identity, ACTIONS["stream.run"], consumer.spec.model) as call:
                call.note(stream=consumer.spec.name, phase="end", received=status.received,
                          answered=status.answered, failed=status.failed, dead_lettered=status.dead_lettered,
                          skipped=status.skipped, **({"error": error} if error else {}))  # fmt: skip
        except DhowError as exc:
            log.error("stream %s: its end could not be audited: %s", consumer.spec.name, exc.message)

    async def wait(self) -> None:
        """Until every consumer ended; the first failure is raised (after the others stopped too)."""
        try:
            await asyncio.gather(*self._tasks)
        finally:
            self.stopping.set()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def load_stream_models(models: ModelLifecycle, specs: tuple[StreamSpec, ...]) -> None:
    """Load each stream's model (a server that loads every model has them already)."""
    for spec in specs:
        if spec.model not in models.entries:
            await models.load(spec.model)
        entry = models.entries.get(spec.model)
        if entry is None or not entry.versions:
            reason = entry.reason if entry is not None else "no such model in the repository"
            raise ModelLoadError(f"stream {spec.name}: model '{spec.model}' could not be loaded: {reason}")
        if spec.version and int(spec.version) not in entry.versions:
            served = ", ".join(map(str, sorted(entry.versions)))
            raise NotFound(f"stream {spec.name}: model '{spec.model}' serves no version {spec.version} "
                           f"(served: {served}; its model.yaml's version_policy says which)")  # fmt: skip


async def run_streams(specs: tuple[StreamSpec, ...], settings: ServerSettings, *, metrics: Any = None,
                      meter: Meter | None = None, shard_stores: ShardStoreOpener | None = None,
                      worker: int = 0) -> int:  # fmt: skip
    """``dhow stream run``: compose the core, start the consumers, run them until SIGINT/SIGTERM; 0, or 1 when one
    of them failed (run it again: nothing unanswered was committed); ``worker``: which of ``--workers N`` this
    process is."""
    policies = CorePolicies.load(settings)
    security = Security(settings)
    core = await compose_core(settings, security, policies, metrics=metrics, first_key=False)
    group = StreamGroup(core.service)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, group.stopping.set)
    try:
        await load_stream_models(core.models, specs)
        core.dataplane.is_ready = True
        # as the server does: collections while consuming need not walk what start-up built; the young threshold
        # left as it is: a consumer's memory bound is a promise (README), and the cycles of its in-flight messages
        # (futures and their callbacks) would hold their payloads longer (tests/test_streaming_memory.py failed
        # once with it raised: 35.6 MiB up against a 15.8 MiB bound)
        settle_heap(young_threshold=None)
        for spec in specs:
            folder = status_folder(settings.data_dir)
            group.start(
                await open_consumer(
                    spec, core.service, meter=meter, status_dir=folder, shard_stores=shard_stores, worker=worker
                )
            )
        log.info("streams running: %s", ", ".join(spec.name for spec in specs))
        await group.wait()
        return 0
    except Exception:
        await group.stop()
        raise
    finally:
        await core.models.close()
        core.service.guard.close()
        await security.close()
