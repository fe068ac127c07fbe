"""`dhow rollout`: options → policy JSON, usage errors, and the HTTP exchange with a recording stand-in server."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dhow import cli
from dhow.rollouts import cli as rollout_cli
from tests.conftest import free_port

CANARY = {
    "kind": "canary",
    "primary": 1,
    "canary": 2,
    "steps": [5, 25, 50, 100],
    "step": 1,
    "guards": {"max_error_rate": 0.05, "max_p99_ratio": 2.0, "min_requests": 50},
    "auto_promote": False,
    "step_interval_s": 0,
    "state": "progressing",
}
DEPLOYMENT = {
    "name": "fraud",
    "policy": CANARY,
    "revision": 4,
    "updated_at": "2025-01-02T03:04:05.000000+00:00",
    "updated_by": "bob",
    "status": {
        "weight": 25,
        "window": {
            "primary": {"requests": 120, "errors": 1, "p99_ms": 12.5},
            "canary": {"requests": 40, "errors": 0, "p99_ms": 15.25},
        },
    },
}
PINNED = {
    "name": "fraud",
    "policy": {"kind": "pinned", "version": 2},
    "revision": 5,
    "updated_at": "2025-01-02T04:00:00+00:00",
    "updated_by": "alice",
    "status": {},
}
STALE = "deployment 'fraud' is at revision 4, not 3: read it again and retry"


# -- a recording stand-in for the admin API ------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeDhow:
    """Answers canned JSON per (method, path) and records every request it was sent."""

    url: str = ""
    answers: dict[tuple[str, str], tuple[int, bytes]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)

    def answer(self, method: str, path: str, status: int, body: Any) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answers[(method, path)] = (status, raw)


def _handler(fake: FakeDhow) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            fake.requests.append(
                Recorded(
                    self.command,
                    self.path,
                    {name.lower(): value for name, value in self.headers.items()},
                    json.loads(raw) if raw else None,
                )
            )
            status, body = fake.answers.get(
                (self.command, self.path), (404, json.dumps({"error": f"no route for {self.path}"}).encode())
            )
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_DELETE = _handle

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDhow]:
    for variable in (
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "DHOW_URL",
        "DHOW_ACTOR",
    ):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("USER", "alice")
    state = FakeDhow()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


def _rollout(fake: FakeDhow, *args: str) -> int:
    return cli.main(["rollout", *args, "--url", fake.url])


# -- options → policy JSON -----------------------------------------------------------------


def _parse(*args: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dhow")
    commands = parser.add_subparsers(dest="command", required=True)
    rollout_cli.add_parser(commands)
    return parser.parse_args(["rollout", *args])


@pytest.mark.parametrize(
    ("args", "policy"),
    [
        (("pin", "fraud", "3"), {"kind": "pinned", "version": 3}),
        (("canary", "fraud", "--primary", "1", "--canary", "2"), {"kind": "canary", "primary": 1, "canary": 2}),
        (
            (
                "canary", "fraud", "--primary", "1", "--canary", "2", "--steps", "10, 50,100", "--auto-promote",
                "--step-interval", "30", "--max-error-rate", "0.01", "--max-p99-ratio", "1.5", "--min-requests", "200",
            ),
            {
                "kind": "canary", "primary": 1, "canary": 2, "steps": [10, 50, 100], "auto_promote": True,
                "step_interval_s": 30.0,
                "guards": {"max_error_rate": 0.01, "max_p99_ratio": 1.5, "min_requests": 200},
            },
        ),
        (
            ("canary", "fraud", "--primary", "1", "--canary", "2", "--no-auto-promote", "--min-requests", "10"),
            {"kind": "canary", "primary": 1, "canary": 2, "auto_promote": False, "guards": {"min_requests": 10}},
        ),
        (
            ("ab", "fraud", "--variant", "a=1:70", "--variant", "b=2:30"),
            {
                "kind": "ab",
                "variants": [{"name": "a", "version": 1, "weight": 70}, {"name": "b", "version": 2, "weight": 30}],
            },
        ),
        (
            ("ab", "fraud", "--variant", "old=1:50", "--variant", "new=3:50", "--key", "session"),
            {
                "kind": "ab",
                "variants": [{"name": "old", "version": 1, "weight": 50}, {"name": "new", "version": 3, "weight": 50}],
                "sticky_key": "session",
            },
        ),
        (("shadow", "fraud", "--primary", "1", "--shadow", "2"), {"kind": "shadow", "primary": 1, "shadow": 2}),
        (
            ("shadow", "fraud", "--primary", "1", "--shadow", "2", "--sample", "0.25"),
            {"kind": "shadow", "primary": 1, "shadow": 2, "sample": 0.25},
        ),
        (
            ("shadow", "fraud", "--primary", "1", "--shadow", "2", "--compare", "probabilities=label",
             "--tolerance", "scores=0.01,0.001", "--tolerance", "logits=0.1"),
            {"kind": "shadow", "primary": 1, "shadow": 2, "compare": {"probabilities": "label"},
             "tolerances": {"scores": {"rtol": 0.01, "atol": 0.001}, "logits": {"rtol": 0.1}}},
        ),
        (("bluegreen", "fraud", "--blue", "1", "--green", "2"), {"kind": "bluegreen", "blue": 1, "green": 2}),
        (
            ("bluegreen", "fraud", "--blue", "1", "--green", "2", "--active", "green"),
            {"kind": "bluegreen", "blue": 1, "green": 2, "active": "green"},
        ),
        (("set", "fraud", "--policy", '{"kind": "pinned", "version": 2}'), {"kind": "pinned", "version": 2}),
    ],
)  # fmt: skip
def test_options_become_the_policy_json(args: tuple[str, ...], policy: dict[str, Any]) -> None:
    assert rollout_cli.build_policy(_parse(*args)) == policy


def test_set_reads_a_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"kind": "bluegreen", "blue": 1, "green": 2}))
    args = _parse("set", "fraud", "--policy", f"@{path}")
    assert rollout_cli.build_policy(args) == {"kind": "bluegreen", "blue": 1, "green": 2}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("ab", "fraud", "--variant", "a=x:50"), "NAME=VERSION:WEIGHT"),
        (("ab", "fraud", "--variant", "a=1:half"), "VERSION and WEIGHT must be integers"),
        (("ab", "fraud", "--variant", "a=1"), "got 'a=1'"),
        (("ab", "fraud", "--variant", "=1:50"), "NAME=VERSION:WEIGHT"),
        (("ab", "fraud"), "--variant"),
        (("pin", "fraud", "two"), "a version is an integer of at least 1, got 'two'"),
        (("pin", "fraud", "1.5"), "got '1.5'"),
        (("pin", "fraud", "0"), "at least 1, got '0'"),
        (("canary", "fraud", "--primary", "1", "--canary", "2", "--steps", "5,x"), "'x' in '5,x' is not one"),
        (("canary", "fraud", "--primary", "1", "--canary", "v2"), "got 'v2'"),
        (("canary", "fraud", "--primary", "1"), "--canary"),
        (("canary", "fraud", "--primary", "1", "--canary", "2", "--max-error-rate", "nan"), "finite"),
        (("canary", "fraud", "--primary", "1", "--canary", "2", "--min-requests", "many"), "'many'"),
        (("shadow", "fraud", "--primary", "1", "--shadow", "2", "--sample", "some"), "expected a number"),
        (("bluegreen", "fraud", "--blue", "1", "--green", "2", "--active", "red"), "invalid choice"),
        (("set", "fraud", "--policy", "{kind: pinned}"), "not valid JSON"),
        (("set", "fraud", "--policy", "[1, 2]"), "a policy is a JSON object"),
        (("set", "fraud", "--policy", "@/nowhere/policy.json"), "cannot read /nowhere/policy.json"),
        (("promote", "fraud", "--revision", "three"), "got 'three'"),
        (("show",), "NAME"),
        (("explode", "fraud"), "invalid choice"),
    ],
)
def test_bad_options_are_usage_errors_before_any_request(
    fake: FakeDhow, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], fragment: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        _rollout(fake, *args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert fake.requests == []


@pytest.mark.parametrize("url", ["ftp://example.org", "http://[::1", "http://host:99999", "http://a b", "http://"])
def test_a_bad_url_is_a_usage_error(fake: FakeDhow, capsys: pytest.CaptureFixture[str], url: str) -> None:
    assert cli.main(["rollout", "list", "--url", url]) == 2
    assert "must be an http:// or https:// address" in capsys.readouterr().err
    assert fake.requests == []


def test_serve_takes_the_registry_options() -> None:
    args = cli._parser().parse_args(["serve"])
    assert args.registry is None and args.registry_poll is None
    args = cli._parser().parse_args(["serve", "--registry", "sqlite:///tmp/r.db", "--registry-poll", "0.5"])
    assert args.registry == "sqlite:///tmp/r.db" and args.registry_poll == 0.5


# -- the exchange with the server -------------------------------------------------------------

PATH = "/v2/admin/deployments/fraud"


def test_show_reads_the_deployment_and_describes_it(fake: FakeDhow, capsys: pytest.CaptureFixture[str]) -> None:
    fake.answer("GET", PATH, 200, DEPLOYMENT)
    assert _rollout(fake, "show", "fraud") == 0
    [request] = fake.requests
    assert (request.method, request.path, request.body) == ("GET", PATH, None)
    assert request.headers["x-dhow-actor"] == "alice"
    assert request.headers["content-type"] == "application/json"
    out = capsys.readouterr().out
    assert "fraud  revision 4, updated by bob at 2025-01-02T03:04:05.000000+00:00" in out
    assert (
        "canary: version 2 gets 25% (step 2 of 4), primary version 1; guards: max error rate 5%, "
        "max p99 ratio 2.0, min 50 requests; state progressing"
    ) in out
    assert "status: canary weight 25%; primary 120 requests, 1 error, p99 12.5 ms; canary 40 requests" in out


def test_json_prints_the_servers_answer(fake: FakeDhow, capsys: pytest.CaptureFixture[str]) -> None:
    fake.answer("GET", PATH, 200, DEPLOYMENT)
    assert _rollout(fake, "show", "fraud", "--json") == 0
    assert json.loads(capsys.readouterr().out) == DEPLOYMENT


def test_an_edit_reads_the_current_revision_first(fake: FakeDhow, capsys: pytest.CaptureFixture[str]) -> None:
    fake.answer("GET", PATH, 200, DEPLOYMENT)
    fake.answer("PUT", PATH, 200, PINNED)
    assert _rollout(fake, "pin", "fraud", "2", "--reason", "canary looked bad") == 0
    get, put = fake.requests
    assert (get.method, get.path) == ("GET", PATH)
    assert (put.method, put.path) == ("PUT", PATH)
    assert put.body == {"policy": {"kind": "pinned", "version": 2}, "revision": 4, "reason": "canary looked bad"}
    assert put.headers["x-dhow-actor"] == "alice" and put.headers["content-type"] == "application/json"
    out = capsys.readouterr().out
    assert "fraud  revision 5, updated by alice" in out and "pinned: version 2" in out


def test_an_edit_of_a_missing_deployment_creates_it_at_revision_0(fake: FakeDhow) -> None:
    fake.answer("PUT", PATH, 200, PINNED)
    args = ("ab", "fraud", "--variant", "a=1:50", "--variant", "b=2:50")
    assert _rollout(fake, *args) == 0
    get, put = fake.requests
    assert get.method == "GET"
    assert put.body["revision"] == 0 and put.body["reason"] == ""
    assert put.body["policy"]["variants"][1] == {"name": "b", "version": 2, "weight": 50}


def test_a_given_revision_is_sent_without_reading_first(fake: FakeDhow) -> None:
    fake.answer("PUT", PATH, 200, PINNED)
    assert _rollout(fake, "canary", "fraud", "--primary", "1", "--canary", "2", "--revision", "7") == 0
    [put] = fake.requests
    assert put.method == "PUT" and put.body["revision"] == 7
    assert put.body["policy"] == {"kind": "canary", "primary": 1, "canary": 2}


@pytest.mark.parametrize("action", ["promote", "rollback", "switch", "release"])
def test_actions_post_the_reason_and_the_revision_only_if_given(fake: FakeDhow, action: str) -> None:
    fake.answer("POST", f"{PATH}/{action}", 200, DEPLOYMENT)
    assert _rollout(fake, action, "fraud") == 0
    assert _rollout(fake, action, "fraud", "--revision", "4", "--reason", "looks good") == 0
    first, second = fake.requests
    assert (first.method, first.path, first.body) == ("POST", f"{PATH}/{action}", {"reason": ""})
    assert second.body == {"reason": "looks good", "revision": 4}


def test_delete_sends_the_current_revision(fake: FakeDhow, capsys: pytest.CaptureFixture[str]) -> None:
    fake.answer("GET", PATH, 200, DEPLOYMENT)
    fake.answer("DELETE", PATH, 200, {})
    assert _rollout(fake, "delete", "fraud", "--reason", "done") == 0
    get, delete = fake.requests
    assert get.method == "GET"
    assert (delete.method, delete.body) == ("DELETE", {"revision": 4, "reason": "done"})
    assert "deleted fraud (it was at revision 4)" in capsys.readouterr().out


def test_deleting_a_missing_deployment_says_so(fake: FakeDhow, capsys: pytest.CaptureFixture[str]) -> None:
    fake.answer("GET", PATH, 404, {"error": "no deployment 'fraud'"})
    assert _rollout(fake, "delete", "fraud") == 1
    assert [r.method for r in fake.requests] == ["GET"]
    assert capsys.readouterr().err == "dhow: no deployment 'fraud' (HTTP 404)\n"


def test_a_stale_revision_exits_1_with_the_servers_message(fake: FakeDhow, capsys: pytest.CaptureFixture[str]) -> None:
    fake.answer("PUT", PATH, 409, {"error": STALE})
    assert _rollout(fake, "pin", "fraud", "2", "--revision", "3") == 1
    captured = capsys.readouterr()
    assert captured.err == f"dhow: {STALE} (HTTP 409)\n" and captured.out == ""


def test_an_error_that_is_not_json_is_shown_as_text(fake: FakeDhow, capsys: pytest.CaptureFixture[str]) -> None:
    fake.answer("GET", PATH, 502, b"bad gateway")
    assert _rollout(fake, "show", "fraud") == 1
    assert capsys.readouterr().err == "dhow: bad gateway (HTTP 502)\n"


def test_an_unreachable_server_exits_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    url = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["rollout", "pin", "fraud", "2", "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dhow: cannot reach dhow at {url}: ") and "refused" in err.lower()


def test_the_url_and_actor_have_fallbacks(
    fake: FakeDhow, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.answer("GET", "/v2/admin/deployments", 200, {"deployments": []})
    monkeypatch.setenv("DHOW_URL", fake.url + "/")
    monkeypatch.delenv("USER")

    def nobody() -> str:
        raise OSError("no user name")

    monkeypatch.setattr("getpass.getuser", nobody)
    assert cli.main(["rollout", "list"]) == 0
    assert fake.requests[0].headers["x-dhow-actor"] == "anonymous"
    assert capsys.readouterr().out == "no deployments\n"


def test_the_actor_is_resolved_like_every_commands(
    fake: FakeDhow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.answer("GET", PATH, 200, DEPLOYMENT)
    monkeypatch.delenv("DHOW_ACTOR", raising=False)
    config = tmp_path / "dhow.yaml"
    config.write_text("actor: release-bot\n")
    assert _rollout(fake, "show", "fraud", "--config", str(config)) == 0
    monkeypatch.setenv("DHOW_ACTOR", "ci")
    assert _rollout(fake, "show", "fraud", "--config", str(config)) == 0
    assert [request.headers["x-dhow-actor"] for request in fake.requests] == ["release-bot", "ci"]


def test_names_are_quoted_in_the_path(fake: FakeDhow) -> None:
    _rollout(fake, "show", "a b")
    assert fake.requests[0].path == "/v2/admin/deployments/a%20b"


def test_list_prints_a_line_per_deployment(fake: FakeDhow, capsys: pytest.CaptureFixture[str]) -> None:
    churn = {**PINNED, "name": "churn", "policy": {"kind": "bluegreen", "blue": 1, "green": 2, "active": "green"}}
    fake.answer("GET", "/v2/admin/deployments", 200, {"deployments": [DEPLOYMENT, churn]})
    assert _rollout(fake, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("fraud  rev 4  canary: version 2 gets 25%")
    assert lines[1].startswith("churn  rev 5  bluegreen: blue version 1, green version 2 (active)")
    assert lines[1].endswith("(updated by alice at 2025-01-02T04:00:00+00:00)")


def test_history_prints_before_and_after(fake: FakeDhow, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        {
            "name": "fraud", "revision": 1, "at": "2025-01-01T00:00:00+00:00", "actor": "alice",
            "action": "create", "reason": "", "before": None, "after": {"kind": "pinned", "version": 1},
        },
        {
            "name": "fraud", "revision": 2, "at": "2025-01-01T01:00:00+00:00", "actor": "bob", "action": "edit",
            "reason": "try v2", "before": {"kind": "pinned", "version": 1},
            "after": {"kind": "shadow", "primary": 1, "shadow": 2, "sample": 0.5},
        },
    ]  # fmt: skip
    fake.answer("GET", f"{PATH}/history", 200, {"history": rows})
    assert _rollout(fake, "history", "fraud") == 0
    assert capsys.readouterr().out.splitlines() == [
        "rev 1  2025-01-01T00:00:00+00:00  alice  create  -  none → pinned: version 1",
        'rev 2  2025-01-01T01:00:00+00:00  bob  edit  "try v2"  pinned: version 1 → '
        "shadow: version 1 answers, 50% copied to version 2",
    ]


def test_events_print_their_figures(fake: FakeDhow, capsys: pytest.CaptureFixture[str]) -> None:
    event = {
        "name": "fraud",
        "at": "2025-01-01T02:00:00+00:00",
        "kind": "rollback",
        "details": {
            "reason": "guard max_error_rate breached",
            "canary": {"requests": 60, "errors": 12, "p99_ms": 3.0},
            "error_rate": 0.2,
            "weight": 25,
            "guard": "max_error_rate",
        },
    }
    fake.answer("GET", f"{PATH}/events", 200, {"events": [event]})
    assert _rollout(fake, "events", "fraud") == 0
    assert capsys.readouterr().out == (
        '2025-01-01T02:00:00+00:00  rollback  "guard max_error_rate breached"  '
        "canary 60 requests, 12 errors, p99 3 ms; error rate 20%; weight 25%; guard=max_error_rate\n"
    )


def test_shadow_status_and_odd_policies_never_break_the_output(
    fake: FakeDhow, capsys: pytest.CaptureFixture[str]
) -> None:
    shadow = {
        **PINNED,
        "policy": {"kind": "shadow", "primary": 1, "shadow": 2, "sample": 1.0},
        "status": {
            "shadow": {
                "requests": 10, "agreed": 9, "disagreed": 1, "errors": 0, "dropped": 0, "agreement_rate": 0.9,
                "mean_abs_difference": 0.00123, "primary_p99_ms": 3.1, "shadow_p99_ms": 3.4,
            }
        },
    }  # fmt: skip
    fake.answer("GET", PATH, 200, shadow)
    assert _rollout(fake, "show", "fraud") == 0
    out = capsys.readouterr().out
    assert "shadow: version 1 answers, 100% copied to version 2" in out
    assert "status: 10 requests compared, 9 agreed, 1 disagreed, 0 errors, 0 dropped; agreement 90%" in out
    assert "p99 primary 3.1 ms, shadow 3.4 ms" in out

    fake.answer("GET", PATH, 200, {**PINNED, "policy": {"kind": "future", "x": 1}, "status": {"a": {"b": 2}}})
    assert _rollout(fake, "show", "fraud") == 0
    out = capsys.readouterr().out
    assert '{"kind":"future","x":1}' in out and "status: a.b=2" in out


def test_the_command_explains_itself_and_never_shows_a_traceback() -> None:
    proxies = {"http_proxy", "https_proxy", "all_proxy", "dhow_url"}
    env = {name: value for name, value in os.environ.items() if name.lower() not in proxies}

    def dhow(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dhow.cli", *args], capture_output=True, text=True, timeout=60, check=False, env=env
        )

    assert "manage deployments" in dhow("--help").stdout
    assert "--registry-poll" in dhow("serve", "--help").stdout
    done = dhow("rollout", "--help")
    assert done.returncode == 0
    assert all(action in done.stdout for action in ("canary", "bluegreen", "history", "events", "release"))
    done = dhow("rollout", "canary", "--help")
    assert "--max-p99-ratio" in done.stdout and "--reason" in done.stdout and "--url" in done.stdout
    done = dhow("rollout", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 2 and "cannot reach dhow" in done.stderr and "Traceback" not in done.stderr


def test_a_terminal_without_unicode_gets_ascii(fake: FakeDhow, monkeypatch: pytest.MonkeyPatch) -> None:
    row = {"revision": 1, "at": "t", "actor": "zoë", "action": "create", "reason": "", "before": None, "after": None}
    fake.answer("GET", f"{PATH}/history", 200, {"history": [row]})
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert _rollout(fake, "history", "fraud") == 0
    stdout.flush()
    assert stdout.buffer.getvalue() == b"rev 1  t  zo?  create  -  none -> none\n"
