"""The images: both Dockerfiles pass hadolint and hold what the issue asks; `make image` says so without an engine.

No image is built here (no container engine runs on this machine); what a build would need is checked instead: every
file a COPY takes exists and is in the build context, the final stage has no compiler, runs as a non-root user and
checks dhow's readiness.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from dhow.protocols.routes import ROUTES
from dhow.settings import ServerSettings
from tests.conftest import free_port, start_dhow

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
COMPILERS = ("build-essential", "gcc", "g++", "clang", "python3-dev", "python-dev", "make", "cmake", "cargo", "rustc")


@dataclass
class Instruction:
    name: str
    args: str


def instructions(dockerfile: Path) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments and parser directives left out."""
    joined = re.sub(r"\\\n", " ", dockerfile.read_text())
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, args = line.partition(" ")
            found.append(Instruction(name.upper(), args.strip()))
    return found


def stages(dockerfile: Path) -> list[list[Instruction]]:
    split: list[list[Instruction]] = []
    for instruction in instructions(dockerfile):
        if instruction.name == "FROM":
            split.append([])
        if split:
            split[-1].append(instruction)
    return split


def context_excludes(path: str) -> bool:
    """Whether .dockerignore leaves ``path`` out of the build context (its last matching rule wins)."""
    excluded = False
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negated = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            excluded = not negated
    return excluded


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name: str) -> None:
    result = subprocess.run(
        [HADOLINT, "--format", "json", "--failure-threshold", "style", str(ROOT / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, json.dumps(json.loads(result.stdout or "[]"), indent=1) + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_multi_stage_non_root_no_compilers_and_a_readiness_healthcheck(name: str) -> None:
    *builds, final = stages(ROOT / name)
    assert builds, "a build stage before the final one"
    assert any(" AS " in stage[0].args.upper() for stage in builds)
    final_runs = " ".join(i.args for i in final if i.name == "RUN")
    for compiler in COMPILERS:
        assert not re.search(rf"(^|\s){re.escape(compiler)}(\s|$)", final_runs), f"{compiler} in the final stage"
    (user,) = [i.args for i in final if i.name == "USER"]
    assert user.split(":")[0] not in ("root", "0"), user
    (healthcheck,) = [i.args for i in final if i.name == "HEALTHCHECK"]
    ready = next(route.path for route in ROUTES if route.name == "server_ready")
    assert ready in healthcheck
    assert [i.args.split()[0] for i in final if i.name == "COPY"] == ["--from=build"], "only the build's virtualenv"
    exposed = {int(port) for i in final if i.name == "EXPOSE" for port in i.args.split()}
    assert exposed == {ServerSettings().http_port, ServerSettings().grpc_port}
    (entrypoint,) = [json.loads(i.args) for i in final if i.name == "ENTRYPOINT"]
    assert entrypoint == ["dhow"]


def test_the_cpu_image_is_slim() -> None:
    args = {i.args.split("=")[0]: i.args.split("=", 1)[1] for i in instructions(ROOT / "Dockerfile") if i.name == "ARG"}
    assert "slim" in args["PYTHON_IMAGE"]
    assert stages(ROOT / "Dockerfile")[-1][0].args == "${PYTHON_IMAGE}"


def test_the_cuda_image_has_cuda_builds_of_the_runtimes() -> None:
    text = (ROOT / "Dockerfile.cuda").read_text()
    assert "nvidia/cuda:" in text and "cudnn-runtime" in text
    assert "onnxruntime-gpu" in text and "torch" in text


@pytest.mark.parametrize("name", DOCKERFILES)
def test_what_each_copy_takes_exists_and_is_in_the_build_context(name: str) -> None:
    for instruction in instructions(ROOT / name):
        if instruction.name != "COPY" or instruction.args.startswith("--from"):
            continue
        *sources, _destination = instruction.args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file"
            assert not context_excludes(source.rstrip("/")), f"{name}: COPY {source}: left out by .dockerignore"
    assert context_excludes(".venv") and context_excludes("tests") and context_excludes(".git")


def test_make_image_says_clearly_that_no_engine_runs_here() -> None:
    engines = [e for e in ("docker", "podman") if shutil.which(e)]
    for engine in engines:
        if subprocess.run([engine, "info"], capture_output=True, timeout=60).returncode == 0:
            pytest.skip(f"{engine} runs here: `make image` would build the images (minutes); nothing to refuse")
    result = subprocess.run(["make", "image"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no container engine is running here" in result.stderr
    assert "no image was built" in result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_healthcheck_command_tells_a_ready_server_from_none(name: str, tmp_path: Path) -> None:
    """The HEALTHCHECK's own command, run against a real server: 0 once ready, non-zero where nothing answers."""
    (healthcheck,) = [i.args for i in stages(ROOT / name)[-1] if i.name == "HEALTHCHECK"]
    command = json.loads(healthcheck.partition("CMD ")[2])
    command[0] = sys.executable  # the image's python, here this virtualenv's
    (tmp_path / "models").mkdir()
    server = start_dhow(tmp_path / "models", tmp_path)
    try:
        ready = subprocess.run(command, env={"DHOW_HTTP_PORT": str(server.http_port)}, timeout=30)
        assert ready.returncode == 0
    finally:
        assert server.stop() == 0, server.log()
    nobody = subprocess.run(command, env={"DHOW_HTTP_PORT": str(free_port())}, capture_output=True, timeout=30)
    assert nobody.returncode != 0
