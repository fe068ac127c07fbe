"""The skeleton the tabular runtimes share (scikit-learn, XGBoost, LightGBM): one artifact file, one 2-D input,
computed on the CPU.

``TabularRuntime.load`` finds and decrypts the artifact, reads the model's switches, opens the artifact (a
framework's refusal becomes a one-line ``ModelLoadError``) and builds the signature; ``infer`` refuses an
unloaded model and checks that the answer has one row per input row. A framework module says only what differs:
its artifact names, how it opens one, its outputs and how it computes them. ``BoosterRuntime`` adds what the two
boosters share: one output, computed by one call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dhow.core.errors import ModelFault, ModelLoadError
from dhow.core.model_config import ModelConfig, TensorSpec
from dhow.runtimes.loading import (
    Signature,
    check_declared,
    check_rows,
    decrypted,
    find_artifact,
    load_failure,
    require_cpu,
    single_input,
)

__all__ = ["BoosterRuntime", "Opened", "TabularRuntime", "switch"]


@dataclass(frozen=True, slots=True)
class Opened:
    """What a framework read from its artifact: the model, and what the signature needs that only it can tell."""

    model: Any
    #: columns of the one input; -1 when the model does not say
    features: int
    #: the shape of a booster's one output, batch dimension first
    output_shape: tuple[int, ...] = (-1,)


def switch(config: ModelConfig, name: str) -> bool:
    """A true/false entry of model.yaml's ``parameters`` (false when absent); anything else is refused."""
    value = config.parameters.get(name, False)
    if not isinstance(value, bool):
        raise ModelLoadError(f"{config.name}/model.yaml: parameters.{name} must be true or false")
    return value


class TabularRuntime(ABC):
    """A model of one 2-D input in one artifact file, on the CPU; subclasses fill in the framework."""

    #: the ``runtime:`` name of model.yaml, as messages say it
    framework: ClassVar[str]
    #: the artifact file names looked for in a version's folder, in order
    artifacts: ClassVar[tuple[str, ...]]
    #: the input's datatype when model.yaml declares none
    input_datatype: ClassVar[str] = "FP32"
    #: what of the opened model tells its number of columns, as messages name it
    features_source: ClassVar[str]

    device: str = "cpu"

    def __init__(self) -> None:
        self._model: Any = None
        self._config: ModelConfig | None = None
        self._signature: Signature = ((), ())
        #: keyword arguments of the framework's predict call, read from model.yaml's parameters
        self._options: dict[str, Any] = {}

    def load(self, version_dir: Path, config: ModelConfig) -> None:
        self.device = require_cpu(config, self.framework)
        path = find_artifact(version_dir, config, *self.artifacts)
        plaintext = decrypted(path)
        options = self._read_options(config)
        try:
            opened = self._open(path, plaintext, config, options)
        except Exception as exc:
            raise load_failure(config, path, exc) from None
        outputs = self._outputs(opened, config, path)
        default = TensorSpec("input", self.input_datatype, (-1, opened.features))
        features = single_input(config, self.framework, default)
        self._check_manifest(config, features, opened.features, outputs, path)
        self._signature = (features,), outputs
        self._options = options
        self._model, self._config = opened.model, config

    def signature(self) -> Signature:
        return self._signature

    def _check_manifest(
        self, config: ModelConfig, declared: TensorSpec, features: int, outputs: tuple[TensorSpec, ...], path: Path
    ) -> None:
        """The declared input must have the model's columns, each declared output what the model answers."""
        if config.inputs and features > 0:
            found = TensorSpec(declared.name, declared.datatype, (-1, features))
            artifact = f"{path.name} ({self.features_source} = {features})"
            check_declared(config, "inputs", declared, found, artifact)
        answered = {spec.name: spec for spec in outputs}
        for spec in config.outputs or ():
            if spec.name in answered:
                check_declared(config, "outputs", spec, answered[spec.name], path.name)

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        model, config = self._model, self._config
        if model is None or config is None:
            raise ModelFault(f"the {self.framework} model is not loaded")
        results = self._predict(model, config, inputs, outputs)
        check_rows(config, inputs, results)
        return results

    def unload(self) -> None:
        self._model = None

    # -- what a framework fills in --------------------------------------------------------

    def _read_options(self, config: ModelConfig) -> dict[str, Any]:
        """The predict call's keyword arguments from model.yaml's parameters; a bad one is a ``ModelLoadError``."""
        return {}

    @abstractmethod
    def _open(self, path: Path, plaintext: bytes | None, config: ModelConfig, options: dict[str, Any]) -> Opened:
        """Read the artifact (``plaintext`` when it was encrypted, else from ``path``); may raise anything."""
        raise NotImplementedError

    @abstractmethod
    def _outputs(self, opened: Opened, config: ModelConfig, path: Path) -> tuple[TensorSpec, ...]:
        """The output specs; a ``ModelLoadError`` when model.yaml asks for outputs the model does not have."""
        raise NotImplementedError

    @abstractmethod
    def _predict(
        self, model: Any, config: ModelConfig, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """The requested ``outputs`` of a batch; an exception of the model's is a ``ModelFault`` naming it."""
        raise NotImplementedError


class BoosterRuntime(TabularRuntime):
    """A gradient-boosted model: one output (``predict`` unless model.yaml names it), computed by one call."""

    #: how messages name a model of this framework ("an xgboost model")
    model_noun: ClassVar[str]
    output_datatype: ClassVar[str]

    def _outputs(self, opened: Opened, config: ModelConfig, path: Path) -> tuple[TensorSpec, ...]:
        if config.outputs and len(config.outputs) != 1:
            raise ModelLoadError(f"{config.name}/model.yaml: {self.model_noun} has exactly one output")
        name = config.outputs[0].name if config.outputs else "predict"
        return (TensorSpec(name, self.output_datatype, opened.output_shape),)

    def _predict(
        self, model: Any, config: ModelConfig, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        (input_spec,), (output_spec,) = self._signature
        if output_spec.name not in outputs:
            return {}
        try:
            value = self._call(model, inputs[input_spec.name])
        except Exception as exc:
            raise ModelFault(f"model {config.name}: {self.framework} failed: {type(exc).__name__}: {exc}") from exc
        return {output_spec.name: np.asarray(value)}

    @abstractmethod
    def _call(self, model: Any, features: np.ndarray) -> Any:
        """The framework's predict call on a batch, with ``self._options``."""
        raise NotImplementedError
