"""A batch run from start to end: the core composed without ports, the job admitted, its model loaded, its
input scored by an engine, its output committed, its summary written and its run audited.

The order is the order of what can go wrong, so that a job that cannot run fails before it writes anything:
the input's files and columns are read, the identity is authenticated, an existing output is checked against
the arguments, the job is authorized (``batch.run`` on the model: the ``infer`` permission) before its model is
loaded (a model may run code), the columns are mapped, and the first batch is scored (a residency refusal comes
there) before the output folder is touched. The run is audited twice through the admission point: when
admitted, and at its end with its row counts and the digests of its input and output files, whatever the
outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from dhow.batch.job import Job
from dhow.batch.local import Counts, LocalEngine
from dhow.batch.mapping import Mapping, plan_inputs
from dhow.batch.parts import Journal, OutputFolder
from dhow.batch.progress import Progress
from dhow.batch.scoring import Provenance, Scorer, check_outputs
from dhow.batch.sources import Source
from dhow.core.errors import DhowError, InvalidInput
from dhow.serving.composition import Core, CorePolicies, PinnedModel, compose_core, load_pinned
from dhow.serving.security import Security
from dhow.serving.service import ACTIONS, CoreService, Credentials
from dhow.serving.traffic import Invoke
from dhow.settings import ServerSettings

__all__ = [
    "DEFAULT_BATCH_ROWS",
    "Admitted",
    "Run",
    "admitted_job",
    "audit_run",
    "ending",
    "job_credentials",
    "run_job",
    "score_locally",
]

#: rows per call of the model when the job names none: large enough that admission and the event loop are a
#: rounding error beside the model, small enough that a few batches in flight stay a few megabytes
DEFAULT_BATCH_ROWS = 8192


@dataclass(slots=True)
class Run:
    """What a run knows as it goes, for its summary and its audit record."""

    job: Job
    run_id: str
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat())
    counts: Counts = field(default_factory=Counts)
    done_before: int = 0
    version: int | None = None
    artifact_digest: str = ""
    output_digest: Any = field(default_factory=hashlib.sha256)
    input_digest: str = ""
    state: str = "running"
    error: str = ""
    #: whether this run took the output folder (only then does it write the summary there)
    opened: bool = False

    def summary(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        this_run = self.counts.rows - self.done_before
        return {
            "state": self.state,
            "engine": self.job.engine,
            "model": self.job.model,
            "version": self.version,
            "run_id": self.run_id,
            "input": self.job.input,
            "output": self.job.output_dir,
            "rows_in": self.counts.rows,
            "scored": self.counts.scored,
            "errors": self.counts.errors,
            "parts": self.counts.parts,
            "resumed_at_row": self.done_before,
            "started_at": self.started_at,
            "duration_s": round(elapsed, 3),
            "rows_per_s": round(this_run / elapsed, 1) if elapsed > 0 else 0.0,
            "artifact_digest": self.artifact_digest,
            "input_digest": self.input_digest,
            "output_digest": self.output_digest.hexdigest(),
            **({"server": self.job.server} if self.job.server else {}),
            **({"error": self.error} if self.error else {}),
        }


@dataclass(slots=True)
class Admitted:
    """A job that may run: admitted, its model pinned and loaded, its columns mapped, its output checked."""

    run: Run
    #: None when the batches go to a server (which audits each of them)
    core: Core | None
    #: the job's principal (authenticated once; each batch is admitted with it)
    who: Any
    #: runs one batch: through this process's core as ``who``, or a server's
    invoke: Invoke
    pinned: PinnedModel
    mapping: Mapping
    output_names: list[str]
    source: Source
    folder: OutputFolder
    journal: Journal | None
    batch_rows: int

    @property
    def header(self) -> dict[str, Any]:
        """The journal's first line: what a re-run must agree with."""
        job = self.run.job
        return {
            "run_id": self.run.run_id,
            "version": self.pinned.version,
            "fingerprint": job.fingerprint(self.batch_rows),
        }


@contextlib.asynccontextmanager
async def admitted_job(job: Job, settings: ServerSettings, api_key: str) -> AsyncIterator[Admitted]:
    """Compose the core, admit the job and prepare it (see the module's docstring); at the end, however it ends,
    write its summary (if it took the output) and its end record, and close the core."""
    batch_rows = job.batch_rows or DEFAULT_BATCH_ROWS
    policies = CorePolicies.load(settings)
    source = Source(job.input, job.format, batch_rows)
    if job.engine == "spark":
        source.check_same_header("the Spark engine")
    security = Security(settings)
    core = await compose_core(settings, security, policies, first_key=False)
    try:
        who = await core.service.authenticate(job_credentials(settings, api_key), ACTIONS["batch.run"])
        folder = OutputFolder(job.output_dir)
        journal = folder.check(job.fingerprint(batch_rows), job.overwrite)
        run = Run(job, journal.header["run_id"] if journal is not None else secrets.token_hex(8))
        await audit_run(core.service, who, job.model, {"run_id": run.run_id, "phase": "start", "input": job.input})
        version = journal.header["version"] if journal is not None else job.version
        pinned = await load_pinned(
            core.models, job.model, version, max_batch_size=batch_rows, python_processes=os.cpu_count() or 1
        )
        mapping = plan_inputs(pinned.config.inputs or (), source.schema, job.maps, job.key)
        output_names = [spec.name for spec in pinned.config.outputs or ()]
        check_outputs(output_names)
        run.version, run.artifact_digest = pinned.version, pinned.artifact_digest
        invoke = core.service.invoker(who)
        admitted = Admitted(run, core, who, invoke, pinned, mapping, output_names, source, folder, journal, batch_rows)
        async with ending(admitted):
            yield admitted
    finally:
        await core.models.close()
        core.service.guard.close()
        await security.close()


@contextlib.asynccontextmanager
async def ending(admitted: Admitted) -> AsyncIterator[None]:
    run, folder = admitted.run, admitted.folder
    digest = asyncio.create_task(asyncio.to_thread(admitted.source.digest))
    try:
        yield
        run.state = "succeeded"
    except (DhowError, OSError) as exc:
        run.state, run.error = "failed", exc.message if isinstance(exc, DhowError) else str(exc)
        raise
    except Exception as exc:  # unforeseen: the summary still says the job failed, and why, not "running"
        run.state, run.error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        run.input_digest = await digest
        if run.opened:
            folder.write_summary(run.summary())
        folder.close()
        if admitted.core is not None:
            await audit_run(admitted.core.service, admitted.who, run.job.model, _record(run), run.error)


def job_credentials(settings: ServerSettings, api_key: str) -> Credentials:
    return Credentials(authorization=f"Bearer {api_key}" if api_key else "", actor=settings.actor_name())


async def run_job(
    job: Job, settings: ServerSettings, api_key: str, *, stream: TextIO = sys.stderr, quiet: bool = False
) -> dict[str, Any]:
    """Run the job on the local engine; its summary (also written as ``OUTPUT/_summary.json``)."""
    async with admitted_job(job, settings, api_key) as admitted:
        await score_locally(admitted, stream=stream, quiet=quiet)
    return admitted.run.summary()


async def score_locally(
    admitted: Admitted, *, in_flight: int = 0, stream: TextIO = sys.stderr, quiet: bool = False
) -> None:
    """Score the admitted job's input with the local engine (its batches run through ``admitted.invoke``)."""
    run, pinned, mapping, source, folder = (
        admitted.run, admitted.pinned, admitted.mapping, admitted.source, admitted.folder
    )  # fmt: skip
    job, journal = run.job, admitted.journal
    scorer = Scorer(admitted.invoke, job.model, pinned.version, mapping, job.data_region)
    provenance = Provenance(job.model, pinned.version, pinned.artifact_digest, run.run_id)
    in_flight = in_flight or pinned.config.instances.count + 1
    engine = LocalEngine(
        source, mapping, scorer, provenance, admitted.output_names,
        part_rows=job.part_rows, batch_rows=admitted.batch_rows, in_flight=in_flight,
    )  # fmt: skip
    first_part = len(journal.parts) if journal is not None else 0
    for part in journal.parts if journal is not None else []:
        _count(run, part)
    run.done_before = run.counts.rows
    progress = Progress(stream, source.total_rows, run.counts.rows, quiet)

    def commit(index: int, scored: Any, errors: Any, line: dict[str, Any]) -> None:
        if not run.opened:  # the first batch was scored: the job may run, so now the output is taken
            folder.open(admitted.header, journal)
            run.opened = True
        _count(run, folder.commit(index, scored, errors, line))
        folder.write_summary(run.summary())

    await engine.run(run.counts.rows, first_part, commit, progress.advance)
    if not run.opened:  # an empty input: the output holds its journal and summary only
        folder.open(admitted.header, journal)
        run.opened = True
    progress.finish()


def _count(run: Run, part: dict[str, Any]) -> None:
    run.counts.rows += int(part["rows"])
    run.counts.scored += int(part["scored"])
    run.counts.errors += int(part["errors"])
    run.counts.parts += 1
    run.output_digest.update(str(part.get("digest", "")).encode() + str(part.get("errors_digest", "")).encode())


def _record(run: Run) -> dict[str, Any]:
    summary = run.summary()
    fields = ("run_id", "version", "engine", "input", "output", "rows_in", "scored", "errors", "parts")
    return {
        **{name: summary[name] for name in fields},
        "phase": "end",
        "state": run.state,
        "input_sha256": summary["input_digest"],
        "output_sha256": summary["output_digest"],
        "artifact_sha256": summary["artifact_digest"],
    }


async def audit_run(service: CoreService, who: Any, model: str, details: dict[str, Any], error: str = "") -> None:
    """One ``batch.run`` record through the admission point (which checks the permission again): the run
    admitted (``phase: start``) or ended (``phase: end``, with its counts, digests and outcome)."""
    try:
        async with service.call(who, ACTIONS["batch.run"], model) as call:
            call.note(**details)
            if error:
                raise _Failed(error)  # the record's outcome; the run's error reaches the user once, from the run
    except _Failed:
        pass


class _Failed(DhowError):
    """The run's own failure, for its end record's outcome (already raised to the user once)."""


def check_api_key(api_key: str, settings: ServerSettings) -> None:
    if settings.auth == "on" and not api_key:
        raise InvalidInput("the job needs an identity: --api-key KEY or the DHOW_KEY environment variable")
