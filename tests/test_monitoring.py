"""The pieces of model monitoring without a server: drift measures, the bounded window, the quantile sketch, the
latency baseline, quality figures, the model.yaml section, and a profile kept encrypted beside encrypted artifacts."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry

from dhow.access.actions import ACTIONS
from dhow.access.permissions import ROLES
from dhow.core.artifacts import install_decryptor
from dhow.core.errors import ModelLoadError
from dhow.core.model_config import DriftConfig, LatencyConfig, MonitoringConfig
from dhow.demo import _tabular_data
from dhow.monitoring.drift import DriftWindow, js_distance, psi, score
from dhow.monitoring.latency import LatencyBaseline, duration_text
from dhow.monitoring.model_metrics import ModelMetrics
from dhow.monitoring.profile import SKETCH_SIZE, FeatureSketch, ReferenceProfile
from dhow.monitoring.quality import QualityWindow, label_misfit, prediction_of
from dhow.monitoring.sampling import sampling_gap
from dhow.repository.encryption import Keyring, encrypt_repository, generate_key
from dhow.repository.manifest import ManifestError, parse_manifest
from dhow.repository.profiles import PROFILE, read_profile
from dhow.serving.watch import ModelWatch, _Watched


def _profile(values: np.ndarray, cities: list[str]) -> ReferenceProfile:
    numeric = FeatureSketch("a", "x", 0, "input", categorical=False)
    numeric.add(values)
    city = FeatureSketch("city", "city", 0, "input", categorical=True)
    city.add(np.asarray(cities, dtype=object))
    return ReferenceProfile.from_dict({"format": 1, "rows": len(values), "features": {
        "a": numeric.finish(), "city": city.finish()}}, "test")  # fmt: skip


def test_psi_and_js_are_zero_for_the_same_shares_and_grow_with_the_shift() -> None:
    shares = np.full(10, 0.1)
    assert psi(shares, shares) == 0.0 and js_distance(shares, shares) == 0.0
    assert js_distance(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    profile = _profile(rng.normal(0, 1, 50_000), list(rng.choice(["p", "q"], 50_000)))
    same = {"x": rng.normal(0, 1, (2000, 1)), "city": rng.choice(["p", "q"], (2000, 1)).astype(object)}
    moved = {"x": rng.normal(1.5, 1, (2000, 1)), "city": np.full((2000, 1), "r", dtype=object)}
    calm = {f.name: f for f in score(profile, [(same, {})], 0.2)}
    drift = {f.name: f for f in score(profile, [(moved, {})], 0.2)}
    assert calm["a"].score < 0.05 and calm["city"].score < 0.05 and not any(f.drifted for f in calm.values())
    assert drift["a"].drifted and drift["city"].drifted and drift["city"].score == pytest.approx(1.0, abs=1e-3)


def test_the_window_keeps_the_newest_rows_only() -> None:
    window = DriftWindow(100)
    for start in range(0, 1000, 30):
        window.add(30, {"x": np.arange(start, start + 30).reshape(30, 1)}, {})
    rows = np.concatenate([inputs["x"] for inputs, _ in window.snapshot()])
    assert window.held == 100 and rows[:, 0].tolist() == list(range(920, 1020)) and window.sampled == 34 * 30
    window.add(500, {"x": np.zeros((500, 1))}, {})  # a request larger than the window: its first rows
    assert window.held == 100


def test_the_sketch_is_bounded_and_its_bins_hold_equal_shares() -> None:
    sketch = FeatureSketch("a", "x", 0, "input", categorical=False)
    rng = np.random.default_rng(1)
    for _ in range(20):
        sketch.add(rng.normal(3, 2, 10_000))
    sketch.add_nulls(2000)
    entry = sketch.finish()
    assert len(sketch._sample) == SKETCH_SIZE and entry["count"] == 200_000
    assert entry["null_rate"] == pytest.approx(2000 / 202_000, abs=1e-6)
    assert entry["quantiles"]["0.5"] == pytest.approx(3, abs=0.05) and len(entry["edges"]) == 9
    assert np.allclose(entry["fractions"], 0.1, atol=0.01)


def test_a_slow_window_is_an_anomaly_and_stays_out_of_the_baseline() -> None:
    config = LatencyConfig(min_windows=3, min_requests=5, threshold=6, min_ratio=1.5, min_slack_ms=5)
    baseline = LatencyBaseline(config)
    rng = np.random.default_rng(2)
    for _ in range(5):
        _, anomalies = baseline.judge(list(rng.uniform(0, 1e-4, 200)), list(rng.uniform(0.019, 0.021, 200)))
        assert anomalies == []
    _, anomalies = baseline.judge(list(rng.uniform(0, 1e-4, 200)), list(rng.uniform(0.059, 0.061, 200)))
    assert {(a.part, a.quantile) for a in anomalies} == {("compute", "p50"), ("compute", "p99")}
    assert all(a.ratio == pytest.approx(3, rel=0.05) for a in anomalies)
    assert baseline.median("compute", "p50") == pytest.approx(0.02, rel=0.05)  # unchanged by the slow window
    # microsecond queue times that triple are not an anomaly: under min_slack_ms
    _, anomalies = baseline.judge(list(rng.uniform(0, 3e-4, 200)), list(rng.uniform(0.019, 0.021, 200)))
    assert anomalies == []
    # a small window's slowest request (its p99) is not judged, its p50 is
    figures, anomalies = baseline.judge([0.0] * 20, [0.02] * 19 + [0.2])
    assert ("compute", "p99") not in figures and anomalies == []
    assert baseline.judge([0.1] * 4, [0.1] * 4) == ({}, [])  # too few requests to judge


def test_a_duration_below_a_millisecond_is_logged_in_microseconds() -> None:
    assert duration_text(0.000048) == "48 µs" and duration_text(0.0537) == "53.7 ms"


def test_quality_figures() -> None:
    regression = QualityWindow("regression", 10)
    for prediction, label in ((1.0, 2.0), (3.0, 3.0), (5.0, 2.0)):
        regression.add(prediction, label)
    assert regression.figures() == pytest.approx({"mae": 4 / 3, "rmse": (10 / 3) ** 0.5})
    assert prediction_of(np.array([[0.2, 0.8], [0.9, 0.1]], dtype=np.float32), "classification") == [1, 0]
    assert prediction_of(np.array([[b"cat"], [b"dog"]], dtype=object), "classification") == ["cat", "dog"]


SCORES = np.array([[0.2, 0.8], [0.9, 0.1]], dtype=np.float32)
NAMES = np.array([[b"cat"], [b"dog"]], dtype=object)
FLAGS = np.array([True, False])


@pytest.mark.parametrize(
    ("array", "label", "why"),
    [
        (SCORES, [1, 0], ""),
        (
            SCORES,
            [1, 2],
            "the prediction is the argmax of 2 FP32 scores a row: send a class index from 0 to 1, not [1, 2]",
        ),
        (NAMES, ["cat", "cow"], ""),
        (NAMES, [1, 0], "the prediction is BYTES: send a string class, not [1, 0]"),
        (FLAGS, [True, False], ""),
        (FLAGS, [1, 0], "the prediction is BOOL: send true or false, not [1, 0]"),
    ],
)
def test_a_label_is_checked_against_the_datatype_of_its_prediction(array: np.ndarray, label: object, why: str) -> None:
    assert label_misfit(array, "classification", label) == why


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"drift": {"sample_rat": 0.1}}, "monitoring.drift.sample_rat"),
        ({"drift": {"sample_rate": 2}}, "monitoring.drift.sample_rate"),
        ({"drift": {"window": 100, "min_rows": 200}}, "monitoring.drift.min_rows"),
        ({"feedback": {}}, "monitoring.feedback.task"),
        ({"latency": {"min_ratio": 0.5}}, "monitoring.latency.min_ratio"),
        ({"drfit": {}}, "monitoring.drfit"),
    ],
)
def test_a_bad_monitoring_section_is_refused_naming_the_field(section: dict[str, object], field: str) -> None:
    manifest = {"runtime": "onnx", "monitoring": section}
    with pytest.raises(ManifestError, match=f"field '{field}'"):
        parse_manifest(manifest, "m/model.yaml", "m")


def test_the_profile_of_an_encrypted_version_is_encrypted(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    (repository / "m" / "1").mkdir(parents=True)
    (repository / "m" / "model.yaml").write_text(
        "runtime: python\nmax_batch_size: 4\ninputs: [{name: x, datatype: FP32, shape: [-1, 2]}]\n"
        "outputs: [{name: y, datatype: FP32, shape: [-1, 2]}]\n"
    )
    (repository / "m" / "1" / "model.py").write_text(
        "class M:\n    def predict(self, inputs):\n        return inputs\n"
    )
    keyring_text = f"k1:{generate_key()}"
    encrypt_repository(repository, Keyring.parse(keyring_text, "test"))
    pacsv.write_csv(pa.table({"f0": [1.0, 2.0, None, 4.0], "f1": [0.5, 0.5, 0.5, 0.5]}), tmp_path / "data.csv")
    command = [sys.executable, "-m", "dhow.cli", "models", "profile", str(repository / "m" / "1"),
               "--data", str(tmp_path / "data.csv"), "--map", "x=f0,f1"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("DHOW_")}
    refused = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert refused.returncode == 2 and "encrypted, so its profile must be too" in refused.stderr, refused.stderr
    made = subprocess.run(command, capture_output=True, text=True, env={**env, "DHOW_KEK": keyring_text}, check=False)
    assert made.returncode == 0, made.stderr
    assert (repository / "m" / "1" / (PROFILE + ".enc")).is_file() and not (repository / "m" / "1" / PROFILE).exists()
    # the profile's own text is not in it (a plain name such as f0 may be in the base64 of the wrapped key by chance:
    # about once in 60 runs, which made this check flaky)
    sealed = (repository / "m" / "1" / (PROFILE + ".enc")).read_bytes()
    assert not any(text in sealed for text in (b'"f0"', b'"features"', b'"null_rate"', b'"quantiles"'))
    install_decryptor(None)
    with pytest.raises(ModelLoadError, match="no key-encryption key"):
        read_profile(repository / "m" / "1")
    install_decryptor(Keyring.parse(keyring_text, "test").decrypt)
    try:
        profile = read_profile(repository / "m" / "1")
    finally:
        install_decryptor(None)
    assert profile is not None and profile["rows"] == 4 and profile["refused_rows"] == 1
    assert profile["features"]["f0"]["null_rate"] == 0.25 and json.dumps(profile)


def test_drift_sampling_counts_down_geometric_gaps_with_the_rate_as_mean() -> None:
    random.seed(7)
    gaps = [sampling_gap(0.1) for _ in range(20_000)]
    assert min(gaps) == 1 and 9.7 < sum(gaps) / len(gaps) < 10.3, "every answer has the same chance: 1 in 10"
    assert sampling_gap(1.0) == 1 and sampling_gap(0.0) > 10**18


def _profile_command(
    tmp_path: Path, version: str, *options: str, data: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``dhow models profile`` of a classifier (label: INT64) on two float columns, f0 and f1 (of ``data``, by
    default a Parquet file of three rows)."""
    repository = tmp_path / "models"
    if not repository.exists():
        (repository / "m" / "1").mkdir(parents=True)
        (repository / "m" / "model.yaml").write_text(
            "runtime: python\nmax_batch_size: 4\ninputs: [{name: x, datatype: FP32, shape: [-1, 2]}]\n"
            "outputs: [{name: label, datatype: INT64, shape: [-1]}]\n"
        )
        (repository / "m" / "1" / "model.py").write_text(
            "class M:\n    def predict(self, inputs):\n        return {}\n"
        )
        pq.write_table(pa.table({"f0": [0.5, -1.25, 2.0], "f1": [1.0, 2.0, 3.0]}), tmp_path / "train.parquet")
    command = [sys.executable, "-m", "dhow.cli", "models", "profile", str(repository / version),
               "--data", str(data or tmp_path / "train.parquet"), "--map", "x=f0,f1", *options]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, check=False)


def test_profiling_a_missing_version_lists_the_versions_or_models_there(tmp_path: Path) -> None:
    missing = _profile_command(tmp_path, "m/9")
    assert missing.returncode == 2, missing.stderr
    assert f"m/9: no such folder; the versions of {tmp_path / 'models' / 'm'}: 1" in missing.stderr
    misspelt = _profile_command(tmp_path, "mm/1")
    assert misspelt.returncode == 2, misspelt.stderr
    assert f"mm/1: no model mm in {tmp_path / 'models'}; its models: m" in misspelt.stderr


def test_profiling_json_lines_with_nan_says_json_has_none(tmp_path: Path) -> None:
    """Python's json.dumps writes NaN, which JSON has not: the refused rows are said so, and a file of nothing
    else is refused with the same words (not as a file without the mapped columns)."""
    some = tmp_path / "some.jsonl"
    some.write_text("".join(json.dumps({"f0": f0, "f1": 1.0}) + "\n" for f0 in (0.5, float("nan"), 2.0, -1.0)))
    profiled = _profile_command(tmp_path, "m/1", data=some)
    assert profiled.returncode == 0, profiled.stderr
    assert "profiled 4 rows" in profiled.stdout and "(1 refused" in profiled.stdout, profiled.stdout
    assert f"line 2 of {some}" in profiled.stdout and "JSON has no NaN or Infinity" in profiled.stdout
    every = tmp_path / "every.jsonl"
    every.write_text(json.dumps({"f0": float("nan"), "f1": float("inf")}) + "\n")
    refused = _profile_command(tmp_path, "m/1", data=every)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert f"line 1 of {every}" in refused.stderr and "JSON has no NaN or Infinity" in refused.stderr, refused.stderr


@pytest.mark.parametrize(
    ("output", "says"),
    [
        # a float column for an INT64 output: which column, which datatype, what to map instead
        ("label=f0", "--output label=f0: column 'f0' holds double values that INT64 cannot hold"),
        ("label=zz", "--output label=zz: no column 'zz'"),
        ("label", "--output label=label: no column 'label'"),
    ],
)
def test_a_bad_profile_output_is_refused_naming_the_option(tmp_path: Path, output: str, says: str) -> None:
    refused = _profile_command(tmp_path, "m/1", "--output", output)
    assert refused.returncode == 2 and says in refused.stderr and "Traceback" not in refused.stderr, refused.stderr


def test_the_profile_prints_a_trust_command_that_runs_as_pasted(tmp_path: Path) -> None:
    made = _profile_command(tmp_path, "m/1")
    assert made.returncode == 0, made.stderr
    words = shlex.split(made.stdout.splitlines()[-1])
    assert words[:3] == ["dhow", "models", "trust"], made.stdout
    env = {**os.environ, "DHOW_DATA_DIR": str(tmp_path / "data")}
    trusted = subprocess.run([sys.executable, "-m", "dhow.cli", *words[1:]], capture_output=True, text=True, env=env)
    assert trusted.returncode == 0 and "file(s) of m version 1" in trusted.stdout, trusted.stderr


def test_the_readme_profiles_the_demo_version_on_its_own_training_distribution(
    repository_copy: Path, tmp_path: Path
) -> None:
    """Followed as written, the README's "Reference profiles" example makes a profile that finds no drift in the
    rows the demo's tabular version 2 was trained on."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Reference profiles") : readme.index("### Drift")]
    script = re.search(r'\.venv/bin/python -c "\n(.*?)"\n', section, re.DOTALL)
    command = re.search(r"^\.venv/bin/dhow (models profile .*)$", section, re.MULTILINE)
    assert script is not None and command is not None, section
    subprocess.run([sys.executable, "-c", script[1]], cwd=tmp_path, check=True)
    words = [str(repository_copy) + w[11:] if w.startswith("demo-models/") else w for w in shlex.split(command[1])]
    subprocess.run([sys.executable, "-m", "dhow.cli", *words], cwd=tmp_path, check=True, capture_output=True)
    written = read_profile(repository_copy / "tabular" / "2")
    assert written is not None
    training_rows, _ = _tabular_data(seed=1)  # version 2's: build_demo_repository(seed=0) trains it on seed + 1
    scores = score(ReferenceProfile.from_dict(written, "readme"), [({"input": training_rows}, {})], threshold=0.2)
    assert len(scores) == 32 and max(s.score for s in scores) < 0.05, scores[:3]


def test_the_readme_names_the_roles_that_may_read_a_versions_drift() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Drift") : readme.index("### Feedback")]
    said = re.search(r"a key with the ([a-z, ]+) role: the ([a-z.]+) permission", section)
    assert said is not None, section
    permission = ACTIONS["model.drift"].permission
    assert said[2] == permission.value
    assert set(re.split(r", | or ", said[1])) == {role for role, granted in ROLES.items() if permission in granted}


def test_a_drift_report_says_drift_while_the_episode_is_being_written() -> None:
    """The episode's event goes to the registry in a worker thread; a report asked meanwhile must say what the
    scores say (it said "ok" with the drifted features listed until the write ended)."""
    rng = np.random.default_rng(0)
    profile = _profile(rng.normal(0, 1, 50_000), list(rng.choice(["p", "q"], 50_000)))
    settings = DriftConfig(sample_rate=1.0, window=100, interval_s=0.0, min_rows=10, threshold=0.2)
    model = SimpleNamespace(name="m", version_label="1", profile=profile,
                            config=SimpleNamespace(monitoring=MonitoringConfig(drift=settings)))  # fmt: skip
    writing, release = threading.Event(), threading.Event()

    class SlowRegistry:
        def add_event(self, name: str, kind: str, details: dict[str, Any]) -> None:
            writing.set()
            release.wait(10)

    models: Any = SimpleNamespace(resolve=lambda name, version: model, entries={})
    watch = ModelWatch(models, ModelMetrics(CollectorRegistry()), SlowRegistry())
    window = DriftWindow(100, 1.0)
    window.add(50, {"x": rng.normal(1.5, 1, (50, 1)), "city": np.full((50, 1), "r", dtype=object)}, {})
    watched = _Watched(model, window, None)
    watch._watched[("m", "1")] = watched

    async def scored_while_written() -> dict[str, Any]:
        scoring = asyncio.create_task(watch._score_drift(watched, time.monotonic() + 1))
        assert await asyncio.to_thread(writing.wait, 10), "the drift episode is written"
        report = watch.drift_report("m", "1")
        release.set()
        await scoring
        return report

    report = asyncio.run(scored_while_written())
    assert report["state"] == "drift" and set(report["drifted"]) == {"a", "city"}, report
    assert watch.drift_report("m", "1")["state"] == "drift"
