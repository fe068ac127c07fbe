"""TorchScript models (``model.pt``) on CPU or one CUDA GPU.

TorchScript keeps no reliable record of tensor names or datatypes, so model.yaml declares
them: ``forward`` takes the inputs positionally in the declared order and returns a tensor,
a tuple/list matched in order to the declared outputs, or a dict by output name.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dhow.core.errors import ModelFault, ModelLoadError
from dhow.core.model_config import ModelConfig, TensorSpec
from dhow.runtimes.loading import (
    Signature,
    check_rows,
    decrypted,
    find_artifact,
    load_failure,
    require_declared,
    threads_for,
)

log = logging.getLogger("dhow.runtimes.torch")

# torch.jit's and torch.cuda's functions carry no annotations; strict mypy would refuse every call
_jit: Any = torch.jit
_cuda: Any = torch.cuda

_PRECISIONS: dict[str, Any] = {"fp16": torch.float16, "bf16": torch.bfloat16}

_TORCH_DTYPES: dict[np.dtype, Any] = {
    np.dtype(np.bool_): torch.bool,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}

# torch.set_num_threads is process-wide: the first CPU model sizes it, later ones only when they ask
_threads_sized = False


class TorchRuntime:
    device: str = "cpu"

    def __init__(self) -> None:
        self._module: Any = None
        self._config: ModelConfig | None = None
        self._signature: Signature = ((), ())
        #: floating-point inputs are cast to this before the call (None: left as they come)
        self._dtype: Any = None
        #: on cuda: this instance's own stream, so that several instances on one GPU overlap
        self._stream: Any = None
        #: on cuda: page-locked staging tensors per input, reused across batches and grown when one is larger
        self._staging: dict[str, Any] = {}

    def load(self, version_dir: Path, config: ModelConfig) -> None:
        self._signature = require_declared(config, "torch")
        for spec in (*self._signature[0], *self._signature[1]):
            if spec.datatype == "BYTES":
                raise ModelLoadError(f"{config.name}/model.yaml: '{spec.name}' is BYTES, which torch has no tensor for")
        path = find_artifact(version_dir, config, "model.pt")
        plaintext = decrypted(path)
        self.device = _device(config)
        if self.device == "cpu":
            _size_threads(config)
        try:
            source = str(path) if plaintext is None else io.BytesIO(plaintext)
            module = _jit.load(source, map_location=self.device)
        except Exception as exc:
            raise load_failure(config, path, exc) from None
        _check_arguments(config, module, path)
        module.eval()
        if config.precision in _PRECISIONS:
            if self.device == "cpu":
                log.warning("%s: precision %s applies on cuda only; weights stay fp32", config.name, config.precision)
            else:
                self._dtype = _PRECISIONS[config.precision]
                module = module.to(self._dtype)
        if self.device != "cpu":
            self._stream = _cuda.Stream(device=self.device)
            # loading and casting the weights ran on the default stream; this one must not start before them
            self._stream.wait_stream(_cuda.current_stream(self.device))
        self._module, self._config = module, config

    def signature(self) -> Signature:
        return self._signature

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        module, config = self._module, self._config
        if module is None or config is None:
            raise ModelFault("the torch model is not loaded")
        declared = {spec.name: spec for spec in self._signature[1]}
        stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with torch.inference_mode(), stream:
            args = [
                self._tensor(spec.name, inputs[spec.name]) if spec.name in inputs else None
                for spec in self._signature[0]
            ]
            try:
                result = module(*args)
            except Exception as exc:
                raise ModelFault(f"model {config.name} raised {type(exc).__name__}: {exc}") from exc
            produced = _by_name(config.name, result, self._signature[1])
            missing = [name for name in outputs if name not in produced]
            if missing:
                raise ModelFault(f"model {config.name} returned no output {', '.join(map(repr, missing))}")
            results = {name: _array(config.name, produced[name], declared[name]) for name in outputs}
        check_rows(config, inputs, results)
        return results

    def _tensor(self, name: str, array: np.ndarray) -> Any:
        if self.device == "cpu":
            # request arrays are often read-only views of the wire buffer; torch wants to own writable memory
            tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
        else:
            # one copy into page-locked memory lets the host-to-GPU transfer run asynchronously
            host = self._pinned(name, array)
            host.numpy()[...] = array
            tensor = host.to(self.device, non_blocking=True)
        if self._dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self._dtype)
        return tensor

    def _pinned(self, name: str, array: np.ndarray) -> Any:
        """A page-locked view shaped like ``array``: allocating pinned memory per batch costs more than the copy.

        Reusing it is safe because ``infer`` returns only after its outputs came back to the host, which
        waits on this instance's stream, and so on the transfer from the buffer; one thread runs an instance.
        """
        dtype = _TORCH_DTYPES[array.dtype]
        buffer = self._staging.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < array.size:
            capacity = max(array.size, 2 * buffer.numel() if buffer is not None and buffer.dtype == dtype else 0)
            buffer = self._staging[name] = torch.empty(capacity, dtype=dtype, pin_memory=True)
        return buffer[: array.size].view(array.shape)

    def unload(self) -> None:
        self._module = None
        self._staging.clear()
        self._stream = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _device(config: ModelConfig) -> str:
    if not config.device.startswith("cuda"):
        return "cpu"
    if not torch.cuda.is_available():
        raise ModelLoadError(
            f"{config.name}/model.yaml asks for device {config.device}, but torch {torch.__version__} sees no "
            "CUDA GPU; set device: cpu or run where a GPU and a CUDA build of torch are present"
        )
    index = int(config.device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ModelLoadError(
            f"{config.name}/model.yaml asks for device {config.device}, but only {torch.cuda.device_count()} "
            "GPU(s) are visible"
        )
    return f"cuda:{index}"


def _check_arguments(config: ModelConfig, module: Any, path: Path) -> None:
    """The one thing TorchScript does say of its signature: how many tensors ``forward`` takes, and their names.
    Declared inputs are passed positionally, so too many or too few would fail every request."""
    schema = getattr(getattr(module, "forward", None), "schema", None)
    if schema is None:
        return
    arguments = list(schema.arguments)[1:]  # the first is the module itself
    required = [argument for argument in arguments if not argument.has_default_value()]
    declared = [spec.name for spec in config.inputs or ()]
    if len(required) <= len(declared) <= len(arguments):
        return
    takes = str(len(required)) if len(required) == len(arguments) else f"{len(required)} to {len(arguments)}"
    names = ", ".join(argument.name for argument in arguments)
    raise ModelLoadError(
        f"{config.name}/model.yaml: inputs lists {len(declared)} ({', '.join(declared)}), but the forward of "
        f"{path.name} takes {takes} ({names}); declare one input per argument, in order"
    )


def _size_threads(config: ModelConfig) -> None:
    global _threads_sized
    if config.threads > 0 or not _threads_sized:
        torch.set_num_threads(threads_for(config))
        _threads_sized = True


def _by_name(model: str, result: Any, specs: tuple[TensorSpec, ...]) -> dict[str, Any]:
    if isinstance(result, dict):
        return dict(result)
    values = [result] if isinstance(result, torch.Tensor) else result
    if not isinstance(values, (list, tuple)) or len(values) != len(specs):
        count = len(values) if isinstance(values, (list, tuple)) else type(result).__name__
        raise ModelFault(f"model {model} returned {count} values, but model.yaml declares {len(specs)} outputs")
    return {spec.name: value for spec, value in zip(specs, values, strict=True)}


def _array(model: str, value: Any, spec: TensorSpec) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        raise ModelFault(f"model {model}: output '{spec.name}' is a {type(value).__name__}, not a tensor")
    tensor = value.detach()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        # reduced precision is a compute choice; clients get what model.yaml declares (numpy has no bfloat16)
        tensor = tensor.to(torch.float16 if spec.datatype == "FP16" else torch.float32)
    array: np.ndarray = tensor.cpu().numpy()
    return array
