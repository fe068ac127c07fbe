"""The layer contracts of pyproject.toml (`[tool.importlinter]`) hold, name every package, and can fail.

Each contract runs on its own through import-linter's command, so a broken one fails with the chains of
imports that break it (`lint-imports` in `make lint` checks them all at once).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI") == "true"
ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "dhow"
CONFIG: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
CONTRACTS: dict[str, dict[str, Any]] = {contract["id"]: contract for contract in CONFIG["contracts"]}

# Issue 11 ("One way in") fixes these; remove an entry when its contract holds (strict: a contract that
# holds while listed here fails the run, so the list cannot go stale).
BROKEN_TODAY: dict[str, str] = {}

# One import per contract that breaks it, planted as a new module in a copy of the package: the proof that
# each contract can fail (and that the command reads the code it is given).
PLANTED = {
    "layers": ("core/planted.py", "import dhow.serving"),
    "scheduling": ("scheduling/planted.py", "import dhow.registry"),
    "policies": ("governance/planted.py", "import dhow.runtimes"),
    "monitoring": ("monitoring/planted.py", "import dhow.registry"),
    "rollouts-machinery": ("rollouts/planted.py", "import dhow.scheduling"),
    "rollouts-observers": ("rollouts/planted.py", "import dhow.monitoring"),
    "doors": ("protocols/rest/planted.py", "import onnxruntime"),
    "doors-independent": ("protocols/grpc/planted.py", "import dhow.protocols.rest"),
    "side-doors": ("batch/planted.py", "import dhow.rollouts"),
    "runtimes": ("runtimes/planted.py", "import grpc"),
}

LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _require_import_linter() -> None:
    if importlib.util.find_spec("importlinter") is None:
        if IN_CI:
            pytest.fail("import-linter is not installed; CI must check the layer contracts")
        pytest.skip("import-linter is not installed; install the dev extra: pip install -e '.[dev]'")


def _lint(contract_id: str, src: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Check one contract against the `dhow` package found under `src` (first on the path)."""
    path = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))
    # COLUMNS: the report's lines are not wrapped at 80 characters
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": path}
    command = [sys.executable, "-c", LINT, str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"]
    return subprocess.run(
        [*command, "--contract", contract_id], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


def _report(result: subprocess.CompletedProcess[str]) -> str:
    """The part of the command's output that says what broke (past its banner)."""
    output = result.stdout + result.stderr
    start = output.find("Broken contracts")
    return output[start:] if start >= 0 else output


def _params() -> list[Any]:
    return [
        pytest.param(cid, marks=pytest.mark.xfail(strict=True, reason=BROKEN_TODAY[cid]))
        if cid in BROKEN_TODAY
        else cid
        for cid in CONTRACTS
    ]


@pytest.mark.parametrize("contract_id", _params())
def test_contract_holds(contract_id: str) -> None:
    _require_import_linter()
    result = _lint(contract_id, PACKAGE.parent, ROOT)
    if result.returncode != 0:
        pytest.fail(f"contract {contract_id!r} is broken:\n{_report(result)}", pytrace=False)


@pytest.mark.parametrize("contract_id", list(CONTRACTS))
def test_contract_can_fail(contract_id: str, tmp_path: Path) -> None:
    _require_import_linter()
    assert contract_id in PLANTED, f"add a planted import for the new contract {contract_id!r} to PLANTED"
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "dhow", ignore=shutil.ignore_patterns("__pycache__"))
    relative, line = PLANTED[contract_id]
    planted = src / "dhow" / relative
    planted.parent.mkdir(parents=True, exist_ok=True)
    (planted.parent / "__init__.py").touch()
    planted.write_text(line + "\n")
    result = _lint(contract_id, src, tmp_path)
    module = "dhow." + relative.removesuffix(".py").replace("/", ".")
    if result.returncode == 0 or module not in result.stdout:
        pytest.fail(f"{line!r} in {module} did not break {contract_id!r}:\n{_report(result)}", pytrace=False)


def _layer_names() -> list[tuple[str, bool]]:
    """(module, optional) for each module named in the layers contract."""
    names = []
    for layer in CONTRACTS["layers"]["layers"]:
        for name in layer.replace(":", "|").split("|"):
            name = name.strip()
            optional = name.startswith("(")
            names.append((name.strip("()"), optional))
    return names


def test_every_package_has_a_layer() -> None:
    """A new top-level package or module must take a place in the layers, or no contract checks it."""
    ours = {f"dhow.{path.stem}" for path in PACKAGE.iterdir() if path.suffix == ".py" and path.stem != "__init__"}
    ours |= {f"dhow.{path.name}" for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    named = {name for name, _ in _layer_names()}
    assert not ours - named, f"give these a layer in pyproject.toml [tool.importlinter]: {sorted(ours - named)}"
    missing = sorted(name for name, optional in _layer_names() if not optional and name not in ours)
    assert not missing, f"layers name modules that do not exist: {missing} (mark a future one optional: '(name)')"
