"""Every runtime on the demo models, compared with the model run directly by its own framework,
and the errors a runtime raises for missing artifacts, faulty models and absent GPUs."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dhow.core.datatypes import NUMPY_DTYPE, datatype_of
from dhow.core.errors import ModelFault, ModelLoadError
from dhow.core.model_config import ModelConfig, TensorSpec
from dhow.runtimes.base import Runtime, create_runtime

Arrays = dict[str, np.ndarray]


def _spec(name: str, datatype: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, datatype, shape)


TABULAR_INPUT = (_spec("input", "FP32", -1, 32),)

# the demo manifests, as ModelConfig: this file tests runtimes, not the manifest parser
CONFIGS: dict[str, ModelConfig] = {
    "tabular": ModelConfig(
        "tabular",
        "onnx",
        TABULAR_INPUT,
        (_spec("label", "INT64", -1), _spec("probabilities", "FP32", -1, 2)),
        max_batch_size=64,
    ),
    "mlp": ModelConfig("mlp", "onnx", max_batch_size=64),
    "tabular_sklearn": ModelConfig(
        "tabular_sklearn",
        "sklearn",
        TABULAR_INPUT,
        (_spec("predict", "INT64", -1), _spec("predict_proba", "FP64", -1, 2)),
        max_batch_size=64,
    ),
    "tabular_xgboost": ModelConfig(
        "tabular_xgboost", "xgboost", TABULAR_INPUT, (_spec("predict", "FP32", -1),), max_batch_size=64
    ),
    "tabular_lightgbm": ModelConfig(
        "tabular_lightgbm", "lightgbm", TABULAR_INPUT, (_spec("predict", "FP64", -1),), max_batch_size=64
    ),
    "text_python": ModelConfig(
        "text_python",
        "python",
        (_spec("text", "BYTES", -1, 1),),
        (_spec("length", "INT64", -1, 1), _spec("upper", "BYTES", -1, 1)),
        max_batch_size=16,
    ),
    "torch_mlp": ModelConfig(
        "torch_mlp", "torch", (_spec("input", "FP32", -1, 16),), (_spec("scores", "FP32", -1, 4),), max_batch_size=32
    ),
    "flags": ModelConfig(
        "flags",
        "python",
        (_spec("mask", "BOOL", -1, 4), _spec("x", "FP16", -1, 4)),
        (_spec("masked", "FP16", -1, 4), _spec("count", "INT8", -1)),
        max_batch_size=8,
    ),
}

ARTIFACTS = {
    "onnx": "model.onnx",
    "torch": "model.pt",
    "sklearn": "model.joblib",
    "xgboost": "model.json",
    "lightgbm": "model.txt",
    "python": "model.py",
}

CASES = [(name, 1) for name in CONFIGS] + [("tabular", 2)]


@pytest.fixture
def loaded() -> Iterator[list[Runtime]]:
    """Runtimes a test loads, unloaded when it ends."""
    runtimes: list[Runtime] = []
    yield runtimes
    for runtime in runtimes:
        runtime.unload()


def _load(loaded: list[Runtime], version_dir: Path, config: ModelConfig) -> Runtime:
    if config.runtime == "torch":
        pytest.importorskip("torch")
    runtime = create_runtime(config.runtime)
    runtime.load(version_dir, config)
    loaded.append(runtime)
    return runtime


def _inputs(specs: tuple[TensorSpec, ...], rows: int, seed: int) -> Arrays:
    """Seeded inputs, read-only like arrays decoded from a request's buffer."""
    rng = np.random.default_rng(seed)
    arrays: Arrays = {}
    for spec in specs:
        shape = (rows, *spec.shape[1:])
        if spec.datatype == "BYTES":
            words = [w.encode() for w in ("héllo", "dhow", "sail", "مرحبا", "x")]
            array = np.empty(int(np.prod(shape)), dtype=np.object_)
            array[:] = [words[i] for i in rng.integers(0, len(words), array.size)]
            array = array.reshape(shape)
        elif spec.datatype == "BOOL":
            array = rng.integers(0, 2, shape).astype(bool)
        else:
            array = rng.standard_normal(shape).astype(NUMPY_DTYPE[spec.datatype])
        array.flags.writeable = False
        arrays[spec.name] = array
    return arrays


def _run_directly(folder: Path, config: ModelConfig, inputs: Arrays) -> Arrays:
    """The same version, run by its own framework without dhow."""
    if config.runtime == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, inputs), strict=True))
    if config.runtime == "sklearn":
        import joblib

        estimator = joblib.load(folder / "model.joblib")
        return {
            "predict": estimator.predict(inputs["input"]),
            "predict_proba": estimator.predict_proba(inputs["input"]),
        }
    if config.runtime == "xgboost":
        import xgboost

        return {"predict": xgboost.Booster(model_file=str(folder / "model.json")).inplace_predict(inputs["input"])}
    if config.runtime == "lightgbm":
        import lightgbm

        booster = lightgbm.Booster(model_file=str(folder / "model.txt"))
        return {"predict": np.asarray(booster.predict(inputs["input"]))}
    if config.runtime == "torch":
        import torch

        jit: Any = torch.jit  # unannotated
        module = jit.load(str(folder / "model.pt"), map_location="cpu")
        with torch.inference_mode():
            return {"scores": module(torch.tensor(inputs["input"])).numpy()}
    return _python_model(folder / "model.py").predict(dict(inputs))  # type: ignore[no-any-return]


def _python_model(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"direct_{path.parent.parent.name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = next(v() for v in vars(module).values() if isinstance(v, type) and hasattr(v, "predict"))
    if model.load.__code__.co_argcount == 2:
        model.load(path.parent)
    else:
        model.load()
    return model


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == np.shape(want)
    if got.dtype == np.object_:
        assert got.tolist() == np.asarray(want).tolist()
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("model", "version"), CASES)
def test_runtime_answers_like_the_framework(
    demo_repository: Path, loaded: list[Runtime], model: str, version: int
) -> None:
    config = CONFIGS[model]
    folder = demo_repository / model / str(version)
    runtime = _load(loaded, folder, config)
    assert runtime.device == "cpu"
    inputs_spec, outputs_spec = runtime.signature()
    inputs = _inputs(inputs_spec, rows=5, seed=version)
    names = [spec.name for spec in outputs_spec]
    got = runtime.infer(inputs, names)
    want = _run_directly(folder, config, inputs)
    assert sorted(got) == sorted(names)
    for spec in outputs_spec:
        array = got[spec.name]
        assert isinstance(array, np.ndarray)
        assert datatype_of(array) == spec.datatype, spec.name
        assert array.shape[0] == 5
        _assert_same(array, want[spec.name])


@pytest.mark.parametrize("model", list(CONFIGS))
def test_signature_matches_the_demo_manifest(demo_repository: Path, loaded: list[Runtime], model: str) -> None:
    config = CONFIGS[model]
    runtime = _load(loaded, demo_repository / model / "1", config)
    if model == "mlp":  # read from the ONNX file, as model.yaml leaves them out
        assert runtime.signature() == ((_spec("input", "FP32", -1, 512),), (_spec("logits", "FP32", -1, 10),))
    else:
        assert runtime.signature() == (config.inputs, config.outputs)


@pytest.mark.parametrize("model", ["tabular_sklearn", "tabular_xgboost", "tabular_lightgbm"])
def test_tabular_signatures_are_derived_when_the_manifest_omits_them(
    demo_repository: Path, loaded: list[Runtime], model: str
) -> None:
    declared = CONFIGS[model]
    bare = ModelConfig(model, declared.runtime, max_batch_size=64)
    runtime = _load(loaded, demo_repository / model / "1", bare)
    inputs, outputs = runtime.signature()
    assert outputs == declared.outputs
    # sklearn computes in float64, so that is what it asks for when nothing is declared
    assert inputs == (_spec("input", "FP64" if model == "tabular_sklearn" else "FP32", -1, 32),)


def test_only_requested_outputs_are_computed(demo_repository: Path, loaded: list[Runtime]) -> None:
    runtime = _load(loaded, demo_repository / "tabular" / "1", CONFIGS["tabular"])
    got = runtime.infer(_inputs(TABULAR_INPUT, rows=3, seed=0), ["probabilities"])
    assert list(got) == ["probabilities"] and got["probabilities"].shape == (3, 2)


def test_versions_of_tabular_are_different_models(demo_repository: Path, loaded: list[Runtime]) -> None:
    inputs = _inputs(TABULAR_INPUT, rows=16, seed=3)
    first, second = (
        _load(loaded, demo_repository / "tabular" / str(v), CONFIGS["tabular"]).infer(inputs, ["probabilities"])
        for v in (1, 2)
    )
    assert not np.allclose(first["probabilities"], second["probabilities"])


@pytest.mark.parametrize("runtime_name", sorted(ARTIFACTS))
def test_missing_artifact_names_the_expected_path(tmp_path: Path, runtime_name: str) -> None:
    if runtime_name == "torch":
        pytest.importorskip("torch")
    config = next(c for c in CONFIGS.values() if c.runtime == runtime_name)
    version_dir = tmp_path / "fraud" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "a.txt").write_text("not a model")
    with pytest.raises(ModelLoadError) as caught:
        create_runtime(runtime_name).load(version_dir, config)
    message = caught.value.message
    assert ARTIFACTS[runtime_name] in message and str(version_dir) in message and "a.txt" in message


def test_corrupt_onnx_file_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    with pytest.raises(ModelLoadError, match=r"cannot load model\.onnx"):
        create_runtime("onnx").load(tmp_path / "1", ModelConfig("broken", "onnx"))


MODEL_PY = """
import numpy as np

class Echo:
    def load(self):
        if {fail_load!r}:
            raise ValueError("no weights here")

    def predict(self, inputs):
        x = inputs["x"]
        if float(x.reshape(-1)[0]) < 0:
            raise RuntimeError("negative input")
        return {{"y": x * {factor} if {rows_ok!r} else x[:1]}}
"""

ECHO = ModelConfig("echo", "python", (_spec("x", "FP32", -1, 2),), (_spec("y", "FP32", -1, 2),), max_batch_size=4)


def _python_version(
    root: Path, version: int, *, factor: int = 2, fail_load: bool = False, rows_ok: bool = True
) -> Path:
    folder = root / "echo" / str(version)
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(MODEL_PY.format(factor=factor, fail_load=fail_load, rows_ok=rows_ok))
    return folder


def test_python_model_faults_become_model_faults(tmp_path: Path, loaded: list[Runtime]) -> None:
    runtime = _load(loaded, _python_version(tmp_path, 1), ECHO)
    ok = runtime.infer({"x": np.array([[1.0, 2.0]], np.float32)}, ["y"])
    np.testing.assert_array_equal(ok["y"], [[2.0, 4.0]])
    with pytest.raises(ModelFault, match="model echo raised RuntimeError: negative input"):
        runtime.infer({"x": np.array([[-1.0, 2.0]], np.float32)}, ["y"])


def test_python_model_must_answer_every_row(tmp_path: Path, loaded: list[Runtime]) -> None:
    runtime = _load(loaded, _python_version(tmp_path, 1, rows_ok=False), ECHO)
    with pytest.raises(ModelFault, match="batch of 3 rows"):
        runtime.infer({"x": np.ones((3, 2), np.float32)}, ["y"])


def test_python_load_failure_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="ValueError: no weights here"):
        create_runtime("python").load(_python_version(tmp_path, 1, fail_load=True), ECHO)


def test_python_versions_do_not_share_a_module(tmp_path: Path, loaded: list[Runtime]) -> None:
    first = _load(loaded, _python_version(tmp_path, 1, factor=2), ECHO)
    second = _load(loaded, _python_version(tmp_path, 2, factor=3), ECHO)
    x = {"x": np.ones((1, 2), np.float32)}
    assert first.infer(x, ["y"])["y"][0, 0] == 2.0 and second.infer(x, ["y"])["y"][0, 0] == 3.0


@pytest.mark.parametrize("runtime_name", ["python", "torch"])
def test_runtimes_without_signatures_need_declared_tensors(tmp_path: Path, runtime_name: str) -> None:
    if runtime_name == "torch":
        pytest.importorskip("torch")
    with pytest.raises(ModelLoadError, match="`inputs`"):
        create_runtime(runtime_name).load(tmp_path, ModelConfig("bare", runtime_name))


def test_sklearn_outputs_must_be_estimator_methods(demo_repository: Path) -> None:
    config = ModelConfig("s", "sklearn", TABULAR_INPUT, (_spec("explain", "FP64", -1),), max_batch_size=64)
    with pytest.raises(ModelLoadError, match="explain"):
        create_runtime("sklearn").load(demo_repository / "tabular_sklearn" / "1", config)


def test_onnx_zipmap_output_is_a_clear_fault(tmp_path: Path, loaded: list[Runtime]) -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3)).astype(np.float32)
    estimator = LogisticRegression().fit(x, (x[:, 0] > 0).astype(np.int64))
    onnx_model = convert_sklearn(estimator, initial_types=[("input", FloatTensorType([None, 3]))])  # ZipMap kept
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(onnx_model.SerializeToString())
    runtime = _load(loaded, tmp_path / "1", ModelConfig("zipped", "onnx", max_batch_size=8))
    assert [spec.name for spec in runtime.signature()[1]] == ["output_label"]
    with pytest.raises(ModelFault, match="zipmap"):
        runtime.infer({"input": x[:2]}, ["output_probability"])


@pytest.mark.parametrize("returns", ["dict", "tuple", "too_few"])
def test_torch_outputs_by_name_or_position(tmp_path: Path, loaded: list[Runtime], returns: str) -> None:
    torch = pytest.importorskip("torch")

    module_base: Any = torch.nn.Module

    class Split(module_base):  # type: ignore[misc]
        def forward(self, x: Any, y: Any) -> Any:
            if returns == "dict":
                return {"diff": x - y, "total": x + y}
            return (x + y, x - y) if returns == "tuple" else (x + y,)

    (tmp_path / "1").mkdir()
    jit: Any = torch.jit  # unannotated
    jit.trace(Split(), (torch.zeros(1, 2), torch.zeros(1, 2)), strict=False).save(str(tmp_path / "1" / "model.pt"))
    pair = (_spec("x", "FP32", -1, 2), _spec("y", "FP32", -1, 2))
    outputs = (_spec("total", "FP32", -1, 2), _spec("diff", "FP32", -1, 2))
    runtime = _load(loaded, tmp_path / "1", ModelConfig("split", "torch", pair, outputs, max_batch_size=4))
    inputs = _inputs(pair, rows=3, seed=1)
    if returns == "too_few":
        with pytest.raises(ModelFault, match="declares 2 outputs"):
            runtime.infer(inputs, ["total"])
        return
    got = runtime.infer(inputs, ["total", "diff"])
    np.testing.assert_allclose(got["total"], inputs["x"] + inputs["y"])
    np.testing.assert_allclose(got["diff"], inputs["x"] - inputs["y"])


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.skipif(_cuda_available(), reason="a CUDA GPU is present, so asking for one succeeds")
def test_cuda_without_a_gpu_is_a_load_error(demo_repository: Path) -> None:
    pytest.importorskip("torch")
    config = ModelConfig("torch_mlp", "torch", CONFIGS["torch_mlp"].inputs, CONFIGS["torch_mlp"].outputs, device="cuda")
    with pytest.raises(ModelLoadError, match="cuda"):
        create_runtime("torch").load(demo_repository / "torch_mlp" / "1", config)


def test_onnx_cuda_without_the_provider_is_a_load_error(demo_repository: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(ModelLoadError, match="CUDAExecutionProvider"):
        create_runtime("onnx").load(demo_repository / "mlp" / "1", ModelConfig("mlp", "onnx", device="cuda:0"))


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU visible to torch (torch.cuda.is_available())")
def test_torch_fp16_on_gpu_matches_cpu(demo_repository: Path, loaded: list[Runtime]) -> None:
    folder = demo_repository / "torch_mlp" / "1"
    cpu_config = CONFIGS["torch_mlp"]
    gpu_config = ModelConfig(
        "torch_mlp", "torch", cpu_config.inputs, cpu_config.outputs, max_batch_size=32, device="cuda", precision="fp16"
    )
    inputs = _inputs(cpu_config.inputs or (), rows=8, seed=7)
    on_cpu = _load(loaded, folder, cpu_config).infer(inputs, ["scores"])["scores"]
    gpu = _load(loaded, folder, gpu_config)
    assert gpu.device == "cuda:0"
    on_gpu = gpu.infer(inputs, ["scores"])["scores"]
    assert on_gpu.dtype == np.float32  # fp16 is how it computes, not what it answers
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU visible to torch (torch.cuda.is_available())")
def test_two_gpu_instances_run_at_once_and_reuse_pinned_buffers(demo_repository: Path, loaded: list[Runtime]) -> None:
    """Two instances on one GPU, each on its own stream, called from two threads with batches that grow and shrink
    (the pinned staging buffers are reused and regrown): every answer matches the CPU's."""
    from concurrent.futures import ThreadPoolExecutor

    folder = demo_repository / "torch_mlp" / "1"
    cpu_config = CONFIGS["torch_mlp"]
    gpu_config = ModelConfig(
        "torch_mlp", "torch", cpu_config.inputs, cpu_config.outputs, max_batch_size=64, device="cuda", precision="bf16"
    )
    cpu = _load(loaded, folder, cpu_config)
    gpus = [_load(loaded, folder, gpu_config) for _ in range(2)]
    batches = [_inputs(cpu_config.inputs or (), rows=rows, seed=rows) for rows in (4, 64, 1, 33, 64, 2) * 4]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda item: gpus[item[0] % 2].infer(item[1], ["scores"]), enumerate(batches)))
    for batch, answer in zip(batches, answers, strict=True):
        expected = cpu.infer(batch, ["scores"])["scores"]
        assert answer["scores"].shape == expected.shape
        np.testing.assert_allclose(answer["scores"], expected, rtol=5e-2, atol=5e-2)


def test_onnx_spinning_is_a_checked_switch(demo_repository: Path, loaded: list[Runtime]) -> None:
    """Off by default, on when asked; anything but a boolean is refused with the field named."""
    folder = demo_repository / "mlp" / "1"
    inputs = {"input": np.ones((2, 512), dtype=np.float32)}
    answers = [
        _load(loaded, folder, ModelConfig("mlp", "onnx", parameters=parameters)).infer(inputs, ["logits"])["logits"]
        for parameters in ({}, {"allow_spinning": True})
    ]
    np.testing.assert_array_equal(answers[0], answers[1])
    with pytest.raises(ModelLoadError, match=r"parameters\.allow_spinning must be true or false"):
        create_runtime("onnx").load(folder, ModelConfig("mlp", "onnx", parameters={"allow_spinning": "yes"}))


BOOSTER_SWITCHES = [("tabular_xgboost", "output_margin"), ("tabular_lightgbm", "raw_score")]


@pytest.mark.parametrize(("model", "switch"), BOOSTER_SWITCHES)
def test_booster_raw_scores_are_a_checked_switch(
    demo_repository: Path, loaded: list[Runtime], model: str, switch: str
) -> None:
    """Transformed values by default, raw scores when asked; anything but a boolean is refused with the field named."""
    config = CONFIGS[model]
    folder = demo_repository / model / "1"
    inputs = _inputs(config.inputs, rows=8, seed=3)
    values, raw = (
        _load(loaded, folder, ModelConfig(model, config.runtime, parameters=parameters)).infer(inputs, ["predict"])
        for parameters in ({}, {switch: True})
    )
    assert ((values["predict"] >= 0) & (values["predict"] <= 1)).all()  # probabilities of a binary classifier
    np.testing.assert_allclose(values["predict"], 1 / (1 + np.exp(-raw["predict"])), rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelLoadError, match=rf"{model}/model\.yaml: parameters\.{switch} must be true or false"):
        create_runtime(config.runtime).load(folder, ModelConfig(model, config.runtime, parameters={switch: "yes"}))


@pytest.mark.parametrize("model", ["tabular_xgboost", "tabular_lightgbm"])
def test_boosters_answer_one_output(demo_repository: Path, model: str) -> None:
    config = CONFIGS[model]
    two = ModelConfig(model, config.runtime, TABULAR_INPUT, (_spec("a", "FP32", -1), _spec("b", "FP32", -1)))
    expected = rf"{model}/model\.yaml: an? {config.runtime} model has exactly one output"
    with pytest.raises(ModelLoadError, match=expected):
        create_runtime(config.runtime).load(demo_repository / model / "1", two)


@pytest.mark.parametrize("model", ["tabular_sklearn", "tabular_xgboost", "tabular_lightgbm"])
def test_tabular_runtimes_take_one_input_and_compute_only_once_loaded(demo_repository: Path, model: str) -> None:
    config = CONFIGS[model]
    two = ModelConfig(model, config.runtime, (*TABULAR_INPUT, _spec("extra", "FP32", -1, 1)), config.outputs)
    with pytest.raises(ModelLoadError, match=f"a {config.runtime} model takes one input; `inputs` lists input, extra"):
        create_runtime(config.runtime).load(demo_repository / model / "1", two)
    runtime = create_runtime(config.runtime)
    with pytest.raises(ModelFault, match=f"the {config.runtime} model is not loaded"):
        runtime.infer(_inputs(config.inputs, rows=1, seed=0), [config.outputs[0].name])
