"""deploy/'s alert rules and Grafana dashboard against a real Prometheus scraping a real dhow server: promtool
accepts the rules, Prometheus evaluates every rule and every dashboard query without error, and every metric they
name is one dhow exports."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dhow.monitoring.quality import figures_of
from tests.conftest import DhowProcess, free_port, start_dhow, wait_until
from tests.monitoring_models import doubler_repository

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "dhow-alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dhow-dashboard.json"
#: what a scrape of this server must show: dhow's own series reached Prometheus
SCRAPED = ("dhow_inference_requests_total", "dhow_request_duration_seconds_bucket", "dhow_payload_log_events_total",
           "dhow_instance_resident_memory_bytes", "process_cpu_seconds_total", "dhow_queue_depth",
           "dhow_batch_fill_ratio_bucket", "dhow_audit_refusing_all")  # fmt: skip


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        reason = f"no {name} (Debian package prometheus: apt-get install prometheus; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    queries += [v["definition"].replace("label_values(", "").split(",")[0] for v in dashboard["templating"]["list"][1:]]
    # what Grafana substitutes before it asks Prometheus
    return [q.replace("$__rate_interval", "1m").replace("$model", ".*") for q in queries]


def _rule_queries() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _declared_by_dhow(series: str) -> bool:
    """Whether a series name is one dhow's source declares (a metric, a family of a collector), or the
    server process's (prometheus_client's process collector)."""
    if series.startswith("process_"):
        return True
    base = re.sub(r"_(total|bucket|sum|count)$", "", series)
    sources = "\n".join(path.read_text() for path in (ROOT / "src" / "dhow").rglob("*.py"))
    return f'"{base}"' in sources


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run([_binary("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_shows_every_quality_figure_dhow_exports() -> None:
    """A classifier's accuracy, precision and recall and a regressor's mae and rmse: each on a panel."""
    figures = set(figures_of("classification", [(1, 1)])) | set(figures_of("regression", [(1.0, 2.0)]))
    queries = [query for query in _dashboard_queries() if "dhow_model_quality" in query]
    matchers = [re.search(r'metric=~?"([^"]*)"', query) for query in queries]
    shown = {f for f in figures for m in matchers if m is None or re.fullmatch(m.group(1), f)}  # PromQL anchors
    assert shown == figures, f"no dashboard panel shows {figures - shown}"


def _alert(name: str, labels: dict[str, str], summary: str, description: str) -> dict[str, Any]:
    return {"alertname": name, "eval_time": "120m", "exp_alerts": [{
        "exp_labels": {"severity": "warning", **labels},
        "exp_annotations": {"summary": summary, "description": description},
    }]}  # fmt: skip


def test_quality_and_rollback_alerts_fire_as_their_readers_see_them(tmp_path: Path) -> None:
    """promtool's rule tests over made-up series: a classifier's accuracy halved, a regressor's rmse doubled (its
    mae steady), another regressor's mae exactly 0 once, a canary rolled back; each alert fires with its text, and
    none before (nor for the zero)."""
    quality = 'dhow_model_quality{{model="{}",version="1",metric="{}"}}'
    feedback = "Measured from the labels posted to /v2/models/{}/feedback; retrain, or roll back a recent version."
    tests = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": quality.format("iris", "accuracy"), "values": "1x60 0.5x120"},
            {"series": quality.format("prices", "rmse"), "values": "2x60 4x120"},
            {"series": quality.format("prices", "mae"), "values": "1x180"},
            # one exact label made its mae 0 once: no infinite ratio, no alert
            {"series": quality.format("exact", "mae"), "values": "0 0.05x179"},
            {"series": 'dhow_rollout_events_total{deployment="fraud",kind="rollback"}', "values": "0x110 1x70"},
        ],
        "alert_rule_test": [
            *({"alertname": name, "eval_time": "60m", "exp_alerts": []}
              for name in ("DhowQualityDrop", "DhowRegressionErrorRise", "DhowCanaryRolledBack")),
            _alert("DhowQualityDrop", {"model": "iris", "version": "1"},
                   "Model iris v1: accuracy at 50% of its best this week", feedback.format("iris")),
            _alert("DhowRegressionErrorRise", {"model": "prices", "version": "1", "metric": "rmse"},
                   "Model prices v1: rmse at 200% of its low this week", feedback.format("prices")),
            _alert("DhowCanaryRolledBack", {"deployment": "fraud"}, "Deployment fraud: the canary was rolled back",
                   "The canary analysis found a guard broken: its error rate (max_error_rate), its p99 latency "
                   "(max_p99_ratio) or, with min_accuracy_ratio set, its accuracy from feedback, against the stable "
                   "version's; 'dhow rollout history' has the guard and the figures."),
        ],
    }]}  # fmt: skip
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    result = subprocess.run([_binary("promtool"), "test", "rules", str(tmp_path / "tests.yaml")], capture_output=True)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


@pytest.fixture
def scraped(tmp_path: Path) -> Iterator[tuple[str, DhowProcess]]:
    prometheus = _binary("prometheus")
    repository = doubler_repository(tmp_path, "instances: {count: 1, kind: process}\n")
    server = start_dhow(repository, tmp_path, "--payload-log", f"file://{tmp_path}/payloads.jsonl")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "dhow", "static_configs": [{"targets": [server.http_url]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        process.terminate()
        process.wait(20)
        log.close()
        assert server.stop() == 0, server.log()


def _api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as exc:  # a bad query: Prometheus says why in the body
        return json.loads(exc.read())
    except OSError:
        return {"status": "unreachable"}


def _infer(server: DhowProcess, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/doubler/infer", json.dumps(body).encode(), method="POST"
    )
    with contextlib.suppress(urllib.error.HTTPError):  # a refused request is part of the traffic the rules see
        urllib.request.urlopen(request, timeout=30).read()


def test_every_rule_and_dashboard_query_evaluates_against_a_scraped_server(scraped: tuple[str, DhowProcess]) -> None:
    base, server = scraped
    good = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
    bad = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}
    for _ in range(3):
        for body in (good, good, bad):
            _infer(server, body)
        time.sleep(1)

    def scraped_enough() -> bool:
        answer = _api(base, "query", query="count_over_time(dhow_inference_requests_total[1m])")
        return answer.get("status") == "success" and any(float(r["value"][1]) >= 3 for r in answer["data"]["result"])

    wait_until(scraped_enough, timeout=60, what="three scrapes of dhow by Prometheus")
    names = set(_api(base, "label/__name__/values")["data"])
    assert set(SCRAPED) <= names, f"dhow's series reached Prometheus: missing {set(SCRAPED) - names}"

    queries = _dashboard_queries() + _rule_queries()
    for query in queries:
        answer = _api(base, "query", query=query)
        assert answer["status"] == "success", f"{query}: {answer}"
        for series in set(re.findall(r"\b((?:dhow|process)_[a-z_]+)\b", query)):
            assert _declared_by_dhow(series), f"{query} reads {series}, which dhow does not export"

    # the rules themselves, loaded by Prometheus and evaluated every second: none in error
    def all_evaluated() -> bool:
        groups = _api(base, "rules").get("data", {}).get("groups", [])
        rules = [rule for group in groups for rule in group["rules"]]
        return len(rules) == len(_rule_queries()) and all(r["lastEvaluation"] > "2000" for r in rules)

    wait_until(all_evaluated, timeout=30, what="every rule evaluated")
    rules = [rule for group in _api(base, "rules")["data"]["groups"] for rule in group["rules"]]
    assert [(r["name"], r.get("lastError", "")) for r in rules if r["health"] != "ok"] == []
    error_rate = _api(base, "query", query='sum(dhow_inference_requests_total{outcome="INVALID_ARGUMENT"})')
    assert float(error_rate["data"]["result"][0]["value"][1]) >= 1, "the refused requests were counted and scraped"
