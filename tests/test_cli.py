"""The command line as a user meets it: help texts, repository validation, clear refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


def _dhow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dhow.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((), "serve every model of a repository"),
        (("serve",), "--model-control"),
        (("serve",), "--grpc-port"),
        (("demo", "build"), "--out"),
        (("models", "validate"), "model.yaml"),
        (("stream", "run"), "--dead-letter"),
        (("stream", "status"), "--data-dir"),
    ],
)
def test_every_command_explains_itself(args: tuple[str, ...], fragment: str) -> None:
    done = _dhow(*args, "--help")
    assert done.returncode == 0, done.stderr
    assert fragment in done.stdout


def test_validate_names_each_bad_model_and_fails(demo_repository: Path, tmp_path: Path) -> None:
    done = _dhow("models", "validate", str(demo_repository))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok   tabular: runtime onnx" in done.stdout

    (tmp_path / "good" / "1").mkdir(parents=True)
    (tmp_path / "good" / "model.yaml").write_text(
        "runtime: sklearn\nmax_batch_size: 8\n"
        "inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]\n"
        "outputs: [{name: predict, datatype: INT64, shape: [-1]}]\n"
    )
    (tmp_path / "typo" / "1").mkdir(parents=True)
    (tmp_path / "typo" / "model.yaml").write_text("runtime: onnx\nmax_batchsize: 8\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.yaml").write_text("runtime: onnx\n")
    done = _dhow("models", "validate", str(tmp_path))
    assert done.returncode == 1
    assert "ok   good" in done.stdout
    typo = next(line for line in done.stdout.splitlines() if line.startswith("FAIL typo"))
    assert "max_batchsize" in typo and "model.yaml" in typo and "did you mean max_batch_size?" in typo
    assert "FAIL empty: no integer version folder" in done.stdout
    (tmp_path / "lazy" / "1").mkdir(parents=True)
    (tmp_path / "lazy" / "model.yaml").write_text("runtime: sklearn\n")
    lazy = next(line for line in _dhow("models", "validate", str(tmp_path)).stdout.splitlines() if "lazy" in line)
    assert "only onnx models may leave inputs out" in lazy


def test_serve_refuses_a_missing_repository(tmp_path: Path) -> None:
    done = _dhow("serve", "--repository", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert "is not a folder" in done.stderr and "Traceback" not in done.stderr


def test_bad_option_values_are_refused(tmp_path: Path) -> None:
    done = _dhow("serve", "--repository", str(tmp_path), "--model-control", "sometimes")
    assert done.returncode == 2
    assert "sometimes" in done.stderr and "Traceback" not in done.stderr


def test_a_trace_sample_ratio_without_a_collector_is_refused_at_start(tmp_path: Path) -> None:
    ports = ("--http-port", "0", "--grpc-port", "0", "--data-dir", str(tmp_path / "data"))
    done = _dhow("serve", "--repository", str(tmp_path), *ports, "--trace-sample-ratio", "0.5")
    assert done.returncode == 2, done.stderr
    assert "needs --otlp-endpoint" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_reader_that_leaves_early_gets_no_traceback(demo_repository: Path) -> None:
    # 'dhow rollout show NAME | grep -q promoted': grep exits at the first match, and dhow's next write
    # finds the pipe closed; here the reading end is closed before dhow writes anything
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dhow.cli", "models", "validate", str(demo_repository)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 1
    assert done.stderr == "", done.stderr


def _started_with(
    tmp_path: Path, option: str, rewrite: Callable[[str], str]
) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """``dhow serve`` (``--repository``, ``--payload-log``) or ``dhow batch run`` (``--input``, ``--output``)
    started with ``option``'s path given as ``rewrite`` writes it: what it did, and what it was given."""
    (tmp_path / "in.csv").write_text("x\n1\n")
    given = {"--repository": str(tmp_path), "--payload-log": f"{tmp_path}/e.jsonl",
             "--input": str(tmp_path / "in.csv"), "--output": str(tmp_path / "out")}  # fmt: skip
    given[option] = rewrite(given[option])
    common = ("--repository", given["--repository"], "--data-dir", str(tmp_path / "data"))
    if option in ("--input", "--output"):
        paths = ("--input", given["--input"], "--output", given["--output"])
        return _dhow("batch", "run", *common, "--model", "m", *paths), given
    ports = ("--http-port", "0", "--grpc-port", "0")
    return _dhow("serve", *common, *ports, "--payload-log", given["--payload-log"]), given


@pytest.mark.parametrize("option", ["--repository", "--payload-log", "--input", "--output"])
def test_a_file_url_whose_host_is_not_localhost_is_refused_at_start(tmp_path: Path, option: str) -> None:
    """``file://walk/tmp/x`` (two slashes) names /tmp/x on the host ``walk``: refused, showing ``file:///walk/...``
    (taken as a path, it was /tmp/x for the payload log and ./walk/tmp/x for the others)."""
    done, _ = _started_with(tmp_path, option, lambda path: f"file://walk{path}")
    assert done.returncode == 2, done.stderr
    assert f"write file:///walk{tmp_path}" in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("option", ["--repository", "--payload-log", "--input", "--output"])
def test_a_hash_in_a_file_url_is_refused_at_start_showing_it_escaped(tmp_path: Path, option: str) -> None:
    """``#`` ends a URL's path (a fragment follows): ``file:///…/run#3`` named ``/…/run``, without a word."""
    done, given = _started_with(tmp_path, option, lambda path: f"file://{tmp_path}/run#3/{Path(path).name}")
    assert done.returncode == 2, done.stderr
    meant = given[option].replace("#", "%23")
    assert f"{option} {given[option]!r}: " in done.stderr and f"write # as %23: {meant}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()
