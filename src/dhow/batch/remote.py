"""The same job sent to a running dhow server (``--server HOST:PORT``), for models that live only behind it.

The local engine reads, converts, commits parts and resumes exactly as without ``--server``; only the batches
go to the server, whose admission point checks the key, its permission, quotas and residency and audits each
batch (this process has no core, so it writes no ``batch.run`` record of its own: the server's trail holds every
batch as the key's ``infer``). The batches are as large as the server's ``max_batch_size`` for the model, several
in flight, so that the server's batcher keeps its instances busy. The transport is the caller's (the gRPC
client lives with the command, above the doors).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any, Protocol

from dhow.batch.job import Job
from dhow.batch.mapping import plan_inputs
from dhow.batch.parts import OutputFolder
from dhow.batch.runner import DEFAULT_BATCH_ROWS, Admitted, Run, ending, score_locally
from dhow.batch.scoring import check_outputs
from dhow.batch.sources import Source
from dhow.core.types import InferenceRequest, InferenceResponse
from dhow.serving.composition import PinnedModel

__all__ = ["RemoteModel", "run_remote_job"]

#: requests in flight to the server: enough for its batcher to fill batches while others travel
IN_FLIGHT = 8


class RemoteModel(Protocol):
    """A model behind a server, as the job sees it."""

    async def describe(self, name: str, version: int | None) -> tuple[PinnedModel, int]:
        """The version that will answer (pinned for the run), its signature, and its ``max_batch_size``."""
        ...

    async def infer(self, request: InferenceRequest) -> InferenceResponse: ...


async def run_remote_job(job: Job, remote: RemoteModel, *, quiet: bool = False) -> dict[str, Any]:
    async with _remote_admitted(job, remote) as admitted:
        await score_locally(admitted, in_flight=IN_FLIGHT, quiet=quiet)
    return admitted.run.summary()


@contextlib.asynccontextmanager
async def _remote_admitted(job: Job, remote: RemoteModel) -> AsyncIterator[Admitted]:
    folder = OutputFolder(job.output_dir)
    journal = folder.read() if folder.path.exists() and not job.overwrite else None
    version = journal.header["version"] if journal is not None else job.version
    pinned, largest = await remote.describe(job.model, version)
    batch_rows = min(job.batch_rows or DEFAULT_BATCH_ROWS, largest or DEFAULT_BATCH_ROWS)
    journal = folder.check(job.fingerprint(batch_rows), job.overwrite)
    source = Source(job.input, job.format, batch_rows)
    mapping = plan_inputs(pinned.config.inputs or (), source.schema, job.maps, job.key)
    output_names = [spec.name for spec in pinned.config.outputs or ()]
    check_outputs(output_names)
    run = Run(job, journal.header["run_id"] if journal is not None else secrets.token_hex(8))
    run.version = pinned.version
    admitted = Admitted(
        run, None, None, remote.infer, pinned, mapping, output_names, source, folder, journal, batch_rows
    )
    async with ending(admitted):
        yield admitted
