"""One id per request, the same everywhere (``dhow.core.ids``; README, "Payload logging"): the x-request-id header
(gRPC: metadata) when sent, else the request's own id, else one the server makes; the access log, the audit
trail, the payload log and the feedback join all say it, over REST and gRPC alike; a gRPC stream's messages each
have their own."""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path
from typing import Any

import grpc
import pytest

from dhow.governance.audit import AuditStore
from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.protocols.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import DhowProcess, make_key, start_dhow, wait_until

MODEL = """
import numpy as np

class Sign:
    def load(self):
        pass

    def predict(self, inputs):
        return {"label": (inputs["x"][:, 0] > 0).astype(np.int64)}
"""
MANIFEST = (
    "runtime: python\nmax_batch_size: 8\n"
    "inputs: [{name: x, datatype: FP32, shape: [-1, 1]}]\noutputs: [{name: label, datatype: INT64, shape: [-1]}]\n"
    "monitoring: {feedback: {task: classification}}\n"
)
ROW = {"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}


def _post(server: DhowProcess, key: str, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        sent = {"content-type": "application/json", "authorization": f"Bearer {key}", **(headers or {})}
        connection.request("POST", path, body=json.dumps(body), headers=sent)
        answer = connection.getresponse()
        result = json.loads(answer.read())
        assert answer.status == 200, result
        return result
    finally:
        connection.close()


def _repository(root: Path, manifest: str = MANIFEST) -> Path:
    repository = root / "models"
    (repository / "sign" / "1").mkdir(parents=True)
    (repository / "sign" / "1" / "model.py").write_text(MODEL)
    (repository / "sign" / "model.yaml").write_text(manifest)
    return repository


def _grpc_infer(server: DhowProcess, key: str, request_id: str, *metadata: tuple[str, str]) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 1])
    tensor.contents.fp32_contents.append(1.0)
    request = pb.ModelInferRequest(model_name="sign", id=request_id, inputs=[tensor])
    with grpc.insecure_channel(server.grpc_url) as channel:
        answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=(("authorization", f"Bearer {key}"), *metadata), timeout=30
        )
    assert answer.id == request_id  # the answer echoes the request's own id, as the protocol says


def test_the_header_else_the_body_names_a_request_everywhere(tmp_path: Path) -> None:
    repository = _repository(tmp_path)
    events_file = tmp_path / "events.jsonl"
    key = make_key(tmp_path / "data", "ids", ["invoker"])  # (inferences are audited with authentication on)
    server = start_dhow(repository, tmp_path, "--auth", "on", "--payload-log", f"file://{events_file}")
    try:
        infer = "/v2/models/sign/infer"
        assert _post(server, key, infer, {"id": "body-7", "inputs": [ROW]})["id"] == "body-7"
        assert _post(server, key, infer, {"id": "body-9", "inputs": [ROW]}, {"x-request-id": "hdr-9"})["id"] == "body-9"
        _post(server, key, infer, {"id": "no token!", "inputs": [ROW]})  # not a plain token: the server names it
        _grpc_infer(server, key, "grpc-body")
        _grpc_infer(server, key, "grpc-body-2", ("x-request-id", "grpc-hdr"))
        labels = dict.fromkeys(["body-7", "body-9", "hdr-9", "no token!", "grpc-body", "grpc-body-2", "grpc-hdr"], 1)
        joined = _post(server, key, "/v2/models/sign/feedback", {"labels": labels})
        # feedback takes the client's own id as sent, a plain token or not (the header's when both)
        assert joined["joined"] == 5 and joined["unmatched_ids"] == ["body-9", "grpc-body-2"], joined
        wait_until(lambda: len(events_file.read_text().splitlines()) == 5, what="5 payload events")
        logged = [json.loads(line)["data"]["request_id"] for line in events_file.read_text().splitlines()]
        assert logged[:2] == ["body-7", "hdr-9"] and logged[3:] == ["grpc-body", "grpc-hdr"], logged
        assert re.fullmatch(r"[0-9a-f]{16}", logged[2]), logged
        access = re.findall(r"POST /v2/models/sign/infer 200 \S+ principal=\S+ request_id=(\S+)", server.log())
        assert access == logged[:3], access
    finally:
        assert server.stop() == 0, server.log()
    store = AuditStore.open(f"sqlite:///{tmp_path / 'data' / 'audit.sqlite3'}")
    try:
        audited = [r["request_id"] for r in store.read(limit=100, kind="inference") if r["action"] == "infer"]
    finally:
        store.close()
    assert audited == logged, audited


def test_a_label_joins_by_the_id_the_client_sent_a_plain_token_or_not(tmp_path: Path) -> None:
    """The logs name a request whose id is no plain token by one the server makes, which the client never learns:
    its label still joins, by the id the client sent (up to 256 characters)."""
    key = make_key(tmp_path / "data", "ids", ["invoker"])
    server = start_dhow(_repository(tmp_path), tmp_path, "--auth", "on")
    try:
        infer = "/v2/models/sign/infer"
        sent = ["order/17", "user@x", "é1", "l" * 65, "l" * 256]
        for request_id in sent:
            _post(server, key, infer, {"id": request_id, "inputs": [ROW]})
        _post(server, key, infer, {"id": "plain-b", "inputs": [ROW]}, {"x-request-id": "order/18"})
        _post(server, key, infer, {"id": "l" * 257, "inputs": [ROW]})  # too long: named by the server's id only
        _grpc_infer(server, key, "grpc/body")
        _grpc_infer(server, key, "grpc-b", ("x-request-id", "grpc hdr"))
        labels = dict.fromkeys([*sent, "order/18", "l" * 257, "grpc/body", "grpc hdr", "plain-b", "grpc-b"], 1)
        joined = _post(server, key, "/v2/models/sign/feedback", {"labels": labels})
        assert joined["joined"] == 8 and joined["unmatched_ids"] == ["l" * 257, "plain-b", "grpc-b"], joined
    finally:
        assert server.stop() == 0, server.log()


def _grpc_stream(server: DhowProcess, key: str, ids: list[str], *metadata: tuple[str, str]) -> list[str]:
    """One ``ModelStreamInfer`` call of a message per id ("": the message names none); its answers' ids."""
    messages = []
    for request_id in ids:
        tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 1])
        tensor.contents.fp32_contents.append(1.0)
        messages.append(pb.ModelInferRequest(model_name="sign", id=request_id, inputs=[tensor]))
    with grpc.insecure_channel(server.grpc_url) as channel:
        answers = list(
            pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                iter(messages), metadata=(("authorization", f"Bearer {key}"), *metadata), timeout=30
            )
        )
    assert [answer.error_message for answer in answers] == [""] * len(ids), answers
    return [answer.infer_response.id for answer in answers]


@pytest.mark.parametrize("front", ["native", "grpcio"])
def test_each_message_of_a_grpc_stream_has_its_own_id(tmp_path: Path, front: str) -> None:
    """A stream's message is named by its own id when it is a plain token, else by the stream's (its x-request-id,
    else one the server makes) and its place in the stream: ``<stream id>.<n>``, n counting from 1. Its audit
    record, payload log event and feedback join say that id; its answer echoes the message's own id."""
    events_file = tmp_path / "events.jsonl"
    key = make_key(tmp_path / "data", "ids", ["invoker"])
    payload_log = ("--payload-log", f"file://{events_file}")
    server = start_dhow(_repository(tmp_path), tmp_path, "--auth", "on", *payload_log, "--grpc-front", front)
    try:
        sent = ["", "", "", "own-4", "order/5"]
        assert sorted(_grpc_stream(server, key, sent, ("x-request-id", "st"))) == sorted(sent)
        assert _grpc_stream(server, key, ["", ""]) == ["", ""]  # no x-request-id: the server names the stream
        labels = dict.fromkeys(["st.1", "st.2", "st.3", "own-4", "order/5", "st", "st.4", "st.5"], 1)
        joined = _post(server, key, "/v2/models/sign/feedback", {"labels": labels})
        # feedback takes a message's own id as sent, a plain token or not; else the one the logs say
        assert joined["joined"] == 5 and joined["unmatched_ids"] == ["st", "st.4", "st.5"], joined
        assert joined["replaced"] == 0 and joined["already_joined"] == 0, joined
        wait_until(lambda: len(events_file.read_text().splitlines()) == 7, what="7 payload events")
        logged = sorted(json.loads(line)["data"]["request_id"] for line in events_file.read_text().splitlines())
        assert logged[2:] == ["own-4", "st.1", "st.2", "st.3", "st.5"], logged
        made = logged[0].removesuffix(".1")
        assert re.fullmatch(r"[0-9a-f]{16}", made) and logged[1] == f"{made}.2", logged
    finally:
        assert server.stop() == 0, server.log()
    store = AuditStore.open(f"sqlite:///{tmp_path / 'data' / 'audit.sqlite3'}")
    try:
        audited = sorted(r["request_id"] for r in store.read(limit=100, kind="inference") if r["action"] == "infer")
    finally:
        store.close()
    assert audited == logged, audited


def _row(x: float) -> dict[str, Any]:
    return {**ROW, "data": [x]}


def test_a_prediction_is_kept_per_tenant_and_a_repeated_id_replaces_it_as_the_newest(tmp_path: Path) -> None:
    """A label joins the prediction of a request of its sender's tenant (another principal's of that tenant too:
    a labelling service's), never that of the same id sent by an all-tenants principal; an id sent again replaces
    its prediction, counted, as the newest: the oldest one is dropped past ``pending``."""
    manifest = MANIFEST.replace("{task: classification}", "{task: classification, pending: 2}") + "tenant: acme\n"
    data = tmp_path / "data"
    client, labeller = make_key(data, "client", ["invoker"], "acme"), make_key(data, "labeller", ["invoker"], "acme")
    admin = make_key(data, "admin", ["invoker"], "*")
    server = start_dhow(_repository(tmp_path, manifest), tmp_path, "--auth", "on")
    try:
        infer, feedback = "/v2/models/sign/infer", "/v2/models/sign/feedback"
        _post(server, client, infer, {"id": "same", "inputs": [_row(1.0)]})  # predicts 1
        _post(server, admin, infer, {"id": "same", "inputs": [_row(-1.0)]})  # predicts 0, kept apart
        labelled = _post(server, labeller, feedback, {"labels": {"same": 1}})
        assert labelled["joined"] == 1 and labelled["quality"]["1"]["accuracy"] == 1.0, labelled
        labelled = _post(server, admin, feedback, {"labels": {"same": 0}})
        assert labelled["joined"] == 1 and labelled["quality"]["1"]["accuracy"] == 1.0, labelled
        for request_id, x in [("a", -1.0), ("b", 1.0), ("a", 1.0), ("c", 1.0)]:
            _post(server, client, infer, {"id": request_id, "inputs": [_row(x)]})
        labelled = _post(server, labeller, feedback, {"labels": {"a": 1, "b": 1}})
        assert labelled["joined"] == 1 and labelled["unmatched_ids"] == ["b"], labelled  # "b" was the oldest
        assert labelled["replaced"] == 1 and labelled["dropped"] == 1, labelled
        assert labelled["quality"]["1"] == {"labels": 3, "accuracy": 1.0, "precision": 1.0, "recall": 1.0}, labelled
    finally:
        assert server.stop() == 0, server.log()


def test_a_refused_request_without_an_id_has_the_same_one_in_its_audit_record_and_its_access_log(
    tmp_path: Path,
) -> None:
    key = make_key(tmp_path / "data", "auditor", ["auditor"])  # may not infer: refused by permission, audited
    server = start_dhow(_repository(tmp_path), tmp_path, "--auth", "on")
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        try:
            headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
            connection.request("POST", "/v2/models/sign/infer", body=json.dumps({"inputs": [ROW]}), headers=headers)
            assert connection.getresponse().status == 403
        finally:
            connection.close()
        logged = r"POST /v2/models/sign/infer 403 \S+ principal=\S+ request_id=(\S+)"
        wait_until(lambda: re.search(logged, server.log()) is not None, what="the access log line")
        access = re.findall(logged, server.log())
    finally:
        assert server.stop() == 0, server.log()
    store = AuditStore.open(f"sqlite:///{tmp_path / 'data' / 'audit.sqlite3'}")
    try:
        audited = [r["request_id"] for r in store.read(limit=100) if r["action"] == "infer"]
    finally:
        store.close()
    assert len(access) == 1 and re.fullmatch(r"[0-9a-f]{16}", access[0]), access
    assert audited == access, audited
