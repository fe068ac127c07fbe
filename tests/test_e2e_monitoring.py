"""Model monitoring against a real server (README, "Monitoring"): a reference profile made by the CLI, live drift
flagged on the shifted features only, feedback giving the accuracy computed offline, a canary rolled back by the
quality guard, and a latency anomaly raised for a model slowed on purpose while a steady one raises none."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import accuracy_score, precision_score, recall_score

from dhow.protocols.rest.openapi import openapi_document
from tests.conftest import DhowProcess, start_dhow, wait_until

# label = 1 where the first feature is above a cut; version 2 of `canaried` cuts elsewhere (a worse model)
THRESHOLD_MODEL = """
import numpy as np

class Threshold:
    def load(self):
        pass

    def predict(self, inputs):
        return {{"label": (inputs["x"][:, 0] > {cut}).astype(np.int64)}}
"""
SLEEPY_MODEL = """
import time

class Sleepy:
    def load(self):
        pass

    def predict(self, inputs):
        time.sleep(float(inputs["x"].max()))
        return {"y": inputs["x"]}
"""
CLASSIFIER = (
    "runtime: python\nmax_batch_size: 64\n"
    "inputs: [{{name: x, datatype: FP32, shape: [-1, 3]}}{extra}]\n"
    "outputs: [{{name: label, datatype: INT64, shape: [-1]}}]\n"
    "monitoring:\n"
    "  drift: {{sample_rate: 1.0, window: 400, min_rows: 200, interval_s: 0.5, threshold: 0.2}}\n"
    "  feedback: {{task: classification}}\n"
)
SLEEPY = (
    "runtime: python\nmax_batch_size: 8\n"
    "inputs: [{name: x, datatype: FP32, shape: [-1, 1]}]\noutputs: [{name: y, datatype: FP32, shape: [-1, 1]}]\n"
    "monitoring:\n"
    "  latency: {window_s: 1.0, baseline_windows: 20, min_windows: 4, min_requests: 3, threshold: 6,\n"
    "            min_ratio: 3.0, min_slack_ms: 20}\n"
)
CITIES = ["paris", "lyon", "nice"]
# a 10x slow-down against a 3x limit: a steady model's jitter on a busy machine stays far below it
STEADY_S, SLOW_S = 0.02, 0.2


def _model(root: Path, name: str, manifest: str, code_by_version: dict[int, str]) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "model.yaml").write_text(manifest)
    for version, code in code_by_version.items():
        (root / name / str(version)).mkdir()
        (root / name / str(version) / "model.py").write_text(code)


def _rows(rng: np.random.Generator, count: int, *, shifted: bool = False) -> dict[str, np.ndarray]:
    """Features a ~ N(0, 1), b ~ N(5, 2), c ~ U(0, 1), city among three; shifted: b and city move, a and c do not."""
    b = rng.normal(11.0 if shifted else 5.0, 2.0, count)
    cities = ["marseille", "nice"] if shifted else CITIES
    return {
        "a": rng.normal(0.0, 1.0, count),
        "b": b,
        "c": rng.uniform(0.0, 1.0, count),
        "city": np.asarray(rng.choice(cities, count)),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DhowProcess]:
    root = tmp_path_factory.mktemp("monitoring")
    repository = root / "models"
    scorer = CLASSIFIER.format(extra=", {name: city, datatype: BYTES, shape: [-1, 1]}")
    plain = CLASSIFIER.format(extra="")
    _model(repository, "scorer", scorer, {1: THRESHOLD_MODEL.format(cut=0.0)})
    _model(repository, "graded", plain, {1: THRESHOLD_MODEL.format(cut=0.0)})
    _model(repository, "misprofiled", plain, {1: THRESHOLD_MODEL.format(cut=0.0)})
    (repository / "misprofiled" / "1" / "profile.json").write_text("{not json")
    _model(repository, "canaried", plain, {1: THRESHOLD_MODEL.format(cut=0.0), 2: THRESHOLD_MODEL.format(cut=0.6)})
    _model(repository, "steady", SLEEPY, {1: SLEEPY_MODEL})
    _model(repository, "slowed", SLEEPY, {1: SLEEPY_MODEL})
    reference = _rows(np.random.default_rng(1), 20_000)
    table = pa.table({**reference, "pred": (reference["a"] > 0).astype(np.int64)})
    pq.write_table(table, root / "train.parquet")
    made = subprocess.run(
        [sys.executable, "-m", "dhow.cli", "models", "profile", str(repository / "scorer" / "1"),
         "--data", str(root / "train.parquet"), "--map", "x=a,b,c", "--output", "label=pred"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "20000 rows" in made.stdout and "4 input and 1 output features" in made.stdout, made.stdout
    server = start_dhow(repository, root)
    yield server
    assert server.stop() == 0, server.log()


def _call(server: DhowProcess, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
        answer = connection.getresponse()
        raw = answer.read()
        text = raw.decode()
        return answer.status, (json.loads(text) if text.startswith(("{", "[")) else text)
    finally:
        connection.close()


def _infer(server: DhowProcess, model: str, rows: dict[str, np.ndarray], **extra: Any) -> dict[str, Any]:
    x = np.stack([rows["a"], rows["b"], rows["c"]], axis=1).astype(np.float32)
    inputs = [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]
    if model == "scorer":
        cities = [str(c) for c in rows["city"]]
        inputs.append({"name": "city", "datatype": "BYTES", "shape": [len(cities), 1], "data": cities})
    headers = extra.pop("headers", None)
    status, answer = _call(server, "POST", f"/v2/models/{model}/infer", {"inputs": inputs, **extra}, headers)
    assert status == 200, answer
    return dict(answer)


def _drift(server: DhowProcess, model: str = "scorer") -> dict[str, Any]:
    status, report = _call(server, "GET", f"/v2/models/{model}/versions/1/drift")
    assert status == 200, report
    return dict(report)


def _events(server: DhowProcess, model: str, kind: str) -> list[dict[str, Any]]:
    status, answer = _call(server, "GET", f"/v2/admin/deployments/{model}/events")
    assert status == 200, answer
    return [event for event in answer["events"] if event["kind"] == kind]


def _conforms(name: str, instance: Any) -> None:
    """The answer is what the OpenAPI document says it is."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": openapi_document()["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


def _send(server: DhowProcess, rng: np.random.Generator, *, shifted: bool) -> None:
    for _ in range(10):
        _infer(server, "scorer", _rows(rng, 40, shifted=shifted))


def _readme_drift_examples() -> dict[str, dict[str, Any]]:
    """The README's example answers of GET .../drift, by state (its "..." dropped)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Drift") : readme.index("### Feedback")]
    lines = section[section.index("curl -s 127.0.0.1:8080/v2/models/tabular/versions/2/drift") :].splitlines()
    texts: list[str] = []
    for line in lines[1 : lines.index("```")]:
        if line.startswith("# {"):
            texts.append(line[2:])
        elif line.startswith("#  ") and texts:
            texts[-1] += line[3:]
    examples = [json.loads(text.replace(", ...]", "]")) for text in texts]
    return {example["state"]: example for example in examples}


def test_drift_is_flagged_on_the_shifted_features_only(server: DhowProcess) -> None:
    readme = _readme_drift_examples()
    first = _drift(server)
    assert first["profile"] is True and first["state"] == "waiting", first
    assert readme["waiting"].keys() == first.keys(), "the README's example answer shows what the answer holds"
    rng = np.random.default_rng(2)
    _send(server, rng, shifted=False)
    wait_until(lambda: _scored_on(server, 400), what="a score of a full in-distribution window")
    calm = _drift(server)
    assert calm["state"] == "ok" and calm["drifted"] == [], calm
    assert {f["name"] for f in calm["features"]} == {"a", "b", "c", "city", "label"}

    _send(server, rng, shifted=True)
    wait_until(lambda: set(_drift(server)["drifted"]) == {"b", "city"}, what="drift flagged on b and city")
    wait_until(lambda: _scored_on(server, 400, since=0.3), what="a score of a whole shifted window")
    report = _drift(server)
    scores = {f["name"]: f for f in report["features"]}
    assert report["state"] == "drift" and set(report["drifted"]) == {"b", "city"}, report
    assert readme["drift"].keys() == report.keys() and readme["drift"]["features"][0].keys() == scores["b"].keys()
    _conforms("DriftReport", report)
    assert [f["name"] for f in report["features"][:2]] == sorted(["b", "city"], key=lambda n: -scores[n]["score"])
    assert scores["b"]["method"] == "psi" and scores["city"]["method"] == "js"
    assert not scores["a"]["drifted"] and not scores["c"]["drifted"] and not scores["label"]["drifted"], scores
    assert scores["label"]["side"] == "output"

    _send(server, rng, shifted=True)  # the episode goes on: no second event
    wait_until(lambda: _scored_on(server, 400, since=0.3), what="another score")
    events = _events(server, "scorer", "drift")
    assert len(events) == 1, events
    assert {f["name"] for f in events[0]["details"]["drifted"]} <= {"b", "city"}
    _, metrics = _call(server, "GET", "/metrics")
    assert 'dhow_drift_score{feature="b",method="psi",model="scorer",side="input",version="1"}' in metrics
    assert 'dhow_model_reference_profile{model="graded",version="1"} 0.0' in metrics
    no_profile = _drift(server, "graded")
    assert no_profile["state"] == "no_profile" and "dhow models profile" in no_profile["reason"]
    # a profile that cannot be read is said so; the version serves all the same
    unreadable = _drift(server, "misprofiled")
    assert unreadable["state"] == "no_profile" and "misprofiled/1/profile.json" in unreadable["reason"], unreadable
    assert str(server.repository) not in unreadable["reason"]  # the server's folders are not the client's business
    assert _infer(server, "misprofiled", _rows(rng, 2))["outputs"][0]["shape"] == [2]


def test_a_reload_resets_the_drift_gauges_and_closes_the_episode_saying_why(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    _model(repository, "reloaded", CLASSIFIER.format(extra=""), {1: THRESHOLD_MODEL.format(cut=0.0)})
    pq.write_table(pa.table(_rows(np.random.default_rng(1), 5000)), tmp_path / "train.parquet")
    made = subprocess.run(
        [sys.executable, "-m", "dhow.cli", "models", "profile", str(repository / "reloaded" / "1"),
         "--data", str(tmp_path / "train.parquet"), "--map", "x=a,b,c"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    server = start_dhow(repository, tmp_path, "--model-control", "poll", "--poll-interval", "0.2")
    rng = np.random.default_rng(4)
    series = ("dhow_drift_score{", "dhow_drift_features_drifted{", "dhow_drift_window_rows{")

    def drifting() -> None:
        for _ in range(10):
            _infer(server, "reloaded", _rows(rng, 40, shifted=True))
        wait_until(lambda: _drift(server, "reloaded")["state"] == "drift", what="drift flagged")
        _, metrics = _call(server, "GET", "/metrics")
        assert 'dhow_drift_features_drifted{model="reloaded",version="1"} 1.0' in metrics

    def reset(state: str, reason: str, events: int) -> None:
        wait_until(lambda: _drift(server, "reloaded")["state"] == state, what=f"the {state} state after a reload")
        wait_until(lambda: len(_events(server, "reloaded", "drift_cleared")) == events, what="the episode's end")
        assert reason in _events(server, "reloaded", "drift_cleared")[-1]["details"]["reason"]
        _, metrics = _call(server, "GET", "/metrics")
        stale = [line for line in metrics.splitlines() if line.startswith(series) and 'model="reloaded"' in line]
        assert not stale, stale

    try:
        drifting()
        manifest = repository / "reloaded" / "model.yaml"
        manifest.write_text(manifest.read_text().replace("threshold: 0.2", "threshold: 0.25"))
        reset("waiting", "the version reloaded", 1)
        drifting()
        (repository / "reloaded" / "1" / "profile.json").unlink()
        reset("no_profile", "without its reference profile", 2)
        _, metrics = _call(server, "GET", "/metrics")
        assert 'dhow_model_reference_profile{model="reloaded",version="1"} 0.0' in metrics
    finally:
        assert server.stop() == 0, server.log()


def _scored_on(server: DhowProcess, rows: int, since: float = 10.0) -> bool:
    report = _drift(server)
    recent = report.get("scored_seconds_ago", 99.0) < since
    return recent and bool(report["features"]) and all(f["rows"] == rows for f in report["features"])


def test_feedback_gives_the_accuracy_computed_offline(server: DhowProcess) -> None:
    rng = np.random.default_rng(3)
    predictions: dict[str, int] = {}
    truth: dict[str, int] = {}
    for index in range(60):
        row = _rows(rng, 1)
        request_id = f"graded-{index}"
        # half name themselves in the body's id, half by x-request-id
        by_body = index % 2 == 0
        answer = _infer(
            server, "graded", row,
            **({"id": request_id} if by_body else {"headers": {"x-request-id": request_id}}),
        )  # fmt: skip
        predictions[request_id] = answer["outputs"][0]["data"][0]
        truth[request_id] = int(row["a"][0] > 0.3)
    labels = {**truth, "never-seen": 1}
    status, result = _call(server, "POST", "/v2/models/graded/feedback", {"labels": labels})
    assert status == 200, result
    assert result["joined"] == 60 and result["unmatched"] == 1 and result["unmatched_ids"] == ["never-seen"]
    _conforms("FeedbackResult", result)
    _conforms("FeedbackRequest", {"labels": labels})
    ids = sorted(truth)
    y_true, y_pred = [truth[i] for i in ids], [predictions[i] for i in ids]
    figures = result["quality"]["1"]
    assert figures["labels"] == 60
    assert figures["accuracy"] == round(accuracy_score(y_true, y_pred), 6)
    assert figures["precision"] == round(precision_score(y_true, y_pred, average="macro", zero_division=0), 6)
    assert figures["recall"] == round(recall_score(y_true, y_pred, average="macro", zero_division=0), 6)
    _, metrics = _call(server, "GET", "/metrics")
    assert f'dhow_model_quality{{metric="accuracy",model="graded",version="1"}} {accuracy_score(y_true, y_pred)}' in (
        metrics
    )
    # joined labels are taken: sending them again joins nothing, and says so apart from an unknown id
    _, again = _call(server, "POST", "/v2/models/graded/feedback", {"labels": {ids[0]: 1, "never-seen": 1}})
    assert again["joined"] == 0 and again["unmatched_ids"] == ["never-seen"], again
    assert again["already_joined"] == 1 and again["already_joined_ids"] == [ids[0]], again
    _conforms("FeedbackResult", again)


def _feedback(server: DhowProcess, labels: dict[str, Any]) -> dict[str, Any]:
    status, result = _call(server, "POST", "/v2/models/graded/feedback", {"labels": labels})
    assert status == 200, result
    return dict(result)


def _labels_counted(server: DhowProcess) -> dict[str, float]:
    _, metrics = _call(server, "GET", "/metrics")
    prefix = 'dhow_feedback_labels_total{model="graded",outcome="'
    lines = [line[len(prefix) :].split('"} ') for line in metrics.splitlines() if line.startswith(prefix)]
    return {outcome: float(value) for outcome, value in lines}


def test_a_rejected_label_leaves_its_prediction_joinable(server: DhowProcess) -> None:
    rng = np.random.default_rng(5)
    before = _labels_counted(server)
    _infer(server, "graded", _rows(rng, 2), id="two-rows")
    _infer(server, "graded", _rows(rng, 1), id="one-row")
    refused = _feedback(server, {"two-rows": 1, "one-row": [1, 0]})
    assert refused["joined"] == 0 and refused["unmatched"] == 0, refused
    assert refused["rejected"] == {
        "two-rows": "the request had 2 rows: send a list of 2 labels",
        "one-row": "the request had 1 row: send one label, not a list of 2",
    }
    assert _feedback(server, {"two-rows": [1, 0, 1]})["rejected"] == {
        "two-rows": "the request had 2 rows: send a list of 2 labels, not 3"
    }
    # sent again as told, both join
    again = _feedback(server, {"two-rows": [1, 0], "one-row": 1})
    assert again["joined"] == 2 and again["rejected"] == {}, again
    counted = _labels_counted(server)
    assert counted["rejected"] - before.get("rejected", 0) == 3, counted
    assert counted["joined"] - before["joined"] == 2 and counted["unmatched"] == before["unmatched"], counted


def test_a_label_that_is_no_class_of_the_output_is_rejected(server: DhowProcess) -> None:
    rng = np.random.default_rng(6)
    wrong = {"typed-yes": "yes", "typed-half": 0.5, "typed-true": True, "typed-list": [0.0]}
    for request_id in wrong:
        _infer(server, "graded", _rows(rng, 1), id=request_id)
    refused = _feedback(server, wrong)
    assert refused["joined"] == 0 and "quality" in refused and refused["quality"] == {}, refused
    assert refused["rejected"] == {
        request_id: f"the prediction is INT64: send an integer class, not {label!r}"
        for request_id, label in wrong.items()
    }
    # the predictions stay: sent as integer classes, they join
    assert _feedback(server, dict.fromkeys(wrong, 1))["joined"] == 4


def test_a_feedback_output_the_model_lacks_is_refused_at_load(tmp_path: Path) -> None:
    mislabelled = CLASSIFIER.format(extra="").replace("{task: classification}", "{task: classification, output: labl}")
    _model(tmp_path / "models", "mislabelled", mislabelled, {1: THRESHOLD_MODEL.format(cut=0.0)})
    server = start_dhow(tmp_path / "models", tmp_path, "--strict-readiness", "false")
    try:
        status, index = _call(server, "POST", "/v2/repository/index", {})
    finally:
        assert server.stop() == 0, server.log()
    assert status == 200 and index[0]["state"] == "UNAVAILABLE", index
    assert index[0]["reason"].endswith(
        "mislabelled/model.yaml: field 'monitoring.feedback.output': expected a name of the model's outputs "
        "(label), got 'labl'"
    ), index


@pytest.mark.parametrize(
    ("model", "body", "says"),
    [
        ("graded", {"labels": {"r": {"a": 1}}}, "must be a value"),
        ("graded", {"labels": {}}, "labels"),
        ("graded", {"label": {"r": 1}}, "unknown field 'label'"),
        ("steady", {"labels": {"r": 1}}, "takes no feedback"),
    ],
)
def test_bad_feedback_is_refused_saying_why(server: DhowProcess, model: str, body: Any, says: str) -> None:
    status, answer = _call(server, "POST", f"/v2/models/{model}/feedback", body)
    assert status == 400 and says in answer["error"], answer


def test_a_canary_whose_accuracy_drops_is_rolled_back(server: DhowProcess) -> None:
    guards = {"min_accuracy_ratio": 0.98, "min_feedback": 20, "min_requests": 1_000_000}
    policy = {"kind": "canary", "primary": 1, "canary": 2, "steps": [50], "guards": guards}
    status, answer = _call(server, "PUT", "/v2/admin/deployments/canaried", {"policy": policy, "revision": 0})
    assert status == 200, answer
    rng = np.random.default_rng(4)
    labels: dict[str, int] = {}
    # per version: how many it answered, and how many of those it got right
    answered_by: dict[str, list[int]] = {"1": [0, 0], "2": [0, 0]}
    for index in range(160):
        row = _rows(rng, 1)
        answer = _infer(server, "canaried", row, id=f"c-{index}")
        labels[f"c-{index}"] = int(row["a"][0] > 0)
        tally = answered_by[answer["model_version"]]
        tally[0] += 1
        tally[1] += int(answer["outputs"][0]["data"][0] == labels[f"c-{index}"])
    assert min(count for count, _ in answered_by.values()) >= 20, answered_by
    status, result = _call(server, "POST", "/v2/models/canaried/feedback", {"labels": labels})
    assert status == 200 and result["joined"] == 160, result
    # which requests the server sends to the canary is random: its accuracy is checked against the answers it gave,
    # and the guard's premise (under 0.98 of the primary's) fails only if none of its ~80 rows fell in (0, 0.6]
    canary_accuracy = answered_by["2"][1] / answered_by["2"][0]
    assert result["quality"]["1"]["accuracy"] == 1.0, result
    assert result["quality"]["2"]["accuracy"] == round(canary_accuracy, 6) and canary_accuracy < 0.98, result

    def rolled_back() -> bool:
        return bool(_call(server, "GET", "/v2/admin/deployments/canaried")[1]["policy"]["state"] == "rolled_back")

    wait_until(rolled_back, what="the canary rolled back")
    # the decision's event is written just after its revision
    wait_until(lambda: bool(_events(server, "canaried", "rollback")), what="the rollback's event")
    rollback = _events(server, "canaried", "rollback")
    assert len(rollback) == 1 and rollback[0]["details"]["guard"] == "min_accuracy_ratio", rollback
    assert rollback[0]["details"]["primary_accuracy"] == 1.0


def test_a_model_slowed_on_purpose_raises_a_latency_anomaly_a_steady_one_none(server: DhowProcess) -> None:
    def both(slow_s: float) -> None:
        for model, delay in (("steady", STEADY_S), ("slowed", slow_s)):
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [delay]}]}
            status, answer = _call(server, "POST", f"/v2/models/{model}/infer", body)
            assert status == 200, answer

    baseline_until = time.monotonic() + 5.5  # min_windows (4) windows of 1 s, with room to spare
    while time.monotonic() < baseline_until:
        both(STEADY_S)
    assert not _events(server, "slowed", "latency_anomaly")

    def anomaly_raised() -> bool:
        for _ in range(5):
            both(SLOW_S)
        return bool(_events(server, "slowed", "latency_anomaly"))

    wait_until(anomaly_raised, what="a latency anomaly of the slowed model")
    event = _events(server, "slowed", "latency_anomaly")[0]["details"]
    assert event["part"] == "compute" and event["ratio"] >= 3.0, event
    # windows of a few requests: their p50 is judged, not their p99 (little more than their slowest)
    assert {(a["part"], a["quantile"]) for a in event["anomalies"]} == {("compute", "p50")}, event
    logged = re.search(r"slowed version 1: compute p50 latency .* its baseline ([\d.]+) (ms|µs)", server.log())
    assert logged is not None, server.log()
    seconds = float(logged[1]) * (1e-3 if logged[2] == "ms" else 1e-6)
    assert seconds == pytest.approx(event["anomalies"][0]["baseline_seconds"], abs=1e-4), logged[0]
    assert not _events(server, "steady", "latency_anomaly")
    _, metrics = _call(server, "GET", "/metrics")
    line = next(
        line for line in metrics.splitlines()
        if line.startswith('dhow_latency_anomaly{model="slowed",part="compute",quantile="p50"')
    )  # fmt: skip
    assert float(line.split()[-1]) >= 3.0, line


def test_the_events_of_an_unknown_model_are_refused_a_known_one_without_events_listed_empty(
    server: DhowProcess,
) -> None:
    def events(name: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "dhow.cli", "rollout", "events", name, "--url", "http://" + server.http_url]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    unknown = events("scorr")
    assert unknown.returncode == 1 and "unknown model 'scorr'" in unknown.stderr, (unknown.stdout, unknown.stderr)
    quiet = events("steady")  # served, never drifted nor rolled out
    assert quiet.returncode == 0 and quiet.stdout.strip() == "steady: no events", quiet.stderr
