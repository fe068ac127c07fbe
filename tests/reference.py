"""Run a demo model directly with its own framework, to compare with what the server answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

Arrays = dict[str, np.ndarray]


def run_directly(repository: Path, model: str, version: int, inputs: Arrays) -> Arrays:
    folder = repository / model / str(version)
    runner = {
        "tabular": _onnx,
        "mlp": _onnx,
        "tabular_sklearn": _sklearn,
        "tabular_xgboost": _xgboost,
        "tabular_lightgbm": _lightgbm,
        "torch_mlp": _torch,
        "text_python": _text,
        "flags": _flags,
    }[model]
    return runner(folder, inputs)


def _onnx(folder: Path, inputs: Arrays) -> Arrays:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def _sklearn(folder: Path, inputs: Arrays) -> Arrays:
    import joblib

    estimator = joblib.load(folder / "model.joblib")
    x = inputs["input"]
    return {"predict": estimator.predict(x), "predict_proba": estimator.predict_proba(x)}


def _xgboost(folder: Path, inputs: Arrays) -> Arrays:
    import xgboost

    booster = xgboost.Booster(model_file=str(folder / "model.json"))
    return {"predict": booster.inplace_predict(inputs["input"])}


def _lightgbm(folder: Path, inputs: Arrays) -> Arrays:
    import lightgbm

    booster = lightgbm.Booster(model_file=str(folder / "model.txt"))
    return {"predict": booster.predict(inputs["input"])}


def _torch(folder: Path, inputs: Arrays) -> Arrays:
    import torch

    module = torch.jit.load(str(folder / "model.pt"), map_location="cpu")
    with torch.inference_mode():
        return {"scores": module(torch.from_numpy(inputs["input"])).numpy()}


def _text(folder: Path, inputs: Arrays) -> Arrays:
    texts = inputs["text"]
    length = np.array([[len(t)] for t in texts.reshape(-1)], dtype=np.int64)
    upper = np.array([[t.decode().upper().encode()] for t in texts.reshape(-1)], dtype=np.object_)
    return {"length": length, "upper": upper}


def _flags(folder: Path, inputs: Arrays) -> Arrays:
    mask, x = inputs["mask"], inputs["x"]
    return {"masked": np.where(mask, x, 0).astype(np.float16), "count": mask.sum(axis=1).astype(np.int8)}


def make_inputs(metadata_inputs: list[dict[str, object]], rows: int, seed: int = 0) -> Arrays:
    """Seeded inputs for each declared input: the batch dim becomes ``rows``, other -1 dims 4."""
    rng = np.random.default_rng(seed)
    arrays: Arrays = {}
    for spec in metadata_inputs:
        shape_spec = [int(d) for d in spec["shape"]]  # type: ignore[attr-defined]
        shape = [rows if i == 0 and d == -1 else (4 if d == -1 else d) for i, d in enumerate(shape_spec)]
        datatype = spec["datatype"]
        if datatype == "BYTES":
            words = ["héllo", "dhow", "sail", "مرحبا", "x"]
            flat = [words[int(i)].encode() for i in rng.integers(0, len(words), int(np.prod(shape)))]
            arrays[str(spec["name"])] = np.array(flat, dtype=np.object_).reshape(shape)
        elif datatype == "BOOL":
            arrays[str(spec["name"])] = rng.integers(0, 2, shape).astype(bool)
        elif datatype == "FP16":
            arrays[str(spec["name"])] = rng.standard_normal(shape).astype(np.float16)
        else:
            arrays[str(spec["name"])] = rng.standard_normal(shape).astype(np.float32)
    return arrays
