"""The README's rollout walkthrough ("Rollouts" → "A walkthrough"), run as written against a real server.

The commands are read from the README's code block, not copied here, so the README cannot drift from what
works. Only what ties them to this machine changes, each substitution checked to apply exactly once: the
virtualenv's activation becomes a ``dhow`` function running this checkout, the ``DHOW_KEY`` placeholder
becomes the key the server printed at its first start (as ``make run``'s does), and ``127.0.0.1:8080`` the
test server's address. The block runs in bash, stopping at the first command that fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import dhow
from tests.conftest import IN_CI, DhowProcess, start_dhow

README = Path(__file__).resolve().parent.parent / "README.md"
ACTIVATE = "source .venv/bin/activate      # or call .venv/bin/dhow"
KEY_PLACEHOLDER = "export DHOW_KEY=dhow_..."
README_ADDRESS = "127.0.0.1:8080"
#: a p99 of tabular's primary past this (it answers in about 1 ms) means the server was starved of CPU
STARVED_P99_MS = 20.0
#: the first-start banner's key, as the server prints it on standard output
FIRST_KEY = re.compile(r"^\s+(dhow_[0-9a-f]{12}_[A-Za-z0-9_-]+)\s*$", re.MULTILINE)


def walkthrough_block(readme: str) -> str:
    """The first ``sh`` code block after the heading "### A walkthrough"."""
    _, heading, section = readme.partition("\n### A walkthrough\n")
    assert heading, "README.md has no '### A walkthrough' section"
    _, fence, rest = section.partition("```sh\n")
    assert fence, "the walkthrough section has no ```sh block"
    block, closed, _ = rest.partition("\n```")
    assert closed, "the walkthrough's code block is not closed"
    return block


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the walkthrough should hold {old!r} once, as this test expects"
    return text.replace(old, new)


def runnable(block: str, key: str, address: str) -> str:
    """The block with this machine's specifics in, and nothing else changed."""
    script = _replace_once(block, ACTIVATE, 'dhow() { "$DHOW_PYTHON" -m dhow.cli "$@"; }')
    script = _replace_once(script, KEY_PLACEHOLDER, f"export DHOW_KEY={key}")
    assert README_ADDRESS in script
    return script.replace(README_ADDRESS, address)


def _tools_or_skip() -> None:
    missing = [tool for tool in ("bash", "curl", "grep", "seq") if shutil.which(tool) is None]
    if missing:
        message = f"the walkthrough needs {', '.join(missing)}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def _admin(server: DhowProcess, key: str, what: str) -> list[dict[str, Any]]:
    """The tabular deployment's ``history`` or ``events``."""
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/admin/deployments/tabular/{what}", headers={"Authorization": f"Bearer {key}"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())[what]  # type: ignore[no-any-return]


def _skip_if_starved(events: list[dict[str, Any]]) -> None:
    """A p99 guard is right to roll back when the machine starves the server of CPU: the tail latencies of
    two versions then differ by chance. tabular answers in about a millisecond; a primary whose own p99 is
    past ``STARVED_P99_MS`` says the machine, not the walkthrough, decided (CI's runners are not so loaded)."""
    for event in events:
        details = event["details"]
        primary_p99 = (details.get("primary") or {}).get("p99_ms") or 0.0
        if event["kind"] == "rollback" and details.get("guard") == "max_p99_ratio" and primary_p99 > STARVED_P99_MS:
            message = f"the machine is too loaded to judge latencies (the primary's p99 is {primary_p99} ms)"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)


def test_the_readme_canary_walkthrough_promotes_as_written(demo_repository: Path, tmp_path: Path) -> None:
    _tools_or_skip()
    server = start_dhow(demo_repository, tmp_path, "--auth", "on")  # as make run serves: keys needed
    try:
        found = FIRST_KEY.search(server.log())
        assert found, f"the server printed no first-start key:\n{server.log()}"
        key = found.group(1)
        script = runnable(walkthrough_block(README.read_text(encoding="utf-8")), key, server.http_url)
        environment = {
            **os.environ,
            "DHOW_PYTHON": sys.executable,
            # the dhow under test, wherever the walkthrough runs from
            "PYTHONPATH": str(Path(dhow.__file__).resolve().parent.parent),
            "DHOW_URL": f"http://{server.http_url}",  # the CLI's default is the README's 127.0.0.1:8080
            "USER": "walker",
        }
        done = subprocess.run(
            ["bash", "-e", "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=540
        )
        assert done.returncode == 0, f"the walkthrough stopped:\n{done.stdout}\n{done.stderr}"
        rows, events = _admin(server, key, "history"), _admin(server, key, "events")
    finally:
        assert server.stop() == 0, server.log()
    automatic = [row for row in rows if row["actor"] == "dhow-analysis"]
    assert automatic, f"the analysis made no decision:\n{done.stdout}"
    _skip_if_starved(events)
    decisions = [f"{row['action']} at step {row['before']['step']}: {row['reason']}" for row in automatic]
    assert all(row["action"] == "promote" for row in automatic), f"{decisions}\n{done.stdout}"
    # it promoted step by step, once a step, to the end
    steps = automatic[0]["before"]["steps"]
    assert len(automatic) == len(steps) and automatic[-1]["after"]["state"] == "promoted"
    # then every later command of the walkthrough ran, the last one printing the history
    assert rows[-1]["action"] == "release" and "release" in done.stdout.splitlines()[-1]
