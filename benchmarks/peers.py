"""Install the peers the serving benchmark compares against, once, into ignored folders.

    .venv/bin/python benchmarks/peers.py

- ``benchmarks/.peers/mlserver-venv``: Seldon MLServer 1.7.1 with its scikit-learn runtime, ONNX Runtime
  (for our custom runtime, ``mlserver_onnx.py``) and ``uvloop==0.21.0`` (its parallel workers need it);
  numpy and scikit-learn pinned to the versions of our own environment, so that the joblib file our
  builder writes loads the same estimator there.
- ``benchmarks/.peers/triton-venv``: ``tritonclient[all]==2.51.0``, whose wheel carries a ``perf_analyzer``
  binary that runs on glibc 2.36 (newer wheels need 2.38), and ``nvidia-cuda-runtime-cu12`` for the
  ``libcudart.so.12`` it links (no GPU is used). Kept apart from ``.venv`` so that its grpcio and protobuf
  pins never touch dhow's.
- Debian's ``libb64-0d`` (perf_analyzer links ``libb64.so.0d``), through apt-get when missing.

Each virtualenv records what it was installed with in a stamp file; a run whose requirements match the
stamp does nothing, so ``run.py`` calls this on every start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

PEERS = Path(__file__).resolve().parent / ".peers"
MLSERVER_VENV = PEERS / "mlserver-venv"
TRITON_VENV = PEERS / "triton-venv"
STAMP = ".requirements"


def mlserver_requirements() -> list[str]:
    return [
        "mlserver==1.7.1",
        "mlserver-sklearn==1.7.1",
        f"onnxruntime=={version('onnxruntime')}",
        "uvloop==0.21.0",
        f"numpy=={version('numpy')}",
        f"scikit-learn=={version('scikit-learn')}",
        f"joblib=={version('joblib')}",
    ]


TRITON_REQUIREMENTS = ["tritonclient[all]==2.51.0", "nvidia-cuda-runtime-cu12"]


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    env: dict[str, str]

    def command(self, *args: str) -> list[str]:
        return [str(self.binary), *args]


def ensure_venv(venv: Path, requirements: list[str]) -> Path:
    """Create ``venv`` with ``requirements`` unless its stamp already lists them; answer its python."""
    python = venv / "bin" / "python"
    stamp = venv / STAMP
    wanted = "\n".join(requirements) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text(encoding="utf-8") == wanted:
        return python
    print(f"installing {' '.join(requirements)} into {venv} (once)", file=sys.stderr, flush=True)
    if venv.exists():
        shutil.rmtree(venv)
    # the system interpreter, not ours: a virtualenv made from a virtualenv's python is fragile
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *requirements], check=True)
    stamp.write_text(wanted, encoding="utf-8")
    return python


def ensure_libb64() -> None:
    listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    if "libb64.so.0d" in listing:
        return
    print("installing libb64-0d with apt-get (perf_analyzer links it)", file=sys.stderr, flush=True)
    apt = ["apt-get", "-q", "-y"] if os.geteuid() == 0 else ["sudo", "apt-get", "-q", "-y"]
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run([*apt, "install", "libb64-0d"], env=environment).returncode != 0:
        subprocess.run([*apt, "update"], env=environment, check=True)
        subprocess.run([*apt, "install", "libb64-0d"], env=environment, check=True)


def ensure_mlserver() -> Path:
    """The MLServer virtualenv's ``bin`` folder (``mlserver`` lives there)."""
    return ensure_venv(MLSERVER_VENV, mlserver_requirements()).parent


def ensure_perf_analyzer() -> PerfAnalyzer:
    python = ensure_venv(TRITON_VENV, TRITON_REQUIREMENTS)
    ensure_libb64()
    binary = python.parent / "perf_analyzer"
    if not binary.exists():
        raise SystemExit(f"{binary} is missing: the tritonclient==2.51.0 wheel should have installed it")
    site = next((TRITON_VENV / "lib").glob("python3*/site-packages"))
    cudart = site / "nvidia" / "cuda_runtime" / "lib"
    library_path = os.pathsep.join(filter(None, [str(cudart), os.environ.get("LD_LIBRARY_PATH", "")]))
    return PerfAnalyzer(binary, {**os.environ, "LD_LIBRARY_PATH": library_path})


def main() -> None:
    print(ensure_mlserver() / "mlserver")
    analyzer = ensure_perf_analyzer()
    check = subprocess.run(analyzer.command("--help"), env=analyzer.env, capture_output=True, text=True)
    if "Usage" not in check.stdout + check.stderr and check.returncode != 0:
        raise SystemExit(f"perf_analyzer does not start: {check.stderr.strip()[-400:]}")
    print(analyzer.binary)


if __name__ == "__main__":
    main()
