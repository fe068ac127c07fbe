"""What every runtime does the same way: find the artifact, size threads, check declared tensors.

Messages name the model, the version and the file, because the operator reading them has only
the repository in front of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dhow.core.artifacts import ENCRYPTED_SUFFIX, is_encrypted, read_artifact
from dhow.core.datatypes import NUMPY_DTYPE
from dhow.core.errors import ModelFault, ModelLoadError
from dhow.core.model_config import ModelConfig, TensorSpec

Signature = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]

#: how many file names a "found: ..." listing shows before it says "and N more"
_LISTED = 10


def where(config: ModelConfig, version_dir: Path) -> str:
    """``fraud version 1``: how messages name what is loading."""
    return f"{config.name} version {version_dir.name}"


def find_artifact(version_dir: Path, config: ModelConfig, *names: str) -> Path:
    """The first of ``names`` in ``version_dir``, plain or encrypted (``<name>.enc``); else say what is there."""
    for name in names:
        path, sealed = version_dir / name, version_dir / (name + ENCRYPTED_SUFFIX)
        if path.is_file() and sealed.is_file():
            # the operator meant to encrypt, and the plaintext is still on disk: serving either would hide that
            raise ModelLoadError(
                f"{where(config, version_dir)}: both {name} and {sealed.name} are in {version_dir}; "
                f"delete the plaintext {name} (or {sealed.name} if the plaintext is what should be served)"
            )
        if path.is_file():
            return path
        if sealed.is_file():
            return sealed
    try:
        found = sorted(entry.name for entry in version_dir.iterdir())
    except OSError:
        found = []
    listing = ", ".join(found[:_LISTED]) or "nothing"
    if len(found) > _LISTED:
        listing += f" and {len(found) - _LISTED} more"
    expected = " or ".join(names)
    raise ModelLoadError(
        f"{where(config, version_dir)}: expected {expected} (plain, or encrypted with a {ENCRYPTED_SUFFIX} suffix) "
        f"in {version_dir}, found: {listing}"
    )


def decrypted(path: Path) -> bytes | None:
    """The plaintext of an encrypted artifact, in memory; ``None`` for a plain one, which loads by path as before."""
    return read_artifact(path) if is_encrypted(path) else None


def load_failure(config: ModelConfig, path: Path, exc: BaseException) -> ModelLoadError:
    """A framework's refusal to read an artifact, as a one-line reason."""
    reason = str(exc).strip().replace("\n", " ") or "no details"
    return ModelLoadError(f"{where(config, path.parent)}: cannot load {path.name}: {type(exc).__name__}: {reason}")


def available_cores() -> int:
    # the affinity mask, not os.cpu_count(): a container limited to 2 cores of 64 must not start 64 threads
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_threads(config: ModelConfig) -> int:
    """Intra-op threads when the manifest says ``threads: 0``: the cores shared among the instances, less one
    for the server's event loop, where the doors decode, queue and answer requests while a batch computes (a
    pool that also takes the loop's core is preempted by it, and spends more CPU per row: benchmarks/RESULTS.md,
    "Batching efficiency"); a single core is shared."""
    cores = available_cores()
    return max(1, (cores - 1 if cores > 1 else 1) // max(1, config.instances.count))


def threads_for(config: ModelConfig) -> int:
    return config.threads if config.threads > 0 else default_threads(config)


def require_cpu(config: ModelConfig, runtime: str) -> str:
    if config.device != "cpu":
        raise ModelLoadError(
            f"{config.name}/model.yaml: runtime {runtime} computes on the CPU only; "
            f"set device: cpu (it says {config.device})"
        )
    return "cpu"


def require_declared(config: ModelConfig, runtime: str) -> Signature:
    """Inputs and outputs from model.yaml, for runtimes whose artifacts do not declare them."""
    inputs, outputs = config.inputs, config.outputs
    if not inputs or not outputs:
        raise ModelLoadError(
            f"{config.name}/model.yaml: a {runtime} model must list its `inputs` and `outputs` "
            f"(name, datatype, shape); `{'inputs' if not inputs else 'outputs'}` is missing"
        )
    return inputs, outputs


def single_input(config: ModelConfig, runtime: str, default: TensorSpec) -> TensorSpec:
    """The one input of a tabular model: as declared, or ``default`` when model.yaml lists none."""
    if not config.inputs:
        return default
    if len(config.inputs) != 1:
        names = ", ".join(spec.name for spec in config.inputs)
        raise ModelLoadError(f"{config.name}/model.yaml: a {runtime} model takes one input; `inputs` lists {names}")
    return config.inputs[0]


def check_rows(config: ModelConfig, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
    """A batching model must answer one row per input row, or the batcher would split it wrongly."""
    if config.max_batch_size <= 0 or not inputs:
        return
    rows = next(iter(inputs.values())).shape[0]
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise ModelFault(
                f"model {config.name}: output '{name}' has shape {list(array.shape)}, "
                f"but a batch of {rows} rows needs {rows} rows first"
            )


def check_declared(config: ModelConfig, kind: str, declared: TensorSpec, found: TensorSpec, artifact: str) -> None:
    """Refuse a tensor of model.yaml that the artifact contradicts, naming both: a request it lets through would
    fail in the model (an input) or an answer would break the declaration (an output), every time.

    ``kind`` is "inputs" or "outputs"; ``found`` is what the artifact says (-1: it does not fix that size;
    an empty shape: it does not say). Data flows from the declaration into the model for inputs and back for
    outputs; a datatype must become the other on the way without changing values.
    """
    problem = _disagreement(kind, declared, found)
    if problem:
        raise ModelLoadError(
            f"{config.name}/model.yaml: {kind} '{declared.name}' is declared {declared.datatype} "
            f"{list(declared.shape)}, but {artifact} has {found.datatype} {list(found.shape)} ({problem}); "
            "declare what the model has"
        )


def _disagreement(kind: str, declared: TensorSpec, found: TensorSpec) -> str:
    source, target = (declared, found) if kind == "inputs" else (found, declared)
    if not _converts(source.datatype, target.datatype):
        return f"{source.datatype} does not convert to {target.datatype} without changing values"
    if not found.shape:
        return ""
    if len(declared.shape) != len(found.shape):
        return f"{len(declared.shape)} dimensions for {len(found.shape)}"
    for axis, (mine, theirs) in enumerate(zip(declared.shape, found.shape, strict=True)):
        if mine != -1 and theirs != -1 and mine != theirs:
            return f"dimension {axis} is {mine}, not {theirs}"
        if kind == "inputs" and mine == -1 and theirs != -1:
            return f"dimension {axis} may be any size, but the model takes only {theirs}"
    return ""


def _converts(source: str, target: str) -> bool:
    if "BYTES" in (source, target):
        return source == target
    return bool(np.can_cast(NUMPY_DTYPE[source], NUMPY_DTYPE[target], casting="same_kind"))
