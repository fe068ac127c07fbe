"""``dhow models profile REPO/MODEL/VERSION --data FILE``: store a reference profile of a version's training data.

The file is read and mapped to the model's inputs exactly as ``dhow batch run`` reads and maps it
(``dhow.batch.sources``, ``dhow.batch.mapping``: the same formats, ``--map``, the same refusals), so a column
means the same feature to a job, to the profile and to the live drift scores. ``--output OUTPUT=COLUMNS`` adds the
prediction distribution from columns of the file (e.g. the validation set's predictions). The profile is written
beside the version's artifacts (``repository.profiles``): encrypted when they are.
"""

from __future__ import annotations

import argparse
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dhow.batch import input_format, parse_map
from dhow.batch.mapping import Converted, InputPlan, Mapping, convert, plan_inputs
from dhow.batch.sources import Source
from dhow.core.artifacts import install_decryptor
from dhow.core.errors import InvalidInput
from dhow.core.file_urls import local_path
from dhow.core.model_config import ModelConfig, TensorSpec
from dhow.monitoring.profile import FeatureSketch
from dhow.repository.encryption import Keyring
from dhow.repository.manifest import MANIFEST, read_manifest
from dhow.repository.profiles import write_profile
from dhow.repository.store import ModelRepository
from dhow.settings import CONFIG_FILE_HELP, resolve_settings

__all__ = ["add_parser", "run"]

#: values per row of one tensor that a profile takes (an image's pixels are no features to profile one by one)
MAX_WIDTH = 512
_BATCH_ROWS = 65_536


def add_parser(model_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    profile = model_commands.add_parser(
        "profile",
        help="store a reference profile of a version's training data (for drift)",
        description="Read a dataset (Parquet, CSV or JSON Lines, mapped to the inputs as 'dhow batch run' maps it) "
        "and store, beside the version's artifacts, each feature's quantiles, bins, null rate and categories: "
        "what a served version's live inputs are compared with.",
    )
    add = profile.add_argument
    add("version_dir", type=Path, metavar="REPO/MODEL/VERSION", help="the version folder, e.g. models/tabular/1")
    add("--data", required=True, metavar="PATH", help="a file, a folder of files, or s3://bucket/prefix")
    add("--format", choices=("parquet", "csv", "jsonl"), help="the data's format (default: from its name)")
    add("--map", action="append", default=[], metavar="INPUT=COLUMNS", help="columns stacked into an input: "
        "a comma list (f0,f1) or a glob (f*); repeatable")  # fmt: skip
    add("--output", action="append", default=[], metavar="OUTPUT[=COLUMNS]",
        help="profile the model's output from these columns (its prediction distribution); repeatable")  # fmt: skip
    add("--kek-file", metavar="F", help="key file, needed when the version's artifacts are encrypted (or DHOW_KEK)")
    add("--config", type=Path, metavar="FILE", help=CONFIG_FILE_HELP)


def run(args: argparse.Namespace) -> int | None:
    if getattr(args, "models_command", None) != "profile":
        return None
    # the model and the repository are the folders above: "2", run inside the model's folder, has them too
    version_dir: Path = args.version_dir if len(args.version_dir.parts) >= 3 else args.version_dir.resolve()
    config = _config(version_dir)
    settings = resolve_settings({"kek_file": args.kek_file}, config_file=args.config)
    keyring = Keyring.load(settings.kek, settings.kek_file)
    install_decryptor(keyring.decrypt if keyring is not None else None)
    if not config.max_batch_size:
        raise InvalidInput(
            f"{version_dir.parent.name} does not batch (max_batch_size 0 in its model.yaml): a profile describes "
            "rows, and a request of a model that does not batch has none"
        )
    inputs, outputs = _signature(config, version_dir)
    data = local_path(args.data, "--data")  # (a file URL's path, decoded: its extension says the format)
    source = Source(args.data, input_format(data, args.format or ""), _BATCH_ROWS, option="--data")
    mapping = plan_inputs(inputs, source.schema, [parse_map(m) for m in args.map], "")
    out_mapping = _output_mapping(outputs, source.schema, args.output)
    profile, first_refusal = _profile(source, mapping, out_mapping, {spec.name: spec for spec in (*inputs, *outputs)})
    profile.update(
        model=config.name,
        version=int(version_dir.name),
        source=args.data,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    written = write_profile(version_dir, profile, keyring)
    counts = {side: sum(f["side"] == side for f in profile["features"].values()) for side in ("input", "output")}
    refused = f"{profile['refused_rows']} refused" + (f"; the first: {first_refusal}" if first_refusal else "")
    print(
        f"profiled {profile['rows']} rows of {args.data} ({refused}): {counts['input']} input "
        f"and {counts['output']} output features -> {written}"
    )
    print(
        "if the server checks digests (--require-digests), record them again, with the server's --data-dir or "
        f"--registry unless they are $DHOW_DATA_DIR or ./.dhow:\n  {_trust_command(version_dir, config, args.config)}"
    )
    return 0


def _trust_command(version_dir: Path, config: ModelConfig, config_file: Path | None) -> str:
    """``dhow models trust`` for this version, as it can be pasted (from the folder this command ran in)."""
    words = ["dhow", "models", "trust", str(version_dir.parent.parent), config.name, "--version", version_dir.name]
    words += ["--config", str(config_file)] if config_file is not None else []
    return shlex.join(words)


def _config(version_dir: Path) -> ModelConfig:
    if not version_dir.is_dir() or not version_dir.name.isdigit():
        raise InvalidInput(f"{version_dir}: {_not_a_version(version_dir)}")
    if not (version_dir.parent / MANIFEST).is_file():
        raise InvalidInput(f"{version_dir.parent} has no {MANIFEST}: expected REPO/MODEL/VERSION")
    return read_manifest(version_dir.parent)


def _not_a_version(path: Path) -> str:
    """Why the path is no version folder, with the version (or model) folders that are there."""
    if (path / MANIFEST).is_file():
        return f"a model folder, not a version folder; its versions: {_versions(path)}"
    what = "no such folder" if not path.exists() else "not a version folder"
    if (path.parent / MANIFEST).is_file():
        return f"{what}; the versions of {path.parent}: {_versions(path.parent)}"
    models = ModelRepository(path.parent.parent).model_names()
    if models:
        return f"no model {path.parent.name} in {path.parent.parent}; its models: {', '.join(models)}"
    return f"{what}; expected a version folder REPO/MODEL/VERSION (e.g. models/tabular/1)"


def _versions(model_dir: Path) -> str:
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    return ", ".join(map(str, versions)) or "none"


def _signature(config: ModelConfig, version_dir: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The declared inputs and outputs; an ONNX model that leaves them to its artifact is loaded to read them."""
    if config.inputs is not None and config.outputs is not None:
        return config.inputs, config.outputs
    from dhow.runtimes.base import create_runtime

    runtime = create_runtime(config.runtime)
    runtime.load(version_dir, config)
    try:
        inputs, outputs = runtime.signature()
    finally:
        runtime.unload()
    return config.inputs or inputs, config.outputs or outputs


def _output_mapping(outputs: tuple[TensorSpec, ...], schema: pa.Schema, given: list[str]) -> Mapping | None:
    if not given:
        return None
    pairs = [parse_map(text) if "=" in text else (text, text) for text in given]
    named = {name for name, _ in pairs}
    known = {spec.name for spec in outputs}
    for name in named - known:
        raise InvalidInput(f"--output {name}: the model has no output '{name}' (its outputs: {', '.join(known)})")
    return plan_inputs([spec for spec in outputs if spec.name in named], schema, pairs, "", "--output")


def _profile(
    source: Source, mapping: Mapping, out_mapping: Mapping | None, specs: dict[str, TensorSpec]
) -> tuple[dict[str, Any], str]:
    """The profile, and why the first refused row was refused ("" when none was): what to fix in the data."""
    # one output at a time: a column that cannot hold the output's values is refused naming its --output
    outputs = out_mapping.inputs if out_mapping is not None else ()
    mappings = [("input", mapping)] + [("output", Mapping((plan,), "")) for plan in outputs]
    columns = list(dict.fromkeys(c for _, m in mappings for c in m.columns))
    text = {c for _, m in mappings for c in m.text_columns}
    sketches: dict[str, list[FeatureSketch]] = {}
    rows = refused = 0
    first_refusal = ""
    for batch in source.batches(columns, text):
        rows += batch.num_rows
        for side, plans in mappings:
            converted = convert(batch, plans) if side == "input" else _converted_output(batch, plans)
            if side == "input":
                refused += int((~converted.good).sum())
                first_refusal = first_refusal or next(iter(converted.reasons), "")
            for plan in plans.inputs:
                array = converted.arrays[plan.name]
                key = f"{side}:{plan.name}"
                if key not in sketches:
                    sketches[key] = _sketches(plan, side, array, specs[plan.name])
                _add(sketches[key], plan, batch, array)
    features: dict[str, Any] = {}
    for group in sketches.values():
        for sketch in group:
            name = sketch.name if sketch.name not in features else f"{sketch.side}:{sketch.name}"
            features[name] = sketch.finish()
    if rows == 0:
        raise InvalidInput(f"{source.url} holds no rows to profile")
    return {"format": 1, "rows": rows, "refused_rows": refused, "features": features}, first_refusal


def _converted_output(batch: pa.RecordBatch, plans: Mapping) -> Converted:
    try:
        return convert(batch, plans)
    except InvalidInput as exc:
        plan = plans.inputs[0]
        raise InvalidInput(
            f"--output {plan.name}={','.join(plan.columns)}: {exc}; map the column of the model's own predictions "
            f"of '{plan.name}' (e.g. a validation set's), whose values are {plan.datatype}"
        ) from None


def _sketches(plan: InputPlan, side: str, array: np.ndarray, spec: TensorSpec) -> list[FeatureSketch]:
    width = int(np.prod(array.shape[1:])) if array.ndim > 1 else 1
    if width > MAX_WIDTH:
        raise InvalidInput(
            f"{side} '{plan.name}' has {width} values per row; a profile takes at most {MAX_WIDTH} per tensor "
            "(profile tabular features, not pixels or tokens)"
        )
    if side == "output":  # the prediction distribution is named by the output, whichever column held it
        names = [plan.name] if width == 1 else [f"{plan.name}[{index}]" for index in range(width)]
    elif plan.listed or len(plan.columns) != width:
        names = [f"{plan.columns[0]}[{index}]" for index in range(width)]
    else:
        names = list(plan.columns)
    categorical = spec.datatype == "BYTES"
    return [FeatureSketch(name, plan.name, index, side, categorical, seed=index) for index, name in enumerate(names)]


def _add(sketches: list[FeatureSketch], plan: InputPlan, batch: pa.RecordBatch, array: np.ndarray) -> None:
    flat = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(-1, 1)
    for sketch in sketches:
        sketch.add(flat[:, sketch.index])
    if not plan.listed and len(plan.columns) == len(sketches):
        for sketch, column in zip(sketches, plan.columns, strict=True):
            sketch.add_nulls(batch.column(column).null_count)
    else:
        nulls = batch.column(plan.columns[0]).null_count
        for sketch in sketches:
            sketch.add_nulls(nulls)
