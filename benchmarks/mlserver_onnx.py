"""An ONNX Runtime model for Seldon MLServer, which ships none: the peer's side of the serving benchmark.

Written the way MLServer's own runtimes are (``mlserver_sklearn.SKLearnModel``): load the artifact named
by ``parameters.uri`` in ``load``, decode the inputs with the numpy codec, run, encode each output.
``model-settings.json`` selects it with ``"implementation": "mlserver_onnx.OnnxModel"`` (this folder on
``PYTHONPATH``); ``parameters.extra.intra_op_threads`` sizes ONNX Runtime's thread pool (0 = its default).

This file runs inside MLServer's virtualenv (``benchmarks/.peers/mlserver-venv``), not dhow's.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri
from mlserver_batches import count_batch


class OnnxModel(MLModel):
    """One ONNX Runtime session on the CPU; every graph output is returned."""

    async def load(self) -> bool:
        uri = await get_model_uri(self._settings, wellknown_filenames=["model.onnx"])
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(extra.get("intra_op_threads", 0))
        # one operator at a time, as dhow configures its sessions: the graphs here are chains
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self._input_names = {tensor.name for tensor in self._session.get_inputs()}
        self._output_names = [tensor.name for tensor in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        count_batch(payload)  # the batch sizes MLServer does not report (mlserver_batches.py)
        feeds: dict[str, np.ndarray] = {}
        for request_input in payload.inputs:
            if request_input.name not in self._input_names:
                raise InferenceError(
                    f"unknown input {request_input.name!r}; the model takes {sorted(self._input_names)}"
                )
            feeds[request_input.name] = self.decode(request_input, default_codec=NumpyCodec)
        results = self._session.run(self._output_names, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name, result) for name, result in zip(self._output_names, results, strict=True)
            ],
        )
