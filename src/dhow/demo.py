"""Build the demo model repository from seeded synthetic data: no downloads, a few seconds.

One model per runtime (two for ONNX), each with a ``model.yaml`` and integer version folders.
The names are fixed: tests, docs and examples call these models by name. Files of an existing
repository at ``out`` are overwritten, other files are left alone.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml

log = logging.getLogger("dhow.demo")

FEATURES = 32
#: the fields of one model.yaml, in the order they are written
Manifest = dict[str, Any]


def build_demo_repository(out: Path, *, seed: int = 0) -> list[str]:
    """Write the demo models under ``out`` and return the names of those written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _tabular(out, seed),
        _mlp(out, seed),
        _tabular_sklearn(out, seed),
        _tabular_xgboost(out, seed),
        _tabular_lightgbm(out, seed),
        _text_python(out),
        _torch_mlp(out, seed),
        _flags(out),
    ]
    return [name for name in written if name]


def _tensor(name: str, datatype: str, *shape: int) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(shape)}


def _model_folder(out: Path, name: str, manifest: Manifest, version: int = 1) -> Path:
    """Write ``<out>/<name>/model.yaml`` and return the (created) version folder."""
    folder = out / name
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(manifest_text(manifest), encoding="utf-8")
    return folder / str(version)


def manifest_text(manifest: Manifest) -> str:
    """model.yaml as a person would write it: one line per field, one line per tensor."""
    lines: list[str] = []
    for key, value in manifest.items():
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            lines.append(f"{key}:")
            lines.extend(f"  - {_flow(item)}" for item in value)
        else:
            lines.append(f"{key}: {_flow(value)}")
    return "\n".join(lines) + "\n"


def _flow(value: object) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, allow_unicode=True, width=1_000_000)
    return text.removesuffix("\n...\n").strip()  # a scalar document ends with "..."


def _tabular_data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=2000, n_features=FEATURES, n_informative=12, random_state=seed)
    return x.astype(np.float32), y.astype(np.int64)


def _boosted_classifier(seed: int) -> Any:
    from sklearn.ensemble import GradientBoostingClassifier

    x, y = _tabular_data(seed)
    return GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=seed).fit(x, y)


def _tabular(out: Path, seed: int) -> str:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    manifest: Manifest = {
        "runtime": "onnx",
        "description": "100-tree gradient-boosted classifier on 32 synthetic features; version 2 is retrained",
        "inputs": [_tensor("input", "FP32", -1, FEATURES)],
        "outputs": [_tensor("label", "INT64", -1), _tensor("probabilities", "FP32", -1, 2)],
        "max_batch_size": 64,
        "version_policy": {"latest": 1},
    }
    for version in (1, 2):
        estimator = _boosted_classifier(seed + version - 1)
        model = convert_sklearn(
            estimator,
            initial_types=[("input", FloatTensorType([None, FEATURES]))],
            # ZipMap would turn probabilities into a list of dicts, which no tensor protocol carries
            options={id(estimator): {"zipmap": False}},
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
        _rename_outputs(model, ["label", "probabilities"])
        folder = _model_folder(out, "tabular", manifest, version)
        (folder / "model.onnx").write_bytes(model.SerializeToString())
    return "tabular"


def _rename_outputs(model: Any, names: list[str]) -> None:
    for output, new in zip(model.graph.output, names, strict=True):
        old = output.name
        for node in model.graph.node:
            for index, name in enumerate(node.output):
                if name == old:
                    node.output[index] = new
        output.name = new


def _mlp(out: Path, seed: int) -> str:
    from onnx import TensorProto, checker, helper, numpy_helper

    rng = np.random.default_rng(seed)
    sizes = [512, 2048, 2048, 2048, 10]
    nodes, weights = [], []
    current = "input"
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        # He initialisation keeps activations in range through the ReLU layers
        w = (rng.standard_normal((fan_in, fan_out)) * math.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        weights += [numpy_helper.from_array(w, f"w{layer}"), numpy_helper.from_array(b, f"b{layer}")]
        last = layer == len(sizes) - 2
        nodes.append(helper.make_node("MatMul", [current, f"w{layer}"], [f"mm{layer}"]))
        nodes.append(helper.make_node("Add", [f"mm{layer}", f"b{layer}"], ["logits" if last else f"add{layer}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"add{layer}"], [f"relu{layer}"]))
            current = f"relu{layer}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 512])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=weights,
    )
    # IR 8 / opset 17: what every onnxruntime since 1.14 reads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    checker.check_model(model)
    manifest: Manifest = {
        "runtime": "onnx",
        "description": "dense net 512-2048-2048-2048-10, random weights; inputs and outputs come from the ONNX file",
        "max_batch_size": 64,
    }
    (_model_folder(out, "mlp", manifest) / "model.onnx").write_bytes(model.SerializeToString())
    return "mlp"


def _tabular_sklearn(out: Path, seed: int) -> str:
    import joblib

    manifest: Manifest = {
        "runtime": "sklearn",
        "description": "the tabular classifier as a scikit-learn estimator (joblib)",
        "inputs": [_tensor("input", "FP32", -1, FEATURES)],
        "outputs": [_tensor("predict", "INT64", -1), _tensor("predict_proba", "FP64", -1, 2)],
        "max_batch_size": 64,
    }
    joblib.dump(_boosted_classifier(seed), _model_folder(out, "tabular_sklearn", manifest) / "model.joblib")
    return "tabular_sklearn"


def _small_booster_manifest(runtime: str, datatype: str) -> Manifest:
    return {
        "runtime": runtime,
        "description": f"20-tree {runtime} classifier on the tabular data; predict is the probability of class 1",
        "inputs": [_tensor("input", "FP32", -1, FEATURES)],
        # declared as the framework computes it: xgboost answers float32, lightgbm float64
        "outputs": [_tensor("predict", datatype, -1)],
        "max_batch_size": 64,
    }


def _tabular_xgboost(out: Path, seed: int) -> str:
    import xgboost

    x, y = _tabular_data(seed)
    params = {"objective": "binary:logistic", "max_depth": 3, "seed": seed, "nthread": 2}
    booster = xgboost.train(params, xgboost.DMatrix(x, label=y), num_boost_round=20)
    folder = _model_folder(out, "tabular_xgboost", _small_booster_manifest("xgboost", "FP32"))
    booster.save_model(str(folder / "model.json"))
    return "tabular_xgboost"


def _tabular_lightgbm(out: Path, seed: int) -> str:
    import lightgbm

    x, y = _tabular_data(seed)
    params = {"objective": "binary", "num_leaves": 8, "seed": seed, "deterministic": True, "verbose": -1}
    booster = lightgbm.train({**params, "num_threads": 2}, lightgbm.Dataset(x, label=y), num_boost_round=20)
    folder = _model_folder(out, "tabular_lightgbm", _small_booster_manifest("lightgbm", "FP64"))
    booster.save_model(str(folder / "model.txt"))
    return "tabular_lightgbm"


TEXT_MODEL = '''"""A custom Python model on text: UTF-8 byte length and upper-cased text, per element."""

import numpy as np


class TextModel:
    def load(self):
        pass

    def predict(self, inputs):
        texts = inputs["text"]
        items = [t if isinstance(t, bytes) else str(t).encode("utf-8") for t in texts.reshape(-1)]
        length = np.array([len(t) for t in items], dtype=np.int64).reshape(texts.shape)
        upper = np.empty(len(items), dtype=np.object_)
        upper[:] = [t.decode("utf-8", errors="replace").upper().encode("utf-8") for t in items]
        return {"length": length, "upper": upper.reshape(texts.shape)}
'''

FLAGS_MODEL = '''"""A custom Python model on BOOL, FP16 and INT8 tensors."""

import numpy as np


class Flags:
    def load(self, version_dir):
        pass

    def predict(self, inputs):
        mask, x = inputs["mask"], inputs["x"]
        masked = np.where(mask, x, np.float16(0)).astype(np.float16)
        return {"masked": masked, "count": mask.sum(axis=1).astype(np.int8)}
'''


def _text_python(out: Path) -> str:
    manifest: Manifest = {
        "runtime": "python",
        "description": "custom Python model on BYTES: UTF-8 length and upper-cased text",
        "inputs": [_tensor("text", "BYTES", -1, 1)],
        "outputs": [_tensor("length", "INT64", -1, 1), _tensor("upper", "BYTES", -1, 1)],
        "max_batch_size": 16,
    }
    (_model_folder(out, "text_python", manifest) / "model.py").write_text(TEXT_MODEL, encoding="utf-8")
    return "text_python"


def _flags(out: Path) -> str:
    manifest: Manifest = {
        "runtime": "python",
        "description": "BOOL, FP16 and INT8 tensors: x where mask else 0, and the True count per row",
        "inputs": [_tensor("mask", "BOOL", -1, 4), _tensor("x", "FP16", -1, 4)],
        "outputs": [_tensor("masked", "FP16", -1, 4), _tensor("count", "INT8", -1)],
        "max_batch_size": 8,
    }
    (_model_folder(out, "flags", manifest) / "model.py").write_text(FLAGS_MODEL, encoding="utf-8")
    return "flags"


def _torch_mlp(out: Path, seed: int) -> str:
    try:
        import torch
    except ImportError as exc:
        log.warning("skipping the torch_mlp demo model: torch is not importable (%s)", exc)
        return ""
    rng = np.random.default_rng(seed)
    layers = [torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)]
    with torch.no_grad():
        # weights from numpy's seeded generator, so torch's global RNG is neither used nor disturbed
        for layer in layers:
            fan_out, fan_in = layer.weight.shape
            weight = rng.standard_normal((fan_out, fan_in)) / math.sqrt(fan_in)
            layer.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
            layer.bias.copy_(torch.from_numpy((rng.standard_normal(fan_out) * 0.1).astype(np.float32)))
    net = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1]).eval()
    manifest: Manifest = {
        "runtime": "torch",
        "description": "TorchScript net 16-32-4 with seeded weights",
        "inputs": [_tensor("input", "FP32", -1, 16)],
        "outputs": [_tensor("scores", "FP32", -1, 4)],
        "max_batch_size": 32,
    }
    folder = _model_folder(out, "torch_mlp", manifest)
    with warnings.catch_warnings():
        # torch >= 2.9 marks TorchScript deprecated; it is still the one self-contained artifact torch loads
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=DeprecationWarning)
        scripted: Any = torch.jit.script(net)
        scripted.save(str(folder / "model.pt"))
    return "torch_mlp"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m dhow.demo OUT", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = build_demo_repository(Path(sys.argv[1]))
    print(f"wrote {len(names)} models to {sys.argv[1]}: {', '.join(names)}")
