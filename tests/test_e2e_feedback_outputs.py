"""A prediction is kept for feedback whichever outputs the client asked for (README, "Feedback and the quality
guard"): a request for some outputs only, or for an output as classes, still has its feedback output computed
and kept as the model answered it, while its answer holds only what it asked for — over REST and gRPC."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc

from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.protocols.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import DhowProcess, http_request, start_dhow, write_model

# a python model computes what it is asked for: `predict` answers every output, the runtime keeps the asked ones
MODEL = """
import numpy as np

class Cut:
    def load(self):
        pass

    def predict(self, inputs):
        x = inputs["x"][:, 0]
        return {"label": (x > 0).astype(np.int64), "score": np.full((len(x), 1), 0.75, np.float32)}
"""
OUTPUTS = {
    "label": "{name: label, datatype: INT64, shape: [-1]}",
    "score": "{name: score, datatype: FP32, shape: [-1, 1]}",
}


def _manifest(order: list[str], feedback: str) -> str:
    return (
        "runtime: python\nmax_batch_size: 8\ninputs: [{name: x, datatype: FP32, shape: [-1, 1]}]\n"
        f"outputs: [{', '.join(OUTPUTS[name] for name in order)}]\nmonitoring: {{feedback: {feedback}}}\n"
    )


def _post(server: DhowProcess, path: str, body: Any) -> Any:
    status, answer = http_request(server.http_port, "POST", path, json.dumps(body).encode())
    result = json.loads(answer)
    assert status == 200, result
    return result


def _infer(server: DhowProcess, model: str, request_id: str, x: float, outputs: list[dict[str, Any]]) -> Any:
    row = {"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [x]}
    return _post(server, f"/v2/models/{model}/infer", {"id": request_id, "inputs": [row], "outputs": outputs})


def _grpc_infer(server: DhowProcess, model: str, request_id: str, x: float, output: str) -> list[str]:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 1])
    tensor.contents.fp32_contents.append(x)
    asked = [pb.ModelInferRequest.InferRequestedOutputTensor(name=output)]
    request = pb.ModelInferRequest(model_name=model, id=request_id, inputs=[tensor], outputs=asked)
    with grpc.insecure_channel(server.grpc_url) as channel:
        answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    return [output.name for output in answer.outputs]


def test_the_feedback_output_is_kept_whichever_outputs_the_client_asked_for(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    # `named` names its feedback output, declared second; `defaulted` takes its first output, `label`
    write_model(repository, "named", _manifest(["score", "label"], "{task: classification, output: label}"),
                {"1/model.py": MODEL})  # fmt: skip
    write_model(repository, "defaulted", _manifest(["label", "score"], "{task: classification}"),
                {"1/model.py": MODEL})  # fmt: skip
    server = start_dhow(repository, tmp_path)
    try:
        for model in ("named", "defaulted"):
            score_only = _infer(server, model, "score-only", 1.0, [{"name": "score"}])
            assert [o["name"] for o in score_only["outputs"]] == ["score"], score_only  # only what it asked for
            as_classes = [{"name": "label", "parameters": {"classification": 1}}]
            classes = _infer(server, model, "as-classes", -1.0, as_classes)
            assert [o["datatype"] for o in classes["outputs"]] == ["BYTES"], classes
            _infer(server, model, "every-output", 1.0, [])
            assert _grpc_infer(server, model, "grpc-score-only", -1.0, "score") == ["score"]
            labels = {"score-only": 1, "as-classes": 0, "every-output": 1, "grpc-score-only": 0}
            joined = _post(server, f"/v2/models/{model}/feedback", {"labels": labels})
            # each prediction is the label output's, as the model answered it: an integer class, all four right
            assert joined["joined"] == 4 and joined["rejected"] == {} and joined["unmatched"] == 0, (model, joined)
            assert joined["quality"]["1"]["accuracy"] == 1.0, (model, joined)
    finally:
        assert server.stop() == 0, server.log()
