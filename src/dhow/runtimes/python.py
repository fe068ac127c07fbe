"""Custom Python models: a ``model.py`` with a class that has ``load`` and ``predict``.

    class MyModel:
        def load(self, version_dir):  # or load(self)
            ...
        def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            ...

The class is ``parameters: {class: MyModel}`` in model.yaml, or the only such class in the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import itertools
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from dhow.core.artifacts import plain_path
from dhow.core.errors import DhowError, ModelFault, ModelLoadError
from dhow.core.model_config import ModelConfig
from dhow.runtimes.loading import Signature, check_rows, decrypted, find_artifact, require_declared, where

# each load gets its own module name, so versions (and instances) of one model never share globals
_loads = itertools.count()


class PythonRuntime:
    device: str = "cpu"

    def __init__(self) -> None:
        self._model: Any = None
        self._config: ModelConfig | None = None
        self._signature: Signature = ((), ())
        self._module_name = ""

    def load(self, version_dir: Path, config: ModelConfig) -> None:
        self._signature = require_declared(config, "python")
        path = find_artifact(version_dir, config, "model.py")
        # the model places its own tensors; the device is what model.yaml says it uses
        self.device = config.device
        try:
            module = self._import(path)
            model = _model_class(module, config, version_dir)()
            _call_load(model, version_dir)
        except ModelLoadError:
            self.unload()
            raise
        except Exception as exc:
            self.unload()
            raise ModelLoadError(f"{where(config, version_dir)}: model.py raised {type(exc).__name__}: {exc}") from None
        self._model, self._config = model, config

    def _import(self, path: Path) -> ModuleType:
        origin = plain_path(path)
        digest = hashlib.sha256(str(origin.resolve()).encode()).hexdigest()[:12]
        self._module_name = f"dhow_model_{digest}_{next(_loads)}"
        source = decrypted(path)
        if source is not None:
            return self._exec_source(source, origin)
        spec = importlib.util.spec_from_file_location(self._module_name, path)
        if spec is None or spec.loader is None:
            raise ModelLoadError(f"{path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        # registered because dataclasses and pickle look classes up by their module's name
        sys.modules[self._module_name] = module
        spec.loader.exec_module(module)
        return module

    def _exec_source(self, source: bytes, origin: Path) -> ModuleType:
        """Run decrypted source as a module; tracebacks name model.py, the file as it was written."""
        code = compile(source, str(origin), "exec", dont_inherit=True)
        module = ModuleType(self._module_name)
        module.__file__ = str(origin)
        sys.modules[self._module_name] = module
        # the same trust as importing a plain model.py: the operator put it in the repository
        exec(code, module.__dict__)
        return module

    def signature(self) -> Signature:
        return self._signature

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        model, config = self._model, self._config
        if model is None or config is None:
            raise ModelFault("the python model is not loaded")
        try:
            value = model.predict(dict(inputs))
        except DhowError:
            raise  # the model chose what to tell the client (e.g. InvalidInput)
        except Exception as exc:
            raise ModelFault(f"model {config.name} raised {type(exc).__name__}: {exc}") from exc
        produced = self._by_name(config, value)
        missing = [name for name in outputs if name not in produced]
        if missing:
            raise ModelFault(f"model {config.name}: predict returned no output {', '.join(map(repr, missing))}")
        results = {name: np.asarray(produced[name]) for name in outputs}
        check_rows(config, inputs, results)
        return results

    def _by_name(self, config: ModelConfig, value: Any) -> Mapping[str, Any]:
        declared = self._signature[1]
        if isinstance(value, Mapping):
            return value
        if isinstance(value, np.ndarray) and len(declared) == 1:
            return {declared[0].name: value}
        raise ModelFault(
            f"model {config.name}: predict returned {type(value).__name__}; expected a dict of arrays by output name"
            + (" or one array" if len(declared) == 1 else "")
        )

    def unload(self) -> None:
        self._model = None
        if self._module_name:
            sys.modules.pop(self._module_name, None)
            self._module_name = ""


def _model_class(module: ModuleType, config: ModelConfig, version_dir: Path) -> type:
    wanted = config.parameters.get("class")
    if wanted is not None:
        found = getattr(module, str(wanted), None)
        if not isinstance(found, type) or not callable(getattr(found, "predict", None)):
            raise ModelLoadError(
                f"{config.name}/model.yaml: parameters.class is {wanted!r}, which model.py in {version_dir} "
                "does not define as a class with a predict method"
            )
        return found
    candidates = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and obj.__module__ == module.__name__
        and callable(getattr(obj, "load", None))
        and callable(getattr(obj, "predict", None))
    ]
    if len(candidates) != 1:
        found_names = ", ".join(c.__name__ for c in candidates) or "none"
        raise ModelLoadError(
            f"{where(config, version_dir)}: model.py must define exactly one class with load and predict "
            f"methods (found: {found_names}); or name it in model.yaml as parameters: {{class: Name}}"
        )
    return candidates[0]


def _call_load(model: Any, version_dir: Path) -> None:
    load = getattr(model, "load", None)
    if not callable(load):
        return
    parameters = inspect.signature(load).parameters.values()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    takes_dir = any(p.kind == inspect.Parameter.VAR_POSITIONAL or p.kind in positional for p in parameters)
    if takes_dir:
        load(version_dir)
    else:
        load()
