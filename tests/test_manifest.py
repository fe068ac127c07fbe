"""model.yaml validation: good manifests parse, bad ones are refused naming file, field and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from dhow.repository.manifest import ManifestError, parse_manifest, read_manifest
from dhow.repository.store import ModelRepository

GOOD = """\
runtime: onnx
inputs:  [{name: input, datatype: FP32, shape: [-1, 32]}]
outputs: [{name: probabilities, datatype: FP32, shape: [-1, 2]}]
max_batch_size: 64
version_policy: {latest: 1}
batching: {max_queue_delay_ms: 2, preferred_batch_sizes: [16, 32], max_queue_size: 100, timeout_ms: 500}
instances: {count: 2, kind: thread}
owner: risk-team
labels: {team: risk}
"""


def test_full_manifest_parses(tmp_path: Path) -> None:
    (tmp_path / "fraud").mkdir()
    (tmp_path / "fraud" / "model.yaml").write_text(GOOD)
    config = read_manifest(tmp_path / "fraud")
    assert config.name == "fraud"
    assert config.inputs is not None and config.inputs[0].shape == (-1, 32)
    assert config.batching is not None and config.batching.preferred_batch_sizes == (16, 32)
    assert config.batching.timeout_ms == 500
    assert config.instances.count == 2
    assert config.labels == {"team": "risk"}


def test_batching_defaults_on_for_batched_models() -> None:
    config = parse_manifest({"runtime": "onnx", "max_batch_size": 8}, "m.yaml", "m")
    assert config.batching is not None and config.batching.max_queue_delay_ms == 0
    assert parse_manifest({"runtime": "onnx"}, "m.yaml", "m").batching is None
    assert parse_manifest({"runtime": "onnx", "max_batch_size": 8, "batching": False}, "m.yaml", "m").batching is None


@pytest.mark.parametrize(
    ("data", "field", "expected"),
    [
        ({"runtime": "tensorflow"}, "runtime", "one of onnx, torch"),
        ({"runtime": "onnx", "colour": "red"}, "colour", "a known field"),
        ({"runtime": "onnx", "max_batch_size": -1}, "max_batch_size", "an integer >= 0"),
        ({"runtime": "onnx", "max_batch_size": "8"}, "max_batch_size", "an integer >= 0"),
        (
            {"runtime": "onnx", "inputs": [{"name": "a", "datatype": "FLOAT", "shape": [1]}]},
            "inputs[0].datatype",
            "FP32",
        ),
        ({"runtime": "onnx", "inputs": [{"name": "a", "datatype": "FP32", "shape": [0]}]}, "inputs[0].shape", "-1"),
        ({"runtime": "onnx", "inputs": [{"name": "a", "datatype": "FP32"}]}, "inputs[0].shape", "required"),
        (
            {"runtime": "onnx", "inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "dims": 2}]},
            "inputs[0].dims",
            "known",
        ),
        (
            {"runtime": "onnx", "max_batch_size": 4, "inputs": [{"name": "a", "datatype": "FP32", "shape": [3]}]},
            "inputs[0].shape",
            "batch dimension",
        ),
        ({"runtime": "sklearn"}, "inputs", "only onnx models may leave inputs out"),
        ({"runtime": "onnx", "version_policy": {"latest": 1, "all": True}}, "version_policy", "exactly one"),
        ({"runtime": "onnx", "version_policy": {"newest": 1}}, "version_policy.newest", "known field"),
        ({"runtime": "onnx", "batching": {"max_queue_delay_ms": 1}}, "batching", "max_batch_size is 0"),
        (
            {"runtime": "onnx", "max_batch_size": 8, "batching": {"preferred_batch_sizes": [16]}},
            "batching.preferred_batch_sizes",
            "<= max_batch_size",
        ),
        ({"runtime": "onnx", "instances": {"count": 0}}, "instances.count", "a positive integer"),
        ({"runtime": "onnx", "instances": {"kind": "fiber"}}, "instances.kind", "thread, process, gpu"),
        ({"runtime": "onnx", "device": "tpu"}, "device", "cpu, cuda or cuda:N"),
        ({"runtime": "onnx", "precision": "int3"}, "precision", "fp32, fp16, bf16"),
        ({"runtime": "onnx", "parameters": {"allow_spining": True}}, "parameters.allow_spining", "allow_spinning"),
        (
            {
                "runtime": "sklearn",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}],
                "outputs": [{"name": "predict", "datatype": "INT64", "shape": [1]}],
                "parameters": {"class": "M"},
            },
            "parameters.class",
            "it takes no parameters",
        ),
        ([1, 2], "", "a mapping"),
        ({"runtime": "onnx", "warmup": {"requests": 0}}, "warmup.requests", "a positive integer"),
        ({"runtime": "onnx", "warmup": {"value": "zero"}}, "warmup.value", "a number"),
        ({"runtime": "onnx", "warmup": {"sample": []}}, "warmup.sample", "requests, value, samples"),
        ({"runtime": "onnx", "warmup": {"samples": []}}, "warmup.samples", "a non-empty list of requests"),
        ({"runtime": "onnx", "warmup": {"samples": [[1, 2]]}}, "warmup.samples", "a mapping of input name"),
        (
            {
                "runtime": "onnx",
                "inputs": [{"name": "a", "datatype": "FP32", "shape": [2]}],
                "warmup": {"samples": [{"b": [1, 2]}]},
            },
            "warmup.samples[0].b",
            "a declared input (a)",
        ),
        (
            {
                "runtime": "onnx",
                "inputs": [{"name": "a", "datatype": "FP32", "shape": [2]}],
                "warmup": {"samples": [{}]},
            },
            "warmup.samples",
            "a non-empty list of requests",
        ),
        (
            {
                "runtime": "onnx",
                "inputs": [{"name": "t", "datatype": "BYTES", "shape": [1]}],
                "warmup": {"requests": 2},
            },
            "warmup.samples",
            "input 't' is BYTES",
        ),
    ],
)
def test_bad_manifest_names_file_field_and_expectation(data: object, field: str, expected: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(data, "repo/fraud/model.yaml", "fraud")
    message = caught.value.message
    assert message.startswith("repo/fraud/model.yaml")
    if field:
        assert f"field '{field}'" in message
    assert expected in message


def test_warmup_section() -> None:
    inputs = [{"name": "a", "datatype": "FP32", "shape": [2]}, {"name": "b", "datatype": "FP32", "shape": [1]}]
    assert parse_manifest({"runtime": "onnx"}, "m.yaml", "m").warmup is None
    generated = parse_manifest({"runtime": "onnx", "warmup": {"requests": 3, "value": 1}}, "m.yaml", "m").warmup
    assert generated is not None and (generated.requests, generated.value, generated.samples) == (3, 1.0, ())
    sampled = parse_manifest(
        {"runtime": "onnx", "inputs": inputs, "warmup": {"samples": [{"a": [1, 2], "b": [3]}]}}, "m.yaml", "m"
    ).warmup
    assert sampled is not None and sampled.requests == 1 and sampled.samples == ({"a": [1, 2], "b": [3]},)
    with pytest.raises(ManifestError, match=r"field 'warmup.samples\[0\]': expected data for every input; it lacks b"):
        parse_manifest({"runtime": "onnx", "inputs": inputs, "warmup": {"samples": [{"a": [1, 2]}]}}, "m.yaml", "m")


@pytest.mark.parametrize(
    ("data", "field", "guess"),
    [
        ({"runtime": "onnx", "max_batchsize": 8}, "max_batchsize", "max_batch_size"),
        ({"runtime": "onnx", "Max-Batch-Size": 8}, "Max-Batch-Size", "max_batch_size"),
        ({"runtime": "onnx", "version_policy": {"lastest": 1}}, "version_policy.lastest", "latest"),
        ({"runtime": "onnx", "instances": {"cout": 2}}, "instances.cout", "count"),
        ({"runtime": "onnx", "max_batch_size": 4, "batching": {"max_queue_delay": 1}}, "batching.max_queue_delay",
         "max_queue_delay_ms"),
        ({"runtime": "onnx", "parameters": {"allow_spining": True}}, "parameters.allow_spining", "allow_spinning"),
    ],
)  # fmt: skip
def test_an_unknown_field_suggests_the_one_meant(data: object, field: str, guess: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(data, "repo/fraud/model.yaml", "fraud")
    assert f"field '{field}'" in caught.value.message
    assert f"did you mean {guess}?" in caught.value.message


def test_an_unknown_field_like_none_known_guesses_nothing() -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest({"runtime": "onnx", "colour": "red"}, "repo/fraud/model.yaml", "fraud")
    assert "did you mean" not in caught.value.message and "known fields: runtime, inputs" in caught.value.message


def test_invalid_yaml_and_missing_manifest(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(ManifestError, match=r"model\.yaml"):
        read_manifest(tmp_path / "m")
    (tmp_path / "m" / "model.yaml").write_text("runtime: [onnx\n")
    with pytest.raises(ManifestError, match="valid YAML"):
        read_manifest(tmp_path / "m")


def test_repository_lists_models_and_versions_by_policy(tmp_path: Path) -> None:
    for name, policy in (("a", "{latest: 2}"), ("b", "{all: true}"), ("c", "{specific: [1, 3]}")):
        folder = tmp_path / name
        for version in (1, 2, 3):
            (folder / str(version)).mkdir(parents=True)
        (folder / "notes").mkdir()
        (folder / "model.yaml").write_text(f"runtime: onnx\nversion_policy: {policy}\n")
    (tmp_path / "not-a-model").mkdir()
    repository = ModelRepository(tmp_path)
    assert repository.model_names() == ["a", "b", "c"]
    assert repository.source("a").served_versions() == [2, 3]
    assert repository.source("b").served_versions() == [1, 2, 3]
    assert repository.source("c").served_versions() == [1, 3]
