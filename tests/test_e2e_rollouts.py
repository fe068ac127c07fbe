"""Deployments against real servers (docs/rollouts.md): the admin API and its refusals, canary and A/B
splits, shadows, automatic rollback and promotion, blue/green under load, the CLI and its history,
a registry shared by two servers on PostgreSQL, and deployments surviving a restart."""

from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psycopg
import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import IN_CI, DhowProcess, start_dhow

T = TypeVar("T")

ADMIN = "/v2/admin/deployments"
#: min_requests so high that the analysis never judges (for tests that are not about the guards)
NEVER_JUDGED = {"min_requests": 1_000_000_000}
#: copies of the demo model `tabular` (versions 1 and 2), one per test, so that tests sharing a server do not meet
TABULAR_COPIES = ("split", "sticky", "shadowed", "classified", "promoting", "bluegreen", "cli_flow", "never_deployed")
#: the PostgreSQL server of the shared-registry test (a fresh database is made on it per test)
PG_SERVER = os.environ.get("DHOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")

# custom Python models: input x FP32 [-1, 2], output y FP32 [-1, 2]
FAST_MODEL = """
class Fast:
    def load(self):
        pass

    def predict(self, inputs):
        return {"y": inputs["x"] * 2}
"""
FAILING_MODEL = """
class Failing:
    def load(self):
        pass

    def predict(self, inputs):
        raise RuntimeError("this canary is broken")
"""
SLEEPY_MODEL = """
import time

class Sleepy:
    def load(self):
        pass

    def predict(self, inputs):
        time.sleep({seconds})
        return {{"y": inputs["x"] * 2}}
"""
UNLOADABLE_MODEL = """
class Unloadable:
    def load(self):
        raise RuntimeError("this version cannot load")

    def predict(self, inputs):
        return {"y": inputs["x"]}
"""
PYTHON_MODEL_YAML = (
    "runtime: python\nmax_batch_size: 16\n"
    "inputs: [{name: x, datatype: FP32, shape: [-1, 2]}]\noutputs: [{name: y, datatype: FP32, shape: [-1, 2]}]\n"
)
SHADOW_SLEEP_S = 0.2


# -- helpers ---------------------------------------------------------------------------------


class Rest:
    """One keep-alive HTTP connection to a server; every call answers (status, decoded JSON body)."""

    def __init__(self, server: DhowProcess, actor: str | None = None) -> None:
        self.server = server
        self.actor = actor
        self._connection: http.client.HTTPConnection | None = None
        self._last_use = 0.0

    def call(
        self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        # the server closes idle keep-alive connections after a few seconds: start afresh after a pause
        if self._connection is None or time.monotonic() - self._last_use > 2.0:
            self.close()
            self._connection = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=60)
        sent = {"Content-Type": "application/json", **(headers or {})}
        if self.actor is not None:
            sent["x-dhow-actor"] = self.actor
        data = None if body is None else json.dumps(body).encode()
        self._connection.request(method, path, body=data, headers=sent)
        answer = self._connection.getresponse()
        raw = answer.read()
        self._last_use = time.monotonic()
        content_type = answer.getheader("content-type", "")
        return answer.status, json.loads(raw) if "json" in content_type else raw.decode(errors="replace")

    def ok(self, method: str, path: str, body: object = None) -> Any:
        status, answer = self.call(method, path, body)
        assert status == 200, f"{method} {path} answered {status}: {answer}"
        return answer

    def deployment(self, name: str) -> dict[str, Any]:
        return self.ok("GET", f"{ADMIN}/{name}")  # type: ignore[no-any-return]

    def put(self, name: str, policy: object, revision: int, reason: str = "") -> tuple[int, Any]:
        return self.call("PUT", f"{ADMIN}/{name}", {"policy": policy, "revision": revision, "reason": reason})

    def infer(
        self,
        model: str,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
        version: str | None = None,
    ) -> tuple[int, Any]:
        path = f"/v2/models/{model}/versions/{version}/infer" if version else f"/v2/models/{model}/infer"
        return self.call("POST", path, body, headers)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _tabular_body(row: int = 0, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    data = np.random.default_rng(row).normal(size=32).astype(np.float32).tolist()
    body: dict[str, Any] = {"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": data}]}
    if parameters:
        body["parameters"] = parameters
    return body


def _x_body(value: float = 1.0) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [value, -value]}]}


def _answered(status: int, answer: Any) -> tuple[str, str | None]:
    """(model_version, dhow_variant) of a successful REST answer."""
    assert status == 200, f"inference answered {status}: {answer}"
    return answer["model_version"], answer.get("parameters", {}).get("dhow_variant")


def _grpc_infer(
    client: grpcclient.InferenceServerClient,
    model: str,
    row: int = 0,
    parameters: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[str, str | None]:
    tensor = grpcclient.InferInput("input", [1, 32], "FP32")
    tensor.set_data_from_numpy(np.random.default_rng(row).normal(size=(1, 32)).astype(np.float32))
    response = client.infer(model, [tensor], parameters=parameters, headers=headers).get_response()
    variant = response.parameters["dhow_variant"].string_param if "dhow_variant" in response.parameters else None
    return response.model_version, variant


def _wait_for(probe: Callable[[], T], done: Callable[[T], bool], what: str, timeout: float = 30.0) -> T:
    """Calls ``probe`` until ``done`` holds for its answer; fails naming ``what`` and the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        seen = probe()
        if done(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s; last seen: {seen!r}")
        time.sleep(0.1)


def _assert_binomial(hits: int, trials: int, p: float, what: str) -> None:
    sd = math.sqrt(trials * p * (1 - p))
    assert abs(hits - trials * p) <= 4.5 * sd, f"{what}: {hits} of {trials}, expected {trials * p:.0f} ± {4.5 * sd:.0f}"


def _add_python_model(repository: Path, name: str, versions: dict[int, str]) -> None:
    folder = repository / name
    for version, source in versions.items():
        (folder / str(version)).mkdir(parents=True)
        (folder / str(version) / "model.py").write_text(source)
    (folder / "model.yaml").write_text(PYTHON_MODEL_YAML)


def _tabular_only(demo_repository: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(demo_repository / "tabular", target / "models" / "tabular")
    return target / "models"


# -- one server shared by the tests that each use their own model ---------------------------------


@pytest.fixture(scope="module")
def server(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DhowProcess]:
    root = tmp_path_factory.mktemp("rollouts")
    repository = root / "models"
    repository.mkdir()
    for name in ("tabular", *TABULAR_COPIES):
        shutil.copytree(demo_repository / "tabular", repository / name)
    _add_python_model(repository, "failing_canary", {1: FAST_MODEL, 2: FAILING_MODEL})
    _add_python_model(repository, "slow_canary", {1: FAST_MODEL, 2: SLEEPY_MODEL.format(seconds=0.05)})
    _add_python_model(repository, "slow_shadow", {1: FAST_MODEL, 2: SLEEPY_MODEL.format(seconds=SHADOW_SLEEP_S)})
    _add_python_model(repository, "unloadable", {1: FAST_MODEL, 2: FAST_MODEL, 3: UNLOADABLE_MODEL})
    # "unloadable" serves no version until a test pins one: ready means "the start-up loads were tried"
    process = start_dhow(repository, root, "--strict-readiness", "false")
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture
def rest(server: DhowProcess) -> Iterator[Rest]:
    """A keep-alive connection to the shared server (set ``rest.actor`` to name who edits)."""
    connection = Rest(server)
    yield connection
    connection.close()


# -- 1. the admin API ----------------------------------------------------------------------------


def test_admin_api_creates_refuses_and_routes(rest: Rest) -> None:
    rest.actor = "alice"
    status, answer = rest.call("GET", f"{ADMIN}/tabular")
    assert status == 404 and "no deployment 'tabular'" in answer["error"]
    # no deployment: the newest loaded version answers, without a variant
    assert _answered(*rest.infer("tabular", _tabular_body())) == ("2", None)

    status, created = rest.put("tabular", {"kind": "pinned", "version": 1}, revision=0, reason="pin the old one")
    assert status == 200, created
    assert created["revision"] == 1 and created["policy"] == {"kind": "pinned", "version": 1}
    assert created["updated_by"] == "alice" and created["status"] == {}
    assert rest.deployment("tabular") == created
    listed = {d["name"]: d for d in rest.ok("GET", ADMIN)["deployments"]}
    assert listed["tabular"] == created and "status" in listed["tabular"]
    assert _answered(*rest.infer("tabular", _tabular_body())) == ("1", "primary")
    # a version named in the URL bypasses the policy
    assert _answered(*rest.infer("tabular", _tabular_body(), version="2")) == ("2", None)

    # a stale revision: 409, nothing changed
    for stale in (0, 7):
        status, answer = rest.put("tabular", {"kind": "pinned", "version": 2}, revision=stale)
        assert status == 409, answer
        assert answer["error"] == f"deployment 'tabular' is at revision 1, not {stale}: read it again and retry"
        assert rest.deployment("tabular") == created

    refusals: list[tuple[object, str]] = [
        (
            {
                "kind": "ab",
                "variants": [{"name": "a", "version": 1, "weight": 60}, {"name": "b", "version": 2, "weight": 30}],
            },
            "ab variant weights must sum to 100, they sum to 90",
        ),
        ({"kind": "shadow", "primary": 1, "shadow": 1}, "shadow version 1 is the primary version"),
        ({"kind": "canary", "primary": 2, "canary": 2}, "canary version 2 is the primary version"),
        ({"kind": "bluegreen", "blue": 1, "green": 1}, "blue and green are both version 1"),
        ({"kind": "rainbow", "version": 1}, "policy 'kind' must be one of pinned, canary, ab, shadow, bluegreen"),
        ({"kind": "pinned", "version": 1, "colour": "red"}, "pinned policy has no field 'colour'"),
        ({"kind": "pinned"}, "pinned policy needs the field 'version'"),
        ({"kind": "pinned", "version": "1"}, "'version' must be a model version"),
        ({"kind": "canary", "primary": 1, "canary": 2, "steps": [50, 20]}, "ascending percentages"),
        ({"kind": "canary", "primary": 1, "canary": 2, "guards": {"max_errors": 1}}, "no field 'max_errors'"),
    ]
    for policy, message in refusals:
        status, answer = rest.put("tabular", policy, revision=1)
        assert status == 400 and message in answer["error"], (policy, status, answer)
        assert rest.deployment("tabular") == created, f"a refused edit changed the deployment: {policy}"
    status, answer = rest.call("PUT", f"{ADMIN}/tabular", {"policy": {"kind": "pinned", "version": 2}, "rev": 1})
    assert status == 400 and "unknown field 'rev'" in answer["error"]
    status, answer = rest.call("POST", f"{ADMIN}/tabular/promote", {})
    assert status == 400 and "promote applies to canary deployments; this one is pinned" in answer["error"]

    # a version that is not in the repository: 404 naming the versions there
    status, answer = rest.put("tabular", {"kind": "canary", "primary": 1, "canary": 7}, revision=1)
    assert status == 404 and "(versions there: 1, 2)" in answer["error"] and "7" in answer["error"]
    assert rest.deployment("tabular") == created
    assert _answered(*rest.infer("tabular", _tabular_body())) == ("1", "primary")
    # a deployment for a model that is not in the repository
    status, answer = rest.put("nope", {"kind": "pinned", "version": 1}, revision=0)
    assert status == 404 and "'nope'" in answer["error"]
    assert "nope" not in {d["name"] for d in rest.ok("GET", ADMIN)["deployments"]}

    # green (version 2) answers; blue (version 1) stays loaded, and naming it in the URL reaches it
    bluegreen = {"kind": "bluegreen", "blue": 1, "green": 2, "active": "green"}
    status, edited = rest.put("tabular", bluegreen, revision=1, reason="green goes live")
    assert status == 200 and edited["revision"] == 2, edited
    assert _answered(*rest.infer("tabular", _tabular_body())) == ("2", "green")
    assert _answered(*rest.infer("tabular", _tabular_body(), version="1")) == ("1", None)

    status, answer = rest.call("DELETE", f"{ADMIN}/tabular", {"revision": 1})
    assert status == 409 and "read it again and retry" in answer["error"]
    assert rest.call("DELETE", f"{ADMIN}/tabular", {"revision": 2, "reason": "done"}) == (200, {})
    assert rest.call("GET", f"{ADMIN}/tabular")[0] == 404
    assert _answered(*rest.infer("tabular", _tabular_body())) == ("2", None)
    history = rest.ok("GET", f"{ADMIN}/tabular/history")["history"]
    assert [(r["revision"], r["action"], r["actor"]) for r in history] == [
        (1, "create", "alice"),
        (2, "edit", "alice"),
        (3, "delete", "alice"),
    ]

    document = rest.ok("GET", "/v2/admin/openapi.json")
    assert document["openapi"].startswith("3.1")
    assert {ADMIN, f"{ADMIN}/{{name}}", f"{ADMIN}/{{name}}/history"} <= set(document["paths"])


def test_a_version_that_fails_to_load_is_refused_with_503(rest: Rest) -> None:
    status, created = rest.put("unloadable", {"kind": "pinned", "version": 1}, revision=0)
    assert status == 200, created
    status, answer = rest.put("unloadable", {"kind": "canary", "primary": 1, "canary": 3}, revision=1)
    assert status == 503 and "version 3" in answer["error"] and "this version cannot load" in answer["error"], answer
    assert rest.deployment("unloadable") == created
    assert {_answered(*rest.infer("unloadable", _x_body(v))) for v in range(20)} == {("1", "primary")}
    assert [r["action"] for r in rest.ok("GET", f"{ADMIN}/unloadable/history")["history"]] == ["create"]


# -- 2. canary split -----------------------------------------------------------------------------


def test_canary_split_is_within_binomial_bounds(server: DhowProcess, rest: Rest) -> None:
    policy = {"kind": "canary", "primary": 1, "canary": 2, "steps": [30], "guards": NEVER_JUDGED}
    status, answer = rest.put("split", policy, revision=0)
    assert status == 200, answer
    assert answer["status"]["weight"] == 30
    expected = {"primary": "1", "canary": "2"}
    seen: list[str] = []
    for row in range(1200):
        version, variant = _answered(*rest.infer("split", _tabular_body(row)))
        assert variant is not None and expected[variant] == version, (version, variant)
        seen.append(variant)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for row in range(300):
            version, variant = _grpc_infer(client, "split", row)
            assert variant is not None and expected[variant] == version, (version, variant)
            seen.append(variant)
    finally:
        client.close()
    canary = seen.count("canary")
    _assert_binomial(canary, len(seen), 0.30, "requests that went to the canary")
    window = rest.deployment("split")["status"]["window"]
    assert window["canary"]["requests"] == canary
    assert window["primary"]["requests"] == len(seen) - canary
    assert window["canary"]["errors"] == window["primary"]["errors"] == 0


# -- 3. A/B stickiness ---------------------------------------------------------------------------


def test_ab_keys_are_sticky_across_parameters_headers_and_transports(server: DhowProcess, rest: Rest) -> None:
    variants = [{"name": "control", "version": 1, "weight": 70}, {"name": "treatment", "version": 2, "weight": 30}]
    status, answer = rest.put("sticky", {"kind": "ab", "variants": variants}, revision=0)
    assert status == 200, answer
    assert answer["policy"]["sticky_key"] == "user_id"
    version_of = {"control": "1", "treatment": "2"}
    client = grpcclient.InferenceServerClient(server.grpc_url)

    def send(key: str, channel: int) -> str:
        if channel == 0:  # a v2 JSON request parameter
            version, variant = _answered(*rest.infer("sticky", _tabular_body(parameters={"user_id": key})))
        elif channel == 1:  # an HTTP header proxies keep (no underscore; names are case-insensitive)
            version, variant = _answered(*rest.infer("sticky", _tabular_body(), headers={"X-Dhow-AB-Key": key}))
        elif channel == 2:  # a gRPC request parameter
            version, variant = _grpc_infer(client, "sticky", parameters={"user_id": key})
        else:  # gRPC metadata
            version, variant = _grpc_infer(client, "sticky", headers={"x-dhow-ab-key": key})
        assert variant is not None and version_of[variant] == version, (key, channel, version, variant)
        return variant

    try:
        keys = [f"user-{uuid.uuid4().hex[:12]}" for _ in range(1000)]
        first = {key: send(key, index % 4) for index, key in enumerate(keys)}
        # the second time through the next channel: the same key meets the same variant however it comes
        moved = [(key, first[key], send(key, (index + 1) % 4)) for index, key in enumerate(keys)]
    finally:
        client.close()
    changed = [(key, before, after) for key, before, after in moved if before != after]
    assert not changed, f"{len(changed)} keys changed variant, e.g. {changed[:3]}"
    _assert_binomial(list(first.values()).count("treatment"), len(keys), 0.30, "keys in the treatment")


# -- 4. shadow -----------------------------------------------------------------------------------


def _metric_total(text: str, name: str, deployment: str) -> float:
    lines = [
        line for line in text.splitlines() if line.startswith(f"{name}{{") and f'deployment="{deployment}"' in line
    ]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_shadow_answers_with_the_primary_and_compares(rest: Rest) -> None:
    status, answer = rest.put("shadowed", {"kind": "shadow", "primary": 1, "shadow": 2}, revision=0)
    assert status == 200, answer
    sent = 300
    for row in range(sent):
        assert _answered(*rest.infer("shadowed", _tabular_body(row))) == ("1", "primary")

    def figures() -> dict[str, Any]:
        return rest.deployment("shadowed")["status"]["shadow"]  # type: ignore[no-any-return]

    shadow = _wait_for(
        figures,
        lambda f: f["agreed"] + f["disagreed"] + f["errors"] + f["dropped"] == sent,
        f"all {sent} shadow copies compared or dropped",
    )
    assert shadow["requests"] > 0 and shadow["errors"] == 0
    assert isinstance(shadow["agreement_rate"], float) and 0 <= shadow["agreement_rate"] <= 1
    assert shadow["agreement_rate"] == pytest.approx(shadow["agreed"] / (shadow["agreed"] + shadow["disagreed"]))
    # versions 1 and 2 have different weights: their probabilities differ
    assert shadow["disagreed"] > 0 and shadow["mean_abs_difference"] > 0
    assert shadow["primary_p99_ms"] > 0 and shadow["shadow_p99_ms"] > 0
    metrics = rest.call("GET", "/metrics")[1]
    assert "dhow_shadow_requests" in metrics
    assert _metric_total(metrics, "dhow_shadow_requests_total", "shadowed") == sent


def _classes(status: int, answer: Any) -> tuple[int, int]:
    """(label, argmax of the probabilities) of a tabular answer."""
    assert status == 200, answer
    outputs = {output["name"]: output["data"] for output in answer["outputs"]}
    return outputs["label"][0], int(np.argmax(outputs["probabilities"]))


def test_a_shadow_of_a_classifier_compares_its_labels(rest: Rest) -> None:
    # an output the model does not have is refused: a misspelt name would silently compare nothing
    misspelt = {"kind": "shadow", "primary": 1, "shadow": 2, "tolerances": {"probabilites": {"atol": 0.1}}}
    status, answer = rest.put("classified", misspelt, revision=0)
    assert status == 400 and answer["error"] == (
        "the shadow policy names output 'probabilites', which classified version 1 does not have "
        "(did you mean probabilities?); its outputs are label, probabilities"
    )
    policy = {"kind": "shadow", "primary": 1, "shadow": 2, "compare": {"probabilities": "label"}}
    status, answer = rest.put("classified", policy, revision=0)
    assert status == 200, answer
    assert answer["policy"]["compare"] == {"probabilities": "label"} and answer["policy"]["tolerances"] == {}
    sent, same_class = 60, 0
    for row in range(sent):
        body = _tabular_body(row)
        # requests naming a version bypass the policy (no copy): what each version says of this row
        same_class += _classes(*rest.infer("classified", body, version="1")) == _classes(
            *rest.infer("classified", body, version="2")
        )
        assert _answered(*rest.infer("classified", body)) == ("1", "primary")
    shadow = _wait_for(
        lambda: rest.deployment("classified")["status"]["shadow"],
        lambda f: f["agreed"] + f["disagreed"] + f["errors"] + f["dropped"] == sent,
        f"all {sent} shadow copies compared",
    )
    assert shadow["errors"] == shadow["dropped"] == 0
    # a copy agrees exactly when both versions chose the same class, although their probabilities differ
    assert shadow["agreed"] == same_class > 0 and shadow["mean_abs_difference"] > 0


def test_a_slow_shadow_stays_off_the_clients_path(rest: Rest) -> None:
    status, answer = rest.put("slow_shadow", {"kind": "shadow", "primary": 1, "shadow": 2}, revision=0)
    assert status == 200, answer
    sent = 30  # the shadow computes at most 4 copies at a time, 0.2 s each: a few seconds to compare them all
    latencies = []
    for value in range(sent):
        start = time.perf_counter()
        assert _answered(*rest.infer("slow_shadow", _x_body(value))) == ("1", "primary")
        latencies.append(time.perf_counter() - start)
    compared_when_clients_done = rest.deployment("slow_shadow")["status"]["shadow"]["agreed"]
    assert statistics.median(latencies) < SHADOW_SLEEP_S / 2, f"clients waited for the shadow: {latencies}"
    assert compared_when_clients_done < sent, "the clients' answers waited for their shadow copies"
    shadow = _wait_for(
        lambda: rest.deployment("slow_shadow")["status"]["shadow"],
        lambda f: f["agreed"] + f["disagreed"] + f["errors"] + f["dropped"] == sent,
        f"all {sent} slow shadow copies compared",
    )
    # the same outputs: every compared copy agrees
    assert shadow["agreed"] == shadow["requests"] == sent and shadow["agreement_rate"] == 1.0
    assert shadow["mean_abs_difference"] == 0.0
    assert shadow["shadow_p99_ms"] >= SHADOW_SLEEP_S * 1000 > shadow["primary_p99_ms"]


# -- 5. automatic rollback -----------------------------------------------------------------------


def _send_until_state(
    rest: Rest, name: str, state: str, body: Callable[[int], dict[str, Any]], *, per_probe: int
) -> tuple[dict[str, Any], list[int]]:
    """Sends requests (``per_probe`` between looks) until the deployment's canary is in ``state``;
    the deployment then, and the status of every request sent."""
    statuses: list[int] = []

    def probe() -> dict[str, Any]:
        statuses.extend(rest.infer(name, body(value))[0] for value in range(per_probe))
        return rest.deployment(name)

    deployment = _wait_for(probe, lambda d: d["policy"]["state"] == state, f"{name}'s canary {state}")
    return deployment, statuses


def _check_rolled_back(rest: Rest, name: str, guard: str) -> dict[str, Any]:
    """Traffic back on the primary, a history row by dhow-analysis and a rollback event; the event's details."""
    for value in range(50):
        assert _answered(*rest.infer(name, _x_body(value))) == ("1", "primary")
    deployment = rest.deployment(name)
    assert deployment["status"]["weight"] == 0 and deployment["updated_by"] == "dhow-analysis"
    last = rest.ok("GET", f"{ADMIN}/{name}/history")["history"][-1]
    assert (last["actor"], last["action"]) == ("dhow-analysis", "rollback")
    assert f"guard {guard} breached" in last["reason"]
    assert last["before"]["state"] == "progressing" and last["after"]["state"] == "rolled_back"
    events = [e for e in rest.ok("GET", f"{ADMIN}/{name}/events")["events"] if e["kind"] == "rollback"]
    assert len(events) == 1, events
    details: dict[str, Any] = events[0]["details"]
    assert details["guard"] == guard and f"guard {guard} breached" in details["reason"]
    assert details["canary"]["requests"] >= 20
    return details


def test_a_failing_canary_is_rolled_back(rest: Rest) -> None:
    policy = {
        "kind": "canary",
        "primary": 1,
        "canary": 2,
        "steps": [50],
        "guards": {"min_requests": 20, "max_error_rate": 0.1},
    }
    status, answer = rest.put("failing_canary", policy, revision=0)
    assert status == 200, answer
    deployment, statuses = _send_until_state(rest, "failing_canary", "rolled_back", _x_body, per_probe=10)
    assert deployment["revision"] == 2
    assert 500 in statuses and set(statuses) == {200, 500}, "the canary's failures reached the clients"
    details = _check_rolled_back(rest, "failing_canary", "max_error_rate")
    assert details["error_rate"] == 1.0 and details["canary"]["errors"] == details["canary"]["requests"]


def test_a_slow_canary_is_rolled_back(rest: Rest) -> None:
    policy = {
        "kind": "canary",
        "primary": 1,
        "canary": 2,
        "steps": [50],
        "guards": {"min_requests": 20, "max_p99_ratio": 3},
    }
    status, answer = rest.put("slow_canary", policy, revision=0)
    assert status == 200, answer
    _, statuses = _send_until_state(rest, "slow_canary", "rolled_back", _x_body, per_probe=10)
    assert set(statuses) == {200}, "a slow canary must answer, not fail"
    details = _check_rolled_back(rest, "slow_canary", "max_p99_ratio")
    assert details["error_rate"] == 0 and details["p99_ratio"] > 3
    assert details["canary"]["p99_ms"] >= 50


# -- 6. automatic promotion ----------------------------------------------------------------------


def test_a_healthy_canary_is_promoted(rest: Rest) -> None:
    policy = {
        "kind": "canary",
        "primary": 1,
        "canary": 2,
        "steps": [20, 100],
        "auto_promote": True,
        # latency is not what this test is about: a p99 ratio no hiccup reaches, so only promotion is judged
        "guards": {"min_requests": 20, "max_p99_ratio": 1000},
    }
    status, answer = rest.put("promoting", policy, revision=0)
    assert status == 200, answer
    deployment, statuses = _send_until_state(rest, "promoting", "promoted", _tabular_body, per_probe=20)
    assert set(statuses) == {200}
    assert deployment["status"]["weight"] == 100 and deployment["revision"] == 3
    for row in range(30):
        assert _answered(*rest.infer("promoting", _tabular_body(row))) == ("2", "canary")
    history = rest.ok("GET", f"{ADMIN}/promoting/history")["history"]
    assert [(r["actor"], r["action"]) for r in history] == [
        ("anonymous", "create"),
        ("dhow-analysis", "promote"),
        ("dhow-analysis", "promote"),
    ]
    assert [r["after"]["step"] for r in history] == [0, 1, 1]
    assert [r["after"]["state"] for r in history] == ["progressing", "progressing", "promoted"]
    events = rest.ok("GET", f"{ADMIN}/promoting/events")["events"]
    assert [e["kind"] for e in events] == ["promote", "promote"]
    assert all(e["details"]["canary"]["requests"] >= 20 for e in events)
    assert [e["details"]["weight"] for e in events] == [20, 100]


# -- 7. blue/green under load --------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    start: float
    end: float
    version: str | None
    variant: str | None
    error: str | None = None


def test_bluegreen_switches_under_continuous_load(server: DhowProcess, rest: Rest) -> None:
    stop = threading.Event()
    results: list[list[Sent]] = [[] for _ in range(4)]

    def rest_client(out: list[Sent]) -> None:
        connection = Rest(server)
        row = 0
        while not stop.is_set():
            start = time.monotonic()
            try:
                status, answer = connection.infer("bluegreen", _tabular_body(row % 50))
                if status == 200:
                    out.append(Sent(start, time.monotonic(), *_answered(status, answer)))
                else:
                    out.append(Sent(start, time.monotonic(), None, None, f"HTTP {status}: {answer}"))
            except Exception as exc:
                out.append(Sent(start, time.monotonic(), None, None, repr(exc)))
                connection.close()
            row += 1
        connection.close()

    def grpc_client(out: list[Sent]) -> None:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        row = 0
        while not stop.is_set():
            start = time.monotonic()
            try:
                out.append(Sent(start, time.monotonic(), *_grpc_infer(client, "bluegreen", row % 50)))
            except Exception as exc:
                out.append(Sent(start, time.monotonic(), None, None, repr(exc)))
            row += 1
        client.close()

    threads = [threading.Thread(target=rest_client, args=(results[i],)) for i in range(3)]
    threads.append(threading.Thread(target=grpc_client, args=(results[3],)))
    for thread in threads:
        thread.start()
    rest.actor = "release-bot"
    # (start, end) of each admin change, and the answer expected between this change and the next
    changes: list[tuple[float, float, tuple[str, str | None]]] = []

    def let_traffic_flow() -> None:
        counts = [len(r) for r in results]
        _wait_for(
            lambda: [len(r) - c for r, c in zip(results, counts, strict=True)],
            lambda grown: min(grown) >= 50,
            "every client thread answered 50 more times",
        )

    def change(method: str, path: str, body: object, expected: tuple[str, str | None]) -> dict[str, Any]:
        start = time.monotonic()
        answer = rest.ok(method, path, body)
        changes.append((start, time.monotonic(), expected))
        let_traffic_flow()
        return answer  # type: ignore[no-any-return]

    try:
        changes.append((0.0, time.monotonic(), ("2", None)))  # no deployment yet: the newest version
        let_traffic_flow()
        policy = {"kind": "bluegreen", "blue": 1, "green": 2}
        change("PUT", f"{ADMIN}/bluegreen", {"policy": policy, "revision": 0}, ("1", "blue"))
        change("POST", f"{ADMIN}/bluegreen/switch", {"reason": "green goes live"}, ("2", "green"))
        change("POST", f"{ADMIN}/bluegreen/switch", {"reason": "back to blue"}, ("1", "blue"))
        released = change("POST", f"{ADMIN}/bluegreen/release", {"revision": 3}, ("1", "primary"))
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    sent = [s for r in results for s in r]
    failed = [s for s in sent if s.error is not None]
    assert not failed, f"{len(failed)} of {len(sent)} requests failed, e.g. {failed[:3]}"
    # a request sent after a change was answered, and answered before the next began, meets the new routing
    for index, (_, done, expected) in enumerate(changes):
        next_start = changes[index + 1][0] if index + 1 < len(changes) else math.inf
        phase = [s for s in sent if s.start > done and s.end < next_start]
        assert len(phase) >= 20, f"change {index}: only {len(phase)} requests in between"
        wrong = [s for s in phase if (s.version, s.variant) != expected]
        assert not wrong, f"change {index}: expected {expected}, {len(wrong)} answered otherwise, e.g. {wrong[:3]}"
    assert released["policy"] == {"kind": "pinned", "version": 1} and released["revision"] == 4
    history = rest.ok("GET", f"{ADMIN}/bluegreen/history")["history"]
    assert [(r["action"], r["actor"]) for r in history] == [
        ("create", "release-bot"),
        ("switch", "release-bot"),
        ("switch", "release-bot"),
        ("release", "release-bot"),
    ]


# -- 8. the CLI and the history ------------------------------------------------------------------


def _cli(server: DhowProcess, *args: str, user: str = "bob") -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "dhow.cli", "rollout", *args, "--url", "http://" + server.http_url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "USER": user})


def _cli_ok(server: DhowProcess, *args: str) -> str:
    done = _cli(server, *args)
    assert done.returncode == 0, f"dhow rollout {' '.join(args)} exited {done.returncode}: {done.stderr}"
    return done.stdout


def _cli_refused(server: DhowProcess, *args: str, message: str) -> None:
    done = _cli(server, *args)
    assert done.returncode == 1, f"dhow rollout {' '.join(args)} exited {done.returncode}: {done.stdout}"
    assert message in done.stderr, done.stderr


def test_cli_flow_and_history(server: DhowProcess, rest: Rest) -> None:
    rest.actor = "alice"
    status, answer = rest.put("cli_flow", {"kind": "pinned", "version": 2}, revision=0, reason="baseline")
    assert status == 200, answer

    out = _cli_ok(
        server,
        *("canary", "cli_flow", "--primary", "2", "--canary", "1", "--steps", "10,50,100"),
        *("--min-requests", "1000000000", "--reason", "try version 1"),
    )
    assert "canary: version 1 gets 10% (step 1 of 3), primary version 2" in out
    assert "updated by bob" in out
    _cli_ok(server, "promote", "cli_flow", "--reason", "looks good")
    shown = json.loads(_cli_ok(server, "show", "cli_flow", "--json"))
    assert shown["revision"] == 3 and shown["policy"]["step"] == 1 and shown["status"]["weight"] == 50
    variants = [_answered(*rest.infer("cli_flow", _tabular_body(row)))[1] for row in range(400)]
    _assert_binomial(variants.count("canary"), len(variants), 0.5, "requests to the canary after a promote")

    _cli_ok(server, "rollback", "cli_flow", "--reason", "errors up")
    assert "state rolled_back" in _cli_ok(server, "show", "cli_flow")
    assert {_answered(*rest.infer("cli_flow", _tabular_body(row))) for row in range(50)} == {("2", "primary")}

    # refusals exit 1 with the server's message, and change nothing
    _cli_refused(
        server, "promote", "cli_flow", message="the canary is rolled back; set a new policy to start again (HTTP 400)"
    )
    _cli_refused(
        server, "canary", "cli_flow", "--primary", "1", "--canary", "1", message="canary version 1 is the primary"
    )
    _cli_refused(
        server,
        *("pin", "cli_flow", "1", "--revision", "2"),
        message="deployment 'cli_flow' is at revision 4, not 2: read it again and retry (HTTP 409)",
    )
    _cli_refused(server, "pin", "cli_flow", "9", message="no version 9 in the repository (versions there: 1, 2)")
    assert rest.deployment("cli_flow")["revision"] == 4

    status, answer = rest.put("cli_flow", {"kind": "pinned", "version": 1}, revision=4, reason="settle on one")
    assert status == 200, answer

    text = _cli_ok(server, "history", "cli_flow").splitlines()
    expected = [
        (1, "alice", "create", "baseline"),
        (2, "bob", "edit", "try version 1"),
        (3, "bob", "promote", "looks good"),
        (4, "bob", "rollback", "errors up"),
        (5, "alice", "edit", "settle on one"),
    ]
    assert len(text) == len(expected), text
    for line, (revision, actor, action, reason) in zip(text, expected, strict=True):
        assert line.startswith(f"rev {revision} ") and f'  {actor}  {action}  "{reason}"' in line, line
    rows = json.loads(_cli_ok(server, "history", "cli_flow", "--json"))["history"]
    assert [(r["revision"], r["actor"], r["action"], r["reason"]) for r in rows] == expected
    times = [datetime.fromisoformat(r["at"]) for r in rows]  # UTC ISO 8601, in order
    assert all(t.utcoffset() == timedelta(0) for t in times) and times == sorted(times)
    assert rows[-1]["before"]["state"] == "rolled_back" and rows[-1]["after"] == {"kind": "pinned", "version": 1}


def test_cli_refuses_a_model_the_server_does_not_know(server: DhowProcess) -> None:
    """``history`` printed nothing for a typo, exit 0, as for a model never deployed; every command that takes a
    model refuses an unknown one (exit 1, the server's message), and a known one without history says so."""
    unknown = "unknown model 'tabulr'; the repository index"
    no_deployment = "no deployment 'tabulr'; GET /v2/admin/deployments lists them (HTTP 404)"
    for args, message in [
        (("history", "tabulr"), unknown),
        (("events", "tabulr"), unknown),
        (("pin", "tabulr", "1"), unknown),
        (("canary", "tabulr", "--primary", "1", "--canary", "2"), unknown),
        (("show", "tabulr"), no_deployment),
        (("promote", "tabulr"), no_deployment),
        (("switch", "tabulr"), no_deployment),
        (("delete", "tabulr"), no_deployment),
    ]:
        _cli_refused(server, *args, message=message)
    assert _cli_ok(server, "history", "never_deployed").strip() == "never_deployed: no history"
    assert json.loads(_cli_ok(server, "history", "never_deployed", "--json")) == {"history": []}


# -- 9. a registry shared on PostgreSQL ----------------------------------------------------------


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    try:
        admin = psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        reason = f"PostgreSQL at {PG_SERVER} cannot be reached: {' '.join(str(exc).split())}"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    database = f"dhow_e2e_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f"CREATE DATABASE {database}")
        try:
            yield f"{PG_SERVER}/{database}"
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def test_two_servers_share_deployments_on_postgresql(demo_repository: Path, tmp_path: Path, postgres_url: str) -> None:
    repository = _tabular_only(demo_repository, tmp_path)
    options = ("--registry", postgres_url, "--registry-poll", "0.5")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = start_dhow(repository, tmp_path / "a", *options)
    try:
        b = start_dhow(repository, tmp_path / "b", *options)
    except BaseException:
        a.stop()
        raise
    on_a, on_b = Rest(a, actor="alice"), Rest(b, actor="bruno")
    try:
        assert _answered(*on_b.infer("tabular", _tabular_body())) == ("2", None)
        status, answer = on_a.put("tabular", {"kind": "pinned", "version": 1}, revision=0, reason="through A")
        assert status == 200, answer
        _wait_for(
            lambda: _answered(*on_b.infer("tabular", _tabular_body())),
            lambda seen: seen == ("1", "primary"),
            "server B routes by the policy set through server A",
        )
        seen_by_b = on_b.deployment("tabular")
        assert seen_by_b["revision"] == 1 and seen_by_b["updated_by"] == "alice"

        policy = {"kind": "bluegreen", "blue": 1, "green": 2, "active": "green"}
        status, answer = on_a.put("tabular", policy, revision=1)
        assert status == 200 and answer["revision"] == 2, answer
        # B edits with the revision it read before A's edit
        status, answer = on_b.put("tabular", {"kind": "pinned", "version": 2}, revision=1)
        assert status == 409 and answer["error"] == (
            "deployment 'tabular' is at revision 2, not 1: read it again and retry"
        )
        _wait_for(
            lambda: _answered(*on_b.infer("tabular", _tabular_body())),
            lambda seen: seen == ("2", "green"),
            "server B applies server A's second edit",
        )
        assert on_b.deployment("tabular")["policy"]["active"] == "green"
        # and the other way round: B switches, A follows
        assert on_b.ok("POST", f"{ADMIN}/tabular/switch", {"revision": 2})["revision"] == 3
        _wait_for(
            lambda: _answered(*on_a.infer("tabular", _tabular_body())),
            lambda seen: seen == ("1", "blue"),
            "server A applies server B's switch",
        )
        history = on_a.ok("GET", f"{ADMIN}/tabular/history")["history"]
        assert [(r["actor"], r["action"]) for r in history] == [
            ("alice", "create"),
            ("alice", "edit"),
            ("bruno", "switch"),
        ]
    finally:
        on_a.close()
        on_b.close()
        codes = (a.stop(), b.stop())
    assert codes == (0, 0), a.log() + b.log()


# -- 10. restart ---------------------------------------------------------------------------------


def test_deployments_survive_a_restart(demo_repository: Path, tmp_path: Path) -> None:
    repository = _tabular_only(demo_repository, tmp_path)
    first = start_dhow(repository, tmp_path)
    rest = Rest(first, actor="alice")
    try:
        status, answer = rest.put("tabular", {"kind": "bluegreen", "blue": 2, "green": 1}, revision=0)
        assert status == 200, answer
        before = rest.ok("POST", f"{ADMIN}/tabular/switch", {"reason": "green is version 1"})
        assert _answered(*rest.infer("tabular", _tabular_body())) == ("1", "green")
    finally:
        rest.close()
        assert first.stop() == 0, first.log()
    assert (tmp_path / "data" / "registry.sqlite3").is_file()

    second = start_dhow(repository, tmp_path)  # the same --data-dir
    rest = Rest(second)
    try:
        after = rest.deployment("tabular")
        assert {k: after[k] for k in ("policy", "revision", "updated_at", "updated_by")} == {
            k: before[k] for k in ("policy", "revision", "updated_at", "updated_by")
        }
        assert _answered(*rest.infer("tabular", _tabular_body())) == ("1", "green")
        assert [r["action"] for r in rest.ok("GET", f"{ADMIN}/tabular/history")["history"]] == ["create", "switch"]
    finally:
        rest.close()
        assert second.stop() == 0, second.log()
