"""The Helm chart, rendered offline by Helm's own renderer for every value profile and validated manifest by manifest.

Built-in kinds are checked against the Kubernetes schemas of ``kubernetes-validate`` (strict: an unknown field is an
error); the custom resources (KEDA, the HTTP add-on, ServiceMonitor, Gateway API, Envoy Gateway) against the CRD
schemas bundled in ``deploy/schemas``. A manifest whose kind has no schema fails. ``helm lint --strict`` passes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from dhow import cli
from dhow.monitoring.metrics import ServerMetrics
from dhow.protocols.routes import PUBLIC, ROUTES
from dhow.settings import ServerSettings, resolve_settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "dhow"
SCHEMAS = ROOT / "deploy" / "schemas"
PROFILES = ("default", "smb-cpu", "enterprise-gpu", "serverless")
#: the oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the schemas know
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
NAMESPACE = "ml"

Manifest = dict[str, Any]


def _profile(name: str) -> dict[str, Any]:
    return {} if name == "default" else yaml.safe_load((CHART / "profiles" / f"{name}.yaml").read_text())


def render(values: dict[str, Any], release: str = "dhow") -> list[Manifest]:
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name=release, namespace=NAMESPACE)
    return [doc for name, text in rendered.items() if name.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc]


def validate(manifest: Manifest, kubernetes: str = KUBERNETES_VERSIONS[0]) -> None:
    """Raise when the manifest breaks its kind's schema; a kind with no schema is an error too."""
    group, _, version = manifest["apiVersion"].rpartition("/")
    bundled = SCHEMAS / group / f"{manifest['kind'].lower()}_{version}.json"
    if bundled.exists():
        jsonschema.Draft202012Validator(json.loads(bundled.read_text())).validate(manifest)
    else:
        kubernetes_validate.validate(manifest, kubernetes, strict=True)


def one(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name} in {[(m['kind'], m['metadata']['name']) for m in manifests]}"
    return found[0]


def container(deployment: Manifest) -> Manifest:
    containers: list[Manifest] = deployment["spec"]["template"]["spec"]["containers"]
    return containers[0]


def loaded_models(deployment: Manifest) -> list[str]:
    args: list[str] = container(deployment)["args"]
    return [args[i + 1] for i, arg in enumerate(args) if arg == "--load-model"]


@pytest.fixture(scope="module")
def profiles() -> dict[str, list[Manifest]]:
    return {name: render(_profile(name)) for name in PROFILES}


@pytest.mark.parametrize("profile", PROFILES)
def test_every_manifest_of_every_profile_is_valid(profiles: dict[str, list[Manifest]], profile: str) -> None:
    manifests = profiles[profile]
    assert manifests
    for kubernetes in KUBERNETES_VERSIONS:
        for manifest in manifests:
            try:
                validate(manifest, kubernetes)
            except Exception as exc:
                pytest.fail(
                    f"{profile}: {manifest['kind']}/{manifest['metadata']['name']} (Kubernetes {kubernetes}): {exc}"
                )


def test_names_fit_kubernetes_limits_with_the_longest_release_name() -> None:
    """Helm allows 53 characters of release name; every name must stay a DNS label (63) where Kubernetes says so."""
    manifests = render(_profile("enterprise-gpu"), release="r" * 53)
    for manifest in manifests:
        validate(manifest)
        name = manifest["metadata"]["name"]
        limit = 253 if manifest["kind"] in ("Backend", "BackendTrafficPolicy") else 63
        assert len(name) <= limit and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        for value in manifest["metadata"]["labels"].values():
            assert len(value) <= 63, value


@pytest.mark.parametrize("profile", PROFILES)
def test_helm_lint_strict_passes(profile: str) -> None:
    report = helm.lint(str(CHART), _profile(profile), strict=True, kube_version="v1.30.0")
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_the_validation_can_fail() -> None:
    """A misspelt field fails, in a built-in kind and in a custom resource alike, and so does an unknown kind."""
    manifests = render(_profile("enterprise-gpu"))
    deployment = one(manifests, "Deployment", "dhow-cpu")
    deployment["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = one(manifests, "ScaledObject", "dhow-cpu")
    scaled["spec"]["maxReplicas"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)
    route = one(manifests, "HTTPRoute", "dhow")
    route["spec"]["rules"] *= 9  # past the 16 rules a route may have
    with pytest.raises(jsonschema.ValidationError):
        validate(route)
    with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
        validate({"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "x"}})


def test_the_settings_file_is_one_dhow_reads(profiles: dict[str, list[Manifest]], tmp_path: Path) -> None:
    for profile, manifests in profiles.items():
        settings_file = tmp_path / f"{profile}.yaml"
        settings_file.write_text(one(manifests, "ConfigMap", "dhow")["data"]["settings.yaml"])
        settings = resolve_settings({}, config_file=settings_file, env={})
        assert (settings.host, settings.http_port, settings.grpc_port) == ("0.0.0.0", 8080, 8081), profile
        assert settings.model_control == "explicit" and settings.strict_readiness, profile


def test_probes_drain_and_security_of_every_server_pod(profiles: dict[str, list[Manifest]]) -> None:
    # the probes are dhow's own health routes, which need no credentials
    health = {route.name: route.path for route in ROUTES if route.name in PUBLIC}
    for profile, manifests in profiles.items():
        for deployment in (
            m for m in manifests if m["kind"] == "Deployment" and "-stream-" not in m["metadata"]["name"]
        ):
            pod, main = deployment["spec"]["template"]["spec"], container(deployment)
            assert main["readinessProbe"]["httpGet"]["path"] == health["server_ready"], profile
            assert main["livenessProbe"]["httpGet"]["path"] == health["server_live"], profile
            assert main["startupProbe"]["httpGet"]["path"] == health["server_live"], profile
            startup = main["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "a large model has 10 minutes to load"
            # the grace period covers the preStop sleep, dhow's drain and closing
            drain = {e["name"]: e["value"] for e in main["env"]}["DHOW_DRAIN_SECONDS"]
            sleep = main["lifecycle"]["preStop"]["sleep"]["seconds"]
            assert pod["terminationGracePeriodSeconds"] >= sleep + int(drain) + 5, profile
            assert pod["securityContext"]["runAsNonRoot"] and main["securityContext"]["readOnlyRootFilesystem"]
            assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert pod["automountServiceAccountToken"] is False


def test_the_gpu_pool_runs_on_gpu_nodes_with_its_models_and_the_cpu_pool_backs_it_up(
    profiles: dict[str, list[Manifest]],
) -> None:
    manifests = profiles["enterprise-gpu"]
    gpu, cpu = one(manifests, "Deployment", "dhow-gpu"), one(manifests, "Deployment", "dhow-cpu")
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container(gpu)["image"].endswith("-cuda")
    assert gpu["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["spec"]["template"]["spec"][
        "tolerations"
    ]
    assert "nvidia.com/gpu" not in container(cpu)["resources"].get("limits", {})
    assert loaded_models(gpu) == ["resnet", "torch_mlp"]
    # the CPU pool loads its own models and those it is the fallback of
    assert loaded_models(cpu) == ["tabular", "text_classifier", "resnet", "torch_mlp"]
    assert one(manifests, "Service", "dhow-gpu")["spec"]["ports"][1]["appProtocol"] == "kubernetes.io/h2c"


def test_scaling_rules_read_the_metrics_dhow_exports(profiles: dict[str, list[Manifest]]) -> None:
    exported = {metric.name for metric in ServerMetrics().registry.collect()}
    assert {"dhow_queue_depth", "dhow_inflight_requests", "dhow_batch_fill_ratio"} <= exported
    manifests = profiles["enterprise-gpu"]
    triggers = one(manifests, "ScaledObject", "dhow-gpu")["spec"]["triggers"]
    queries = {t["name"]: t["metadata"]["query"] for t in triggers}
    assert set(queries) == {"queue-resnet", "queue-torch-mlp", "inflight", "batch-fill"}
    assert 'model="resnet"' in queries["queue-resnet"] and 'service="dhow-gpu"' in queries["queue-resnet"]
    assert {t["metadata"]["threshold"] for t in triggers if t["name"] == "queue-resnet"} == {"16"}
    for query in queries.values():
        used = {name for name in exported if name in query}
        assert used, f"{query} reads no metric dhow exports"
    assert all(t["type"] != "cpu" for t in triggers), "never only on CPU"
    hpa = render({**_profile("enterprise-gpu"), "autoscaling": {"engine": "hpa"}})
    metrics = one(hpa, "HorizontalPodAutoscaler", "dhow-cpu")["spec"]["metrics"]
    assert {m["pods"]["metric"]["name"] for m in metrics} <= exported


def test_kafka_consumers_scale_on_lag_and_never_past_the_partitions(profiles: dict[str, list[Manifest]]) -> None:
    scaled = one(profiles["enterprise-gpu"], "ScaledObject", "dhow-stream-scores")
    assert scaled["spec"]["maxReplicaCount"] == 12
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert (
        trigger["metadata"].items()
        >= {
            "bootstrapServers": "kafka.data.svc:9092",
            "consumerGroup": "dhow-scores",
            "topic": "score-requests",
        }.items()
    )
    secured = render({**_profile("enterprise-gpu"), "kafka": {"triggerAuthentication": "kafka-sasl"}})
    validate(one(secured, "ScaledObject", "dhow-stream-scores"))
    assert one(secured, "ScaledObject", "dhow-stream-scores")["spec"]["triggers"][0]["authenticationRef"] == {
        "name": "kafka-sasl"
    }
    args = container(one(profiles["enterprise-gpu"], "Deployment", "dhow-stream-scores"))["args"]
    assert args[:2] == ["stream", "run"] and "--dead-letter" in args


def test_serverless_scales_to_zero_through_the_http_add_on(profiles: dict[str, list[Manifest]]) -> None:
    manifests = profiles["serverless"]
    scaled = one(manifests, "HTTPScaledObject", "dhow-cpu")["spec"]
    assert scaled["replicas"]["min"] == 0
    assert scaled["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "dhow-cpu",
        "service": "dhow-cpu",
        "port": 8080,
    }
    # a cold start waits for a ready replica (models loaded) longer than a model takes to load here
    assert scaled["timeouts"]["conditionWait"] == "120s"
    assert not [m for m in manifests if m["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]
    sources = one(manifests, "NetworkPolicy", "dhow")["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}} in sources


def test_only_the_gateway_and_prometheus_reach_the_pods(profiles: dict[str, list[Manifest]]) -> None:
    policy = one(profiles["enterprise-gpu"], "NetworkPolicy", "dhow")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    serving, scraping = policy["ingress"]
    assert serving["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "envoy-gateway-system"}}}
    ]
    assert scraping["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert scraping["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}


def _backends(rule: Manifest) -> list[str]:
    return [ref["name"] for ref in rule["backendRefs"]]


def test_routes_send_each_model_to_its_pool_and_fail_over_to_the_other(profiles: dict[str, list[Manifest]]) -> None:
    manifests = profiles["enterprise-gpu"]
    rules = one(manifests, "HTTPRoute", "dhow")["spec"]["rules"]
    by_path = {match["path"]["value"]: _backends(rule) for rule in rules for match in rule["matches"]}
    assert by_path["/v2/models/resnet"] == ["dhow-gpu-http", "dhow-cpu-http-fallback"]
    assert by_path["/v2/models/tabular"] == ["dhow-cpu-http"]
    assert by_path["/"] == ["dhow-cpu-http"]
    backends = {m["metadata"]["name"]: m["spec"] for m in manifests if m["kind"] == "Backend"}
    assert backends["dhow-cpu-http-fallback"]["fallback"] is True and backends["dhow-gpu-http"]["fallback"] is False
    assert backends["dhow-gpu-grpc"]["appProtocols"] == ["gateway.envoyproxy.io/h2c"]
    grpc = one(manifests, "GRPCRoute", "dhow")["spec"]["rules"]
    by_header = {m["headers"][0]["value"]: _backends(rule) for rule in grpc for m in rule["matches"] if "headers" in m}
    assert by_header["torch_mlp"] == ["dhow-gpu-grpc", "dhow-cpu-grpc-fallback"]
    policy = one(manifests, "BackendTrafficPolicy", "dhow")["spec"]
    assert "connect-failure" in policy["retry"]["retryOn"]["triggers"]
    profile = _profile("enterprise-gpu")
    plain = render({**profile, "gateway": {**profile["gateway"], "failover": "none"}})
    assert not [m for m in plain if m["kind"] in ("Backend", "BackendTrafficPolicy")]
    plain_rules = one(plain, "HTTPRoute", "dhow")["spec"]["rules"]
    assert {"name": "dhow-gpu", "port": 8080} in [ref for rule in plain_rules for ref in rule["backendRefs"]]


#: a stream's values, all that `dhow stream run` needs but its partition count
_STREAM = {"name": "s", "model": "m", "source": "kafka://k:9092/t", "sink": "kafka://k:9092/r",
           "deadLetter": "kafka://k:9092/d", "group": "g"}  # fmt: skip


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"models": [{"name": "resnet", "pool": "gpu"}]},
         'model "resnet" is placed on pool "gpu", which is not enabled; enabled pools: cpu'),
        ({"models": [{"name": "m", "pool": "cpu", "fallback": "cpu"}]}, 'model "m" falls back to its own pool "cpu"'),
        # values.schema.json: a misspelt or unknown value is refused, never ignored
        ({"autoscaling": {"engine": "cpu"}}, "at '/autoscaling/engine': value must be one of 'keda', 'hpa', 'none'"),
        ({"pools": {"cpu": {"gpu": 1}}}, "at '/pools/cpu': additional properties 'gpu' not allowed"),
        ({"models": [{"name": "m"}]}, "at '/models/0': missing property 'pool'"),
        ({"pools": {"cpu": {"minReplicas": 0}}}, "pools.cpu.minReplicas: 0 needs the KEDA HTTP add-on"),
        ({"persistence": {"enabled": True}}, "but pool cpu may run more; give secrets.registryUrl"),
        ({"streams": [{**_STREAM, "pool": "gpu", "partitions": 3}]},
         'streams: "s" runs on pool "gpu", which is not enabled'),
        ({"httpAddon": {"enabled": True}, "gateway": {"enabled": True}},
         "the routes would go around the HTTP add-on's interceptor"),
        ({"streams": [{**_STREAM, "source": "kinesis://x", "partitions": 1}]}, "source must be kafka://HOST:PORT/TOPIC"),
        ({"streams": [_STREAM]}, '"s" needs partitions'),
        ({"streams": [{k: v for k, v in _STREAM.items() if k != "sink"}]}, "at '/streams/0': missing property 'sink'"),
        ({"streams": [{k: v for k, v in _STREAM.items() if k != "deadLetter"} | {"partitions": 1}]},
         '"s" needs deadLetter'),
    ],
)  # fmt: skip
def test_contradicting_values_fail_the_render_with_what_to_change(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as failure:
        render(values)
    assert message in str(failure.value)


def test_every_dhow_variable_the_chart_sets_is_a_setting_dhow_reads(profiles: dict[str, list[Manifest]]) -> None:
    # dhow reads DHOW_<SETTING> and ignores any other name: a misspelt variable would be a setting silently lost
    known = {"DHOW_" + field.name.upper() for field in dataclasses.fields(ServerSettings)}
    given: set[str] = set()
    for manifests in profiles.values():
        for manifest in manifests:
            if manifest["kind"] == "Secret":
                given.update(manifest.get("stringData", {}))
            for pod_container in manifest.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                given.update(variable["name"] for variable in pod_container.get("env", []))
    chart_variables = {name for name in given if name.startswith("DHOW_")}
    assert "DHOW_DRAIN_SECONDS" in chart_variables  # the check sees what the chart sets
    assert chart_variables <= known, f"not settings of dhow: {sorted(chart_variables - known)}"


def test_stream_consumers_run_a_command_line_dhow_accepts(profiles: dict[str, list[Manifest]]) -> None:
    consumers = [
        m for m in profiles["enterprise-gpu"] if m["kind"] == "Deployment" and "-stream-" in m["metadata"]["name"]
    ]
    assert consumers
    for consumer in consumers:
        arguments = container(consumer)["args"]
        parsed = cli._parser().parse_args(arguments)  # dhow's own parser: exits on an option it does not know
        assert parsed.sink.startswith("kafka://") and parsed.dead_letter.startswith("kafka://")
        skipping = cli._parser().parse_args([*arguments[: arguments.index("--dead-letter")], "--on-error", "skip"])
        assert skipping.on_error == "skip"
