"""Access control, audit, masking and residency against a real server, over REST and gRPC.

One server (auth on, region ae, explicit model control) serves a small repository: ``tabular`` and
``text_python`` (tenant default), ``flags`` (tenant acme) and ``pii_echo`` (a model that logs its input, with
PII rules and every payload sampled). The role x route matrix below is written out by hand, independently of
the server's own tables, so that a change of either shows up here.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from dhow.access.actions import ACTIONS
from dhow.access.store import AccessStore
from dhow.governance.audit import AuditStore
from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.protocols.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from dhow.protocols.routes import GRPC_ACCESS, ROUTES
from tests.conftest import DhowProcess, start_dhow

ROLES = ("admin", "deployer", "invoker", "auditor")
READERS = frozenset(ROLES)
A, D, I, U = "admin", "deployer", "invoker", "auditor"  # noqa: E741

ROW = np.linspace(-1, 1, 32, dtype=np.float32)
INFER_BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": ROW.tolist()}]}
#: a request to ``flags``, tenant acme's model
FLAGS_BODY = {
    "inputs": [
        {"name": "mask", "datatype": "BOOL", "shape": [1, 4], "data": [True, False, True, True]},
        {"name": "x", "datatype": "FP16", "shape": [1, 4], "data": [1, 2, 3, 4]},
    ]
}

#: every REST route by its name: a request, and the roles that may make it (None: open to anyone)
REST_MATRIX: dict[str, tuple[str, str, Any, frozenset[str] | None]] = {
    "server_metadata": ("GET", "/v2", None, READERS),
    "server_live": ("GET", "/v2/health/live", None, None),
    "server_ready": ("GET", "/v2/health/ready", None, None),
    "metrics": ("GET", "/metrics", None, frozenset({A, U})),
    "all_model_statistics": ("GET", "/v2/models/stats", None, frozenset({A, D, U})),
    "model_metadata": ("GET", "/v2/models/tabular", None, READERS),
    "model_ready": ("GET", "/v2/models/tabular/ready", None, READERS),
    "model_config": ("GET", "/v2/models/tabular/config", None, READERS),
    "model_statistics": ("GET", "/v2/models/tabular/stats", None, frozenset({A, D, U})),
    "model_infer": ("POST", "/v2/models/tabular/infer", INFER_BODY, frozenset({A, I})),
    "model_drift": ("GET", "/v2/models/tabular/drift", None, frozenset({A, D, U})),
    "model_feedback": ("POST", "/v2/models/tabular/feedback", {"labels": {"no-such-request": 1}}, frozenset({A, I})),
    "repository_index": ("POST", "/v2/repository/index", {}, READERS),
    "repository_model_load": ("POST", "/v2/repository/models/text_python/load", {}, frozenset({A, D})),
    "repository_model_unload": ("POST", "/v2/repository/models/no_such_model/unload", {}, frozenset({A, D})),
    "openapi": ("GET", "/v2/admin/openapi.json", None, READERS),
    "list_deployments": ("GET", "/v2/admin/deployments", None, frozenset({A, D, U})),
    "get_deployment": ("GET", "/v2/admin/deployments/tabular", None, frozenset({A, D, U})),
    "put_deployment": ("PUT", "/v2/admin/deployments/tabular", {"revision": -1}, frozenset({A, D})),
    "delete_deployment": ("DELETE", "/v2/admin/deployments/tabular", {"revision": 7}, frozenset({A, D})),
    "promote_deployment": ("POST", "/v2/admin/deployments/tabular/promote", {}, frozenset({A, D})),
    "rollback_deployment": ("POST", "/v2/admin/deployments/tabular/rollback", {}, frozenset({A, D})),
    "switch_deployment": ("POST", "/v2/admin/deployments/tabular/switch", {}, frozenset({A, D})),
    "release_deployment": ("POST", "/v2/admin/deployments/tabular/release", {}, frozenset({A, D})),
    "deployment_history": ("GET", "/v2/admin/deployments/tabular/history", None, frozenset({A, D, U})),
    "deployment_events": ("GET", "/v2/admin/deployments/tabular/events", None, frozenset({A, D, U})),
    "list_keys": ("GET", "/v2/admin/keys", None, frozenset({A})),
    "create_key": ("POST", "/v2/admin/keys", {"name": "made-in-matrix", "roles": ["invoker"]}, frozenset({A})),
    "revoke_key": ("DELETE", "/v2/admin/keys/000000000000", None, frozenset({A})),
    "rotate_key": ("POST", "/v2/admin/keys/000000000000/rotate", {}, frozenset({A})),
    "read_audit": ("GET", "/v2/admin/audit?kind=denial", None, frozenset({A, U})),
    "verify_audit": ("GET", "/v2/admin/audit/verify", None, frozenset({A, U})),
    "v1_server_live": ("GET", "/", None, None),
    "v1_list_models": ("GET", "/v1/models", None, READERS),
    "v1_model_status": ("GET", "/v1/models/tabular", None, READERS),
    "v1_model_metadata": ("GET", "/v1/models/tabular/metadata", None, READERS),
    "v1_model_predict": ("POST", "/v1/models/tabular:predict", {"instances": [ROW.tolist()]}, frozenset({A, I})),
    "v1_model_classify": ("POST", "/v1/models/tabular:classify", {"examples": [{"input": ROW.tolist()}]},
                          frozenset({A, I})),
    "v1_model_regress": ("POST", "/v1/models/tabular:regress", {"examples": [{"input": ROW.tolist()}]},
                         frozenset({A, I})),
    "v1_model_explain": ("POST", "/v1/models/tabular:explain", {"instances": [ROW.tolist()]}, frozenset({A, I})),
    "torchserve_ping": ("GET", "/ping", None, None),
    "torchserve_model_predictions": ("POST", "/predictions/tabular", ROW.tolist(), frozenset({A, I})),
    "torchserve_model_put_predictions": ("PUT", "/predictions/tabular", ROW.tolist(), frozenset({A, I})),
}  # fmt: skip

#: every RPC of GRPCInferenceService and the roles that may call it (None: open to anyone)
GRPC_MATRIX: dict[str, frozenset[str] | None] = {
    "ServerLive": None,
    "ServerReady": None,
    "ModelReady": READERS,
    "ServerMetadata": READERS,
    "ModelMetadata": READERS,
    "ModelConfig": READERS,
    "ModelStatistics": frozenset({A, D, U}),
    "RepositoryIndex": READERS,
    "RepositoryModelLoad": frozenset({A, D}),
    "RepositoryModelUnload": frozenset({A, D}),
    "ModelInfer": frozenset({A, I}),
    "ModelStreamInfer": frozenset({A, I}),
}

PII = {
    "email": "layla.haddad@example.ae",
    "phone": "+971 50 123 4567",
    "emirates_id": "784-1987-1234567-1",
    "iban": "AE070331234567890123456",
    "card": "4111 1111 1111 1111",
}

PII_MODEL = '''"""Echoes its text upper-cased, and logs it, as careless model code does."""

import logging

import numpy as np

log = logging.getLogger("pii_echo")


class Echo:
    def load(self):
        pass

    def predict(self, inputs):
        texts = [t.decode() if isinstance(t, bytes) else str(t) for t in inputs["text"].reshape(-1)]
        for text in texts:
            log.info("scoring customer note: %s", text)
        upper = np.empty(len(texts), dtype=np.object_)
        upper[:] = [t.upper().encode() for t in texts]
        return {"upper": upper.reshape(inputs["text"].shape)}
'''


# -- the server ---------------------------------------------------------------------------------------


def _write_model(repository: Path, name: str, manifest: str, code: str) -> None:
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    (folder / "model.yaml").write_text(manifest, encoding="utf-8")
    (folder / "1" / "model.py").write_text(code, encoding="utf-8")


@pytest.fixture(scope="module")
def world(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("security")
    repository = root / "models"
    for name in ("tabular", "text_python", "flags"):
        shutil.copytree(demo_repository / name, repository / name)
    manifest = (repository / "flags" / "model.yaml").read_text(encoding="utf-8")
    (repository / "flags" / "model.yaml").write_text(manifest + "\ntenant: acme\n", encoding="utf-8")
    _write_model(
        repository,
        "pii_echo",
        "runtime: python\nmax_batch_size: 4\npayload_sample_rate: 1\n"
        "pii: {action: redact, fields: {text: hash}}\n"
        "inputs: [{name: text, datatype: BYTES, shape: [-1, 1]}]\n"
        "outputs: [{name: upper, datatype: BYTES, shape: [-1, 1]}]\n",
        PII_MODEL,
    )
    policy = root / "residency.yaml"
    policy.write_text("regions:\n  ae: [ae]\n  eu: [eu]\nunspecified: allow\n", encoding="utf-8")
    data = root / "data"
    store = AccessStore.open(f"sqlite:///{data / 'registry.sqlite3'}")
    keys: dict[str, str] = {}
    for role in ROLES:
        # the admin and the auditor (a compliance officer) span every tenant
        made = store.create_key(
            role, tenant="*" if role in ("admin", "auditor") else "default", roles=[role], actor="test"
        )
        assert made is not None
        keys[role] = made[1]
    for name, tenant, roles, region in (
        ("scoped", "default", ["invoker:tab*"], ""),
        ("acme", "acme", ["invoker"], ""),
        ("acme-auditor", "acme", ["auditor"], ""),
        ("acme-admin", "acme", ["admin"], ""),
        ("eu-client", "default", ["invoker"], "eu"),
    ):
        made = store.create_key(name, tenant=tenant, roles=roles, actor="test", region=region)
        assert made is not None
        keys[name] = made[1]
    store.close()
    eu_store = root / "eu-audit.sqlite3"
    server = start_dhow(
        repository,
        root,
        "--auth", "on",
        "--model-control", "explicit",
        "--load-model", "*",
        "--region", "ae",
        "--residency-policy", str(policy),
        "--audit-region-store", f"eu=sqlite:///{eu_store}",
        "--registry-poll", "0.3",
    )  # fmt: skip
    yield {"server": server, "keys": keys, "data": data, "eu_store": eu_store, "repository": repository}
    assert server.stop() == 0, server.log()


def call(
    server: DhowProcess, method: str, path: str, body: Any = None, key: str | None = None, **headers: str
) -> tuple[int, dict[str, str], Any]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        if key is not None:
            sent["authorization"] = f"Bearer {key}"
        payload = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=payload, headers=sent)
        answer = connection.getresponse()
        raw = answer.read()
        text = raw.decode("utf-8", "replace")
        try:
            document = json.loads(raw) if raw.strip() else None
        except ValueError:
            document = text
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, document
    finally:
        connection.close()


def dhow_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dhow.cli", *args], capture_output=True, text=True, timeout=60)


def _eventually(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


# -- every route is mapped, and the matrix covers every route ------------------------------------------


def test_every_rest_route_and_grpc_method_has_a_permission() -> None:
    catalog = set(ACTIONS.values())
    assert all(route.access is None or route.access in catalog for route in ROUTES)
    rpcs = {m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    assert set(GRPC_ACCESS) == rpcs, "an RPC without an access mapping"
    assert all(access is None or access in catalog for access in GRPC_ACCESS.values())
    # only the health checks are open (v2's, KServe v1's GET / and TorchServe's GET /ping)
    open_routes = {"server_live", "server_ready", "v1_server_live", "torchserve_ping"}
    assert {route.name for route in ROUTES if route.access is None} == open_routes
    assert {m for m, a in GRPC_ACCESS.items() if a is None} == {"ServerLive", "ServerReady"}
    assert set(REST_MATRIX) == {route.name for route in ROUTES} and set(GRPC_MATRIX) == rpcs


# -- the role x route matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize("route", list(REST_MATRIX))
def test_rest_role_matrix(world: dict[str, Any], route: str) -> None:
    server, keys = world["server"], world["keys"]
    method, path, body, allowed = REST_MATRIX[route]
    status, _, answer = call(server, method, path, body)
    if allowed is None:
        assert status == 200, answer
    else:
        assert status == 401, answer
        assert "credentials" in answer["error"]
    for role in ROLES:
        status, _, answer = call(server, method, path, body, keys[role])
        if allowed is None or role in allowed:
            assert status not in (401, 403), f"{role} refused {method} {path}: {answer}"
        else:
            assert status == 403, f"{role} allowed {method} {path}: {status} {answer}"
            assert f"key:{role}#" in answer["error"] and "lacks permission" in answer["error"]
    _, _, answer = call(server, method, path, body, "dhow_000000000000_not-a-real-secret")
    if allowed is not None:
        assert answer["error"] == "the API key is not valid (unknown, revoked or mistyped)"


def _grpc_request(name: str) -> Any:
    infer = pb.ModelInferRequest(
        model_name="tabular",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 32])],
        raw_input_contents=[ROW.tobytes()],
    )
    return {
        "ServerLive": pb.ServerLiveRequest(),
        "ServerReady": pb.ServerReadyRequest(),
        "ModelReady": pb.ModelReadyRequest(name="tabular"),
        "ServerMetadata": pb.ServerMetadataRequest(),
        "ModelMetadata": pb.ModelMetadataRequest(name="tabular"),
        "ModelConfig": pb.ModelConfigRequest(name="tabular"),
        "ModelStatistics": pb.ModelStatisticsRequest(name="tabular"),
        "RepositoryIndex": pb.RepositoryIndexRequest(),
        "RepositoryModelLoad": pb.RepositoryModelLoadRequest(model_name="text_python"),
        "RepositoryModelUnload": pb.RepositoryModelUnloadRequest(model_name="no_such_model"),
        "ModelInfer": infer,
        "ModelStreamInfer": infer,
    }[name]


def _grpc_call(server: DhowProcess, name: str, key: str | None) -> tuple[grpc.StatusCode, str]:
    metadata = [("authorization", f"Bearer {key}")] if key else []
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            if name == "ModelStreamInfer":
                answers = list(stub.ModelStreamInfer(iter([_grpc_request(name)]), metadata=metadata, timeout=20))
                message = answers[0].error_message
                # a refused request of an open stream is answered in the stream, as Triton does
                return (
                    grpc.StatusCode.PERMISSION_DENIED if "lacks permission" in message else grpc.StatusCode.OK
                ), message
            getattr(stub, name)(_grpc_request(name), metadata=metadata, timeout=20)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("rpc", list(GRPC_MATRIX))
def test_grpc_role_matrix(world: dict[str, Any], rpc: str) -> None:
    server, keys = world["server"], world["keys"]
    allowed = GRPC_MATRIX[rpc]
    code, details = _grpc_call(server, rpc, None)
    assert code == (grpc.StatusCode.OK if allowed is None else grpc.StatusCode.UNAUTHENTICATED), details
    for role in ROLES:
        code, details = _grpc_call(server, rpc, keys[role])
        if allowed is None or role in allowed:
            assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), (role, details)
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, (role, code, details)


def test_refusals_are_audited(world: dict[str, Any]) -> None:
    server, keys = world["server"], world["keys"]
    call(server, "GET", "/v2/models/tabular/config")  # no credential
    call(server, "POST", "/v2/models/tabular/infer", INFER_BODY, keys["auditor"])

    def denials() -> list[dict[str, Any]]:
        status, _, answer = call(server, "GET", "/v2/admin/audit?kind=denial&limit=10000", None, keys["auditor"])
        assert status == 200, answer
        return list(answer["records"])

    records = _eventually(lambda: [r for r in denials() if r["actor"].startswith("key:auditor#")])
    assert any(r["action"] == "infer" and r["outcome"] == "PERMISSION_DENIED" for r in records)
    anonymous = [r for r in denials() if r["actor"] == "unauthenticated"]
    assert any(r["outcome"] == "UNAUTHENTICATED" and r["action"] == "model.config" for r in anonymous)
    # and counted, for dashboards and alerts
    _, _, metrics = call(server, "GET", "/metrics", None, keys["auditor"])
    counts = dict(re.findall(r'dhow_access_refusals_total\{code="(\w+)"\} (\S+)', metrics))
    assert float(counts["UNAUTHENTICATED"]) >= 1 and float(counts["PERMISSION_DENIED"]) >= 1


def test_the_access_log_and_the_audit_record_share_the_request_id(world: dict[str, Any]) -> None:
    server, keys = world["server"], world["keys"]
    assert (
        call(server, "POST", "/v2/models/tabular/infer", INFER_BODY, keys["invoker"], x_request_id="trace-77")[0] == 200
    )
    assert call(server, "POST", "/v2/models/tabular/infer", INFER_BODY, keys["invoker"])[0] == 200

    def logged() -> list[str]:
        pattern = r"POST /v2/models/tabular/infer 200 \S+ principal=key:invoker#\S+ request_id=(\S+)"
        return re.findall(pattern, server.log())

    ids = _eventually(lambda: (found := logged()) and "trace-77" in found and found[-1] != "trace-77" and found)
    made = ids[-1]  # the one the server made for the request without an x-request-id
    assert re.fullmatch(r"[0-9a-f]{16}", made)

    def audited() -> set[str]:
        status, _, answer = call(server, "GET", "/v2/admin/audit?kind=inference&limit=10000", None, keys["auditor"])
        assert status == 200, answer
        return {r["request_id"] for r in answer["records"]}

    assert _eventually(lambda: {"trace-77", made} <= audited())


def test_concurrent_inferences_are_each_audited_and_logged_with_their_answer(world: dict[str, Any]) -> None:
    """With others in flight, an inference's record leaves with theirs and its answer is sent from that departure
    (``held_answers.py``): every answer still comes, and each request is in the access log and the audit trail."""
    server, keys = world["server"], world["keys"]
    ids = [f"held-{n}" for n in range(48)]

    def infer(request_id: str) -> tuple[int, dict[str, str], Any]:
        return call(server, "POST", "/v2/models/tabular/infer", INFER_BODY, keys["invoker"], x_request_id=request_id)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(infer, ids))
    assert [status for status, _, _ in answers] == [200] * len(ids)
    assert all(len(document["outputs"][0]["data"]) > 0 for _, _, document in answers)

    def logged() -> set[str]:
        pattern = r"POST /v2/models/tabular/infer 200 \S+ principal=key:invoker\S* request_id=(held-\d+)"
        return set(re.findall(pattern, server.log()))

    def audited() -> set[str]:
        status, _, answer = call(server, "GET", "/v2/admin/audit?kind=inference&limit=10000", None, keys["auditor"])
        assert status == 200, answer
        return {r["request_id"] for r in answer["records"] if r["request_id"].startswith("held-")}

    assert _eventually(lambda: logged() == set(ids)), sorted(set(ids) - logged())
    assert _eventually(lambda: audited() == set(ids)), sorted(set(ids) - audited())


# -- scopes and tenants --------------------------------------------------------------------------------


def _text_body(text: str) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [text]}]}


def test_a_scoped_key_reaches_only_its_models(world: dict[str, Any]) -> None:
    server, keys = world["server"], world["keys"]
    assert call(server, "POST", "/v2/models/tabular/infer", INFER_BODY, keys["scoped"])[0] == 200
    status, _, answer = call(server, "POST", "/v2/models/text_python/infer", _text_body("hi"), keys["scoped"])
    assert status == 403 and "lacks permission 'infer' on model 'text_python'" in answer["error"]
    # reads of what the scope allows work: the server's metadata, and the index showing only its models
    # (over gRPC too); what is not filtered by model (metrics, the audit trail) still needs an unscoped grant
    assert call(server, "GET", "/v2", None, keys["scoped"])[0] == 200
    status, _, index = call(server, "POST", "/v2/repository/index", {}, keys["scoped"])
    assert status == 200 and index and all(row["name"].startswith("tab") for row in index), index
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = (("authorization", f"Bearer {keys['scoped']}"),)
        rows = stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=metadata, timeout=10).models
        assert {row.name for row in rows} == {row["name"] for row in index}
        assert stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=metadata, timeout=10).name == "dhow"
    assert call(server, "GET", "/metrics", None, keys["scoped"])[0] == 403


def test_tenants_do_not_reach_each_others_models(world: dict[str, Any]) -> None:
    server, keys = world["server"], world["keys"]
    flags = FLAGS_BODY
    assert call(server, "POST", "/v2/models/flags/infer", flags, keys["acme"])[0] == 200
    # another tenant's model answers as a missing one does: its name is not revealed (the refusal is audited)
    missing = call(server, "POST", "/v2/models/no-such-model/infer", flags, keys["invoker"])
    status, _, answer = call(server, "POST", "/v2/models/flags/infer", flags, keys["invoker"])
    assert (status, answer["error"]) == (404, missing[2]["error"].replace("no-such-model", "flags"))
    status, _, answer = call(server, "POST", "/v2/models/tabular/infer", INFER_BODY, keys["acme"])
    assert status == 404 and "unknown model 'tabular'" in answer["error"] and "default" not in answer["error"]
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = (("authorization", f"Bearer {keys['invoker']}"),)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="flags"), metadata=metadata, timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert call(server, "POST", "/v2/models/flags/infer", flags, keys["admin"])[0] == 200
    # lists of models show each tenant its own
    index = {
        role: call(server, "POST", "/v2/repository/index", {}, keys[role])[2] for role in ("admin", "invoker", "acme")
    }
    names = {role: {row["name"] for row in rows} for role, rows in index.items()}
    assert names["acme"] == {"flags"} and "flags" not in names["invoker"] and "tabular" in names["invoker"]
    assert names["admin"] >= {"flags", "tabular", "text_python", "pii_echo"}
    _, _, stats = call(server, "GET", "/v2/models/stats", None, keys["acme-auditor"])
    assert {row["name"] for row in stats["model_stats"]} == {"flags"}

    # and an auditor of a tenant reads that tenant's records only: its model's, whoever made them
    def acme_records() -> list[dict[str, Any]]:
        _, _, audit = call(server, "GET", "/v2/admin/audit?limit=10000", None, keys["acme-auditor"])
        return list(audit["records"])

    records = _eventually(lambda: len({r["actor"].split("#")[0] for r in acme_records()}) >= 3 and acme_records())
    assert {r["tenant"] for r in records} == {"acme"}
    # the acme invoker's inference, the admin's, and the default-tenant invoker's refusal
    assert {r["actor"].split("#")[0] for r in records} == {"key:acme", "key:admin", "key:invoker"}


def test_a_tenant_auditor_verifies_the_chain_but_counts_only_its_tenant(world: dict[str, Any]) -> None:
    server, keys = world["server"], world["keys"]
    flags = FLAGS_BODY
    assert call(server, "POST", "/v2/models/flags/infer", flags, keys["acme"])[0] == 200  # an acme record
    assert call(server, "POST", "/v2/models/tabular/infer", INFER_BODY, keys["invoker"])[0] == 200  # a default one

    def verified(key: str) -> dict[str, Any]:
        return dict(call(server, "GET", "/v2/admin/audit/verify", None, keys[key])[2])

    # read in the order the chain grows (records, then the tenant's count, then the whole): the audit writer
    # may append between two reads, which must only make a later figure larger
    _, _, acme = call(server, "GET", "/v2/admin/audit?limit=10000", None, keys["acme-auditor"])
    mine = _eventually(lambda: (found := verified("acme-auditor"))["count"] >= max(1, len(acme["records"])) and found)
    whole = verified("auditor")
    assert whole["ok"] and mine["ok"] and mine["problems"] == []
    assert mine["count"] >= len(acme["records"]) and mine["count"] < whole["count"], (mine, whole)
    assert mine["head_seq"] <= whole["head_seq"]


# -- keys: the admin API and the CLI -------------------------------------------------------------------


def test_keys_made_rotated_and_revoked_through_the_admin_api(world: dict[str, Any]) -> None:
    server, keys = world["server"], world["keys"]
    status, _, made = call(server, "POST", "/v2/admin/keys", {"name": "batch-job", "roles": ["invoker"]}, keys["admin"])
    assert status == 200 and made["key"].startswith(f"dhow_{made['id']}_")
    # made by an admin of every tenant without naming one: the default tenant's, as `dhow keys create` makes it,
    # never every tenant's by omission
    assert made["tenant"] == "default"
    assert call(server, "POST", "/v2/models/tabular/infer", INFER_BODY, made["key"])[0] == 200
    assert call(server, "POST", "/v2/models/flags/infer", FLAGS_BODY, made["key"])[0] == 404  # acme's model
    status, _, every = call(server, "POST", "/v2/admin/keys", {"name": "ops", "roles": ["invoker"], "tenant": "*"},
                            keys["admin"])  # fmt: skip
    assert status == 200 and every["tenant"] == "*", every
    assert call(server, "DELETE", f"/v2/admin/keys/{every['id']}", None, keys["admin"])[0] == 200
    # an admin of one tenant makes its own tenant's keys by default, and no other's
    status, _, own = call(server, "POST", "/v2/admin/keys", {"name": "acme-job", "roles": ["invoker"]},
                          keys["acme-admin"])  # fmt: skip
    assert status == 200 and own["tenant"] == "acme", own
    assert call(server, "DELETE", f"/v2/admin/keys/{own['id']}", None, keys["acme-admin"])[0] == 200
    for other in ("*", "default"):
        status, _, refused = call(server, "POST", "/v2/admin/keys", {"name": "x", "roles": ["invoker"],
                                  "tenant": other}, keys["acme-admin"])  # fmt: skip
        assert status == 403, (other, refused)
    # the list never shows secrets or hashes
    _, _, listing = call(server, "GET", "/v2/admin/keys", None, keys["admin"])
    assert made["key"] not in json.dumps(listing) and "secret_hash" not in json.dumps(listing)
    status, _, rotated = call(server, "POST", f"/v2/admin/keys/{made['id']}/rotate", {"grace_s": 0}, keys["admin"])
    assert status == 200 and rotated["replaces"] == made["id"]
    assert call(server, "POST", "/v2/models/tabular/infer", INFER_BODY, made["key"])[0] == 401
    assert call(server, "POST", "/v2/models/tabular/infer", INFER_BODY, rotated["key"])[0] == 200
    assert call(server, "DELETE", f"/v2/admin/keys/{rotated['id']}", None, keys["admin"])[0] == 200
    assert call(server, "POST", "/v2/models/tabular/infer", INFER_BODY, rotated["key"])[0] == 401
    # bad bodies are refused with the reason
    status, _, answer = call(server, "POST", "/v2/admin/keys", {"name": "x", "roles": ["wizard"]}, keys["admin"])
    assert status == 400 and "unknown role 'wizard'" in answer["error"]
    # the changes are in the audit trail, by the admin key
    _, _, audit = call(server, "GET", "/v2/admin/audit?kind=admin&limit=10000", None, keys["auditor"])
    actions = {(r["action"], r["details"].get("key")) for r in audit["records"] if r["actor"].startswith("key:admin#")}
    assert {("key.create", made["id"]), ("key.rotate", made["id"]), ("key.revoke", rotated["id"])} <= actions


def test_keys_made_and_revoked_with_the_cli_reach_the_running_server(world: dict[str, Any]) -> None:
    server, data = world["server"], world["data"]
    made = dhow_cli("keys", "create", "cli-bot", "--role", "invoker", "--data-dir", str(data))
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    key_id = token.split("_")[1]
    assert _eventually(lambda: call(server, "POST", "/v2/models/tabular/infer", INFER_BODY, token)[0] == 200)
    listing = dhow_cli("keys", "list", "--data-dir", str(data))
    assert key_id in listing.stdout and token not in listing.stdout
    revoked = dhow_cli("keys", "revoke", key_id, "--data-dir", str(data))
    assert revoked.returncode == 0, revoked.stderr
    assert _eventually(lambda: call(server, "POST", "/v2/models/tabular/infer", INFER_BODY, token)[0] == 401)
    bad = dhow_cli("keys", "create", "x", "--role", "wizard", "--data-dir", str(data))
    assert bad.returncode == 2 and "unknown role 'wizard'" in bad.stderr


# -- data residency ------------------------------------------------------------------------------------


def test_cross_region_requests_are_refused_and_audited_in_their_region(world: dict[str, Any]) -> None:
    server, keys = world["server"], world["keys"]
    status, _, answer = call(
        server, "POST", "/v2/models/tabular/infer", INFER_BODY, keys["invoker"], x_dhow_data_region="eu"
    )
    assert status == 403
    assert answer["error"] == (
        "data of region 'eu' may not be processed in region 'ae' (this server); it may be processed in: eu"
    )
    body = {**INFER_BODY, "parameters": {"data_region": "ae"}}
    assert call(server, "POST", "/v2/models/tabular/infer", body, keys["invoker"])[0] == 200
    # a key whose data belongs to the EU is refused here without saying so on each request
    status, _, answer = call(server, "POST", "/v2/models/tabular/infer", INFER_BODY, keys["eu-client"])
    assert status == 403 and "region 'eu'" in answer["error"]
    # the refusals are recorded in the EU's store, and not in this server's own
    eu = AuditStore.open(f"sqlite:///{world['eu_store']}")
    ae = AuditStore.open(f"sqlite:///{world['data'] / 'audit.sqlite3'}")
    try:
        both = {"key:invoker", "key:eu-client"}  # each written when the writer gets to it: wait for both
        refused = _eventually(
            lambda: (
                (found := eu.read(limit=10_000, outcome="PERMISSION_DENIED"))
                and {r["actor"].split("#")[0] for r in found} >= both
                and found
            )
        )
        assert {r["actor"].split("#")[0] for r in refused} == both
        assert all(r["region"] == "eu" for r in refused)
        assert not [r for r in ae.read(limit=10_000) if r["region"] == "eu"]
        assert eu.verify().ok
    finally:
        eu.close()
        ae.close()


# -- PII ----------------------------------------------------------------------------------------------


def test_pii_never_reaches_the_log_or_the_audit_trail(world: dict[str, Any]) -> None:
    server, keys, data = world["server"], world["keys"], world["data"]
    note = "call {phone} or mail {email}; id {emirates_id}; pay {iban}; card {card}".format(**PII)
    status, _, answer = call(server, "POST", "/v2/models/pii_echo/infer", _text_body(note), keys["invoker"])
    assert status == 200, answer
    assert PII["email"].upper() in answer["outputs"][0]["data"][0]  # the client gets its answer, unmasked
    assert _eventually(lambda: "scoring customer note" in server.log())
    log = server.log()
    for kind, value in PII.items():
        assert value not in log, f"{kind} in the server log"
    assert "[REDACTED:email]" in log and "[REDACTED:iban]" in log
    # the audit record has the payload sample, hashed by the model's field rule
    exported = dhow_cli("audit", "export", "--data-dir", str(data))
    assert exported.returncode == 0, exported.stderr
    for kind, value in PII.items():
        assert value not in exported.stdout and value.upper() not in exported.stdout, f"{kind} in the audit trail"
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    sampled = [r for r in records if r["model"] == "pii_echo" and r["kind"] == "inference"]
    assert sampled and re.fullmatch(r"hash:[0-9a-f]{16}", sampled[-1]["details"]["payload"]["inputs"]["text"][0][0])


# -- the audit trail is tamper-evident (last: it edits the trail) --------------------------------------


def test_an_audit_record_edited_by_hand_is_caught(world: dict[str, Any]) -> None:
    data = world["data"]
    verified = dhow_cli("audit", "verify", "--data-dir", str(data))
    assert verified.returncode == 0 and "audit trail ok" in verified.stdout, verified.stdout + verified.stderr
    with sqlite3.connect(data / "audit.sqlite3") as connection:
        # record 3's line in the block that holds it, its actor changed (the hashes left as they are)
        first, records = connection.execute(
            "SELECT first_seq, records FROM dhow_audit_blocks WHERE first_seq <= 3 AND last_seq >= 3"
        ).fetchone()
        lines = records.split("\n")
        record = json.loads(lines[3 - first])
        record["actor"] = "key:someone-else"
        lines[3 - first] = json.dumps(record, sort_keys=True, separators=(",", ":"))
        connection.execute("UPDATE dhow_audit_blocks SET records = ? WHERE first_seq = ?", ("\n".join(lines), first))
    broken = dhow_cli("audit", "verify", "--data-dir", str(data))
    assert broken.returncode == 1
    assert "record 3 was edited" in broken.stdout + broken.stderr


# -- secure by default ---------------------------------------------------------------------------------


def test_the_first_start_prints_one_admin_key_once(demo_repository: Path, tmp_path: Path) -> None:
    repository = tmp_path / "models"
    shutil.copytree(demo_repository / "tabular", repository / "tabular")
    first = start_dhow(repository, tmp_path, "--auth", "on")
    try:
        keys = re.findall(r"dhow_[0-9a-f]{12}_[A-Za-z0-9_-]+", first.log())
        assert len(keys) == 1
        assert call(first, "POST", "/v2/models/tabular/infer", INFER_BODY)[0] == 401
        assert call(first, "POST", "/v2/models/tabular/infer", INFER_BODY, keys[0])[0] == 200
    finally:
        assert first.stop() == 0
    second = start_dhow(repository, tmp_path, "--auth", "on")
    try:
        assert not re.findall(r"dhow_[0-9a-f]{12}_", second.log())
        assert call(second, "GET", "/v2/models/tabular", None, keys[0])[0] == 200
    finally:
        assert second.stop() == 0


def test_auth_none_says_so_loudly(demo_repository: Path, tmp_path: Path) -> None:
    repository = tmp_path / "models"
    shutil.copytree(demo_repository / "tabular", repository / "tabular")
    server = start_dhow(repository, tmp_path, "--auth", "none")
    try:
        assert call(server, "POST", "/v2/models/tabular/infer", INFER_BODY)[0] == 200
        assert "AUTHENTICATION IS OFF" in server.log()
    finally:
        assert server.stop() == 0


def test_changes_the_repository_poller_makes_are_audited(demo_repository: Path, tmp_path: Path) -> None:
    repository = tmp_path / "models"
    shutil.copytree(demo_repository / "tabular", repository / "tabular")
    server = start_dhow(repository, tmp_path, "--model-control", "poll", "--poll-interval", "0.2")
    try:
        shutil.copytree(demo_repository / "text_python", repository / "text_python")
        assert _eventually(lambda: call(server, "GET", "/v2/models/text_python/ready")[0] == 200)
        shutil.rmtree(repository / "tabular")
        assert _eventually(lambda: call(server, "GET", "/v2/models/tabular/ready")[0] == 404)
    finally:
        assert server.stop() == 0
    exported = dhow_cli("audit", "export", "--data-dir", str(tmp_path / "data"))
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    polled = {(r["action"], r["model"]) for r in records if r["actor"] == "dhow:repository-poll"}
    assert {("model.load", "text_python"), ("model.unload", "tabular")} <= polled
