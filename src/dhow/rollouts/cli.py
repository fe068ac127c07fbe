"""``dhow rollout``: manage deployments and their traffic policies through the admin REST API.

Talks HTTP with the standard library only. Exit status: 0 on success, 1 when the server refused
(its message is printed), 2 on a usage error or when the server cannot be reached.
"""

from __future__ import annotations

import argparse
import getpass
import http.client
import json
import math
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_URL", "add_parser", "build_policy", "describe_policy", "run"]

DEFAULT_URL = "http://127.0.0.1:8080"
#: seconds a request may wait for the server (an edit may load model versions before it answers)
TIMEOUT_S = 300.0
_ADMIN = "/v2/admin/deployments"
_SHAPING = ("pin", "canary", "ab", "shadow", "bluegreen", "set")
_ACTIONS = {
    "promote": "canary: go to the next step (past the last one the canary is promoted)",
    "rollback": "canary: send all traffic back to the primary (weight 0, state rolled_back)",
    "switch": "blue/green: swap the active colour",
    "release": "blue/green: pin the deployment to the active version, releasing the other",
}


class UsageError(Exception):
    """A wrong value on the command line (exit 2)."""


class ServerRefused(Exception):
    """The server answered with an error status (exit 1)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Unreachable(Exception):
    """No HTTP answer came back (exit 2)."""


# -- parsing -----------------------------------------------------------------------------


def _version(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a version is an integer of at least 1, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _steps(text: str) -> list[int]:
    items = [item.strip() for item in text.split(",")]
    steps: list[int] = []
    for item in items:
        try:
            steps.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"steps are comma-separated integer percents like 5,25,50,100; {item!r} in {text!r} is not one"
            ) from None
    return steps


def _variant(text: str) -> dict[str, Any]:
    name, equals, rest = text.partition("=")
    version, colon, weight = rest.rpartition(":")
    expected = f"a variant is NAME=VERSION:WEIGHT like a=1:50, got {text!r}"
    if not equals or not colon or not name.strip():
        raise argparse.ArgumentTypeError(expected)
    try:
        return {"name": name.strip(), "version": _version(version.strip()), "weight": int(weight)}
    except (argparse.ArgumentTypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{expected} (VERSION and WEIGHT must be integers; the weights sum to 100)"
        ) from None


def _policy_argument(text: str) -> dict[str, Any]:
    source = "--policy"
    if text.startswith("@"):
        path = Path(text[1:])
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        policy = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(policy, dict):
        raise argparse.ArgumentTypeError(f"{source}: a policy is a JSON object with a 'kind'")
    return policy


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dhow rollout`` and its actions to the ``dhow`` command."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--url",
        default=None,
        help=f"the dhow server's REST address (default $DHOW_URL, else {DEFAULT_URL})",
    )
    connection.add_argument(
        "--json", dest="as_json", action="store_true", help="print the server's JSON answer instead of text"
    )
    editing = argparse.ArgumentParser(add_help=False)
    editing.add_argument("--reason", default="", metavar="TEXT", help="why, recorded in the history")
    editing.add_argument(
        "--revision",
        type=_count,
        metavar="N",
        help="the revision this edit is based on; refused (409) if the deployment has moved on "
        "(default: the current one, read first)",
    )
    both = [connection, editing]

    rollout = commands.add_parser(
        "rollout",
        help="manage deployments: which model versions answer a model's traffic",
        description="Manage deployments through a running server's admin API: pin a version, run a canary, "
        "an A/B test, a shadow or a blue/green switch, and read their history. See docs/rollouts.md.",
    )
    actions = rollout.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)

    actions.add_parser(
        "list", parents=[connection], help="list the deployments", description="List every deployment, one a line."
    )
    show = actions.add_parser(
        "show",
        parents=[connection],
        help="show a deployment",
        description="Show a deployment: its policy, revision, last change and this server's live figures.",
    )
    show.add_argument("name", metavar="NAME", help="the deployment (a model name)")

    pin = actions.add_parser(
        "pin",
        parents=both,
        help="send all traffic to one version",
        description="Pin a deployment to one version (creates the deployment if there is none).",
    )
    pin.add_argument("name", metavar="NAME", help="the deployment (a model name)")
    pin.add_argument("version", type=_version, metavar="VERSION", help="the version that answers")

    canary = actions.add_parser(
        "canary",
        parents=both,
        help="send a growing share of traffic to a new version",
        description="Start a canary: steps[step] percent of requests go to --canary, the rest to --primary. "
        "The server rolls back when a guard is breached; options left out take the server's defaults.",
    )
    canary.add_argument("name", metavar="NAME", help="the deployment (a model name)")
    canary.add_argument("--primary", type=_version, required=True, metavar="VERSION", help="the current version")
    canary.add_argument("--canary", type=_version, required=True, metavar="VERSION", help="the new version")
    canary.add_argument(
        "--steps", type=_steps, metavar="P,P,...", help="canary weights in percent, ascending (default 5,25,50,100)"
    )
    canary.add_argument(
        "--auto-promote",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="advance a step by itself while the guards hold (default off)",
    )
    canary.add_argument(
        "--step-interval",
        type=_number,
        metavar="SECONDS",
        help="least time on a step before an automatic advance (default 0)",
    )
    canary.add_argument(
        "--max-error-rate", type=_number, metavar="FRACTION", help="roll back above this canary error rate (0.05)"
    )
    canary.add_argument(
        "--max-p99-ratio", type=_number, metavar="RATIO", help="roll back above this canary/primary p99 ratio (2)"
    )
    canary.add_argument(
        "--min-p99-slack",
        type=_number,
        metavar="MS",
        help="ignore a canary p99 slower than the primary's by less than this many milliseconds (5)",
    )
    canary.add_argument(
        "--min-requests", type=_count, metavar="N", help="canary requests needed before judging a step (50)"
    )

    ab = actions.add_parser(
        "ab",
        parents=both,
        help="split traffic between versions by weight",
        description="Start an A/B test: each request key meets always the same variant while the weights hold.",
    )
    ab.add_argument("name", metavar="NAME", help="the deployment (a model name)")
    ab.add_argument(
        "--variant",
        dest="variants",
        type=_variant,
        action="append",
        required=True,
        metavar="NAME=VERSION:WEIGHT",
        help="a variant, e.g. a=1:50; repeatable, the weights sum to 100",
    )
    ab.add_argument(
        "--key",
        dest="sticky_key",
        metavar="KEY",
        help="request parameter or header that keeps a caller on one variant (default user_id)",
    )

    shadow = actions.add_parser(
        "shadow",
        parents=both,
        help="copy traffic to a version whose answers are only compared",
        description="Start a shadow: --primary answers; a copy of the requests goes to --shadow and "
        "the answers are compared (see 'dhow rollout show').",
    )
    shadow.add_argument("name", metavar="NAME", help="the deployment (a model name)")
    shadow.add_argument("--primary", type=_version, required=True, metavar="VERSION", help="the version that answers")
    shadow.add_argument("--shadow", type=_version, required=True, metavar="VERSION", help="the compared version")
    shadow.add_argument("--sample", type=_number, metavar="FRACTION", help="share of requests copied, 0-1 (default 1)")

    bluegreen = actions.add_parser(
        "bluegreen",
        parents=both,
        help="keep two versions loaded and send all traffic to one",
        description="Start a blue/green deployment: all traffic goes to the active colour; "
        "'dhow rollout switch' swaps it at once.",
    )
    bluegreen.add_argument("name", metavar="NAME", help="the deployment (a model name)")
    bluegreen.add_argument("--blue", type=_version, required=True, metavar="VERSION", help="the blue version")
    bluegreen.add_argument("--green", type=_version, required=True, metavar="VERSION", help="the green version")
    bluegreen.add_argument("--active", choices=["blue", "green"], help="the colour that answers (default blue)")

    for action, summary in _ACTIONS.items():
        parser = actions.add_parser(action, parents=both, help=summary.split(": ", 1)[1], description=summary + ".")
        parser.add_argument("name", metavar="NAME", help="the deployment (a model name)")

    set_policy = actions.add_parser(
        "set",
        parents=both,
        help="set any policy from JSON",
        description="Set a deployment's policy from a JSON object (see docs/rollouts.md for the kinds).",
    )
    set_policy.add_argument("name", metavar="NAME", help="the deployment (a model name)")
    set_policy.add_argument(
        "--policy",
        type=_policy_argument,
        required=True,
        metavar="JSON|@FILE",
        help='the policy, e.g. \'{"kind": "pinned", "version": 2}\', or @file.json',
    )

    delete = actions.add_parser(
        "delete",
        parents=both,
        help="delete a deployment",
        description="Delete a deployment: the model is served as before (its newest loaded version answers).",
    )
    delete.add_argument("name", metavar="NAME", help="the deployment (a model name)")

    history = actions.add_parser(
        "history",
        parents=[connection],
        help="list a deployment's changes",
        description="List every change of a deployment, oldest first.",
    )
    history.add_argument("name", metavar="NAME", help="the deployment (a model name)")
    events = actions.add_parser(
        "events",
        parents=[connection],
        help="list the automatic analysis's decisions",
        description="List the decisions of the automatic analysis (advances, promotions, rollbacks) with their "
        "figures, oldest first.",
    )
    events.add_argument("name", metavar="NAME", help="the deployment (a model name)")


def build_policy(args: argparse.Namespace) -> dict[str, Any]:
    """The policy JSON of a shaping command (pin, canary, ab, shadow, bluegreen, set)."""
    command = args.rollout_command
    if command == "pin":
        return {"kind": "pinned", "version": args.version}
    if command == "canary":
        policy: dict[str, Any] = {"kind": "canary", "primary": args.primary, "canary": args.canary}
        _put_given(policy, steps=args.steps, auto_promote=args.auto_promote, step_interval_s=args.step_interval)
        guards: dict[str, Any] = {}
        _put_given(
            guards,
            max_error_rate=args.max_error_rate,
            max_p99_ratio=args.max_p99_ratio,
            min_p99_slack_ms=args.min_p99_slack,
            min_requests=args.min_requests,
        )
        if guards:
            policy["guards"] = guards
        return policy
    if command == "ab":
        policy = {"kind": "ab", "variants": args.variants}
        _put_given(policy, sticky_key=args.sticky_key)
        return policy
    if command == "shadow":
        policy = {"kind": "shadow", "primary": args.primary, "shadow": args.shadow}
        _put_given(policy, sample=args.sample)
        return policy
    if command == "bluegreen":
        policy = {"kind": "bluegreen", "blue": args.blue, "green": args.green}
        _put_given(policy, active=args.active)
        return policy
    if command == "set":
        return dict(args.policy)
    raise UsageError(f"'{command}' does not set a policy")


def _put_given(target: dict[str, Any], **values: Any) -> None:
    target.update({key: value for key, value in values.items() if value is not None})


# -- HTTP --------------------------------------------------------------------------------


def _actor() -> str:
    user = os.environ.get("USER")
    if user:
        return user
    try:
        return getpass.getuser() or "anonymous"
    except Exception:  # no user name anywhere (e.g. a container without a passwd entry)
        return "anonymous"


def _base_url(given: str | None) -> str:
    url = (given or os.environ.get("DHOW_URL") or DEFAULT_URL).strip()
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urllib.parse.urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
    except ValueError:  # a malformed IPv6 address, a port out of range
        valid = False
    if not valid or any(c.isspace() for c in url):
        raise UsageError(f"--url (or DHOW_URL) must be an http:// or https:// address, got {given or url!r}")
    return url.rstrip("/")


class _Client:
    def __init__(self, url: str, actor: str) -> None:
        self.url = url
        self.headers = {"x-dhow-actor": actor, "content-type": "application/json", "accept": "application/json"}
        key = os.environ.get("DHOW_KEY", "").strip()
        if key:  # the server names the key's principal as the actor; x-dhow-actor counts only without auth
            self.headers["authorization"] = f"Bearer {key}"
        # a private CA (self-signed test certificates): DHOW_CACERT=ca.pem
        cafile = os.environ.get("DHOW_CACERT") or None
        self.context = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=self.context) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as exc:
            try:
                refusal = exc.read()
            except (OSError, http.client.HTTPException):
                refusal = b""
            finally:
                exc.close()
            raise ServerRefused(exc.code, _error_message(exc.code, refusal, exc.reason)) from None
        except urllib.error.URLError as exc:
            raise Unreachable(_reason(exc.reason)) from None
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(_reason(exc)) from None
        try:
            return json.loads(raw) if raw.strip() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ServerRefused(200, f"the answer of {method} {path} is not JSON: {raw[:200]!r}") from None

    def current_revision(self, name: str, *, missing: int | None) -> int:
        """The deployment's revision; ``missing`` when there is none (re-raise the 404 if None)."""
        try:
            deployment = self.call("GET", _path(name))
        except ServerRefused as exc:
            if exc.status == 404 and missing is not None:
                return missing
            raise
        revision = deployment.get("revision") if isinstance(deployment, dict) else None
        if not isinstance(revision, int):
            raise ServerRefused(200, f"the deployment '{name}' came back without a revision")
        return revision


def _reason(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return f"no answer in {TIMEOUT_S:g} s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _error_message(status: int, body: bytes, reason: str) -> str:
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return str(document["error"])
    text = body.decode("utf-8", "replace").strip()
    return text[:300] if text else (reason or f"HTTP error {status}")


def _path(name: str, action: str = "") -> str:
    path = f"{_ADMIN}/{urllib.parse.quote(name, safe='')}"
    return f"{path}/{action}" if action else path


# -- commands ----------------------------------------------------------------------------

#: a command: the server's answer and its human-readable form
Outcome = tuple[Any, str]


def _list(client: _Client, args: argparse.Namespace) -> Outcome:
    answer = client.call("GET", _ADMIN)
    deployments = _items(answer, "deployments")
    if not deployments:
        return answer, "no deployments"
    width = max(len(str(d.get("name", ""))) for d in deployments)
    lines = [
        f"{d.get('name', '?')!s:<{width}}  rev {d.get('revision', '?')}  {describe_policy(d.get('policy'))}"
        f"  ({_who_when(d.get('updated_by'), d.get('updated_at'))})"
        for d in deployments
    ]
    return answer, "\n".join(lines)


def _show(client: _Client, args: argparse.Namespace) -> Outcome:
    answer = client.call("GET", _path(args.name))
    return answer, describe_deployment(answer)


def _shape(client: _Client, args: argparse.Namespace) -> Outcome:
    policy = build_policy(args)
    revision = args.revision
    if revision is None:
        revision = client.current_revision(args.name, missing=0)
    answer = client.call("PUT", _path(args.name), {"policy": policy, "revision": revision, "reason": args.reason})
    return answer, describe_deployment(answer)


def _act(client: _Client, args: argparse.Namespace) -> Outcome:
    body: dict[str, Any] = {"reason": args.reason}
    if args.revision is not None:
        body["revision"] = args.revision
    answer = client.call("POST", _path(args.name, args.rollout_command), body)
    return answer, describe_deployment(answer)


def _delete(client: _Client, args: argparse.Namespace) -> Outcome:
    revision = args.revision
    if revision is None:
        revision = client.current_revision(args.name, missing=None)
    answer = client.call("DELETE", _path(args.name), {"revision": revision, "reason": args.reason})
    return answer, f"deleted {args.name} (it was at revision {revision}); its newest loaded version answers now"


def _history(client: _Client, args: argparse.Namespace) -> Outcome:
    answer = client.call("GET", _path(args.name, "history"))
    rows = _items(answer, "history")
    if not rows:
        return answer, f"{args.name}: no history"
    lines = []
    for row in rows:
        reason = row.get("reason") or ""
        quoted = f'"{reason}"' if reason else "-"
        lines.append(
            f"rev {row.get('revision', '?')}  {_when(row)}  {row.get('actor') or 'anonymous'}  "
            f"{row.get('action', '?')}  {quoted}  {describe_policy(row.get('before'))} → "
            f"{describe_policy(row.get('after'))}"
        )
    return answer, "\n".join(lines)


def _events(client: _Client, args: argparse.Namespace) -> Outcome:
    answer = client.call("GET", _path(args.name, "events"))
    events = _items(answer, "events")
    if not events:
        return answer, f"{args.name}: no events"
    return answer, "\n".join(_describe_event(event) for event in events)


_COMMANDS: dict[str, Callable[[_Client, argparse.Namespace], Outcome]] = {
    "list": _list,
    "show": _show,
    **dict.fromkeys(_SHAPING, _shape),
    **dict.fromkeys(_ACTIONS, _act),
    "delete": _delete,
    "history": _history,
    "events": _events,
}


def run(args: argparse.Namespace) -> int:
    """Run ``dhow rollout ACTION``; the exit status."""
    try:
        url = _base_url(args.url)
    except UsageError as exc:
        print(f"dhow: {exc}", file=sys.stderr)
        return 2
    try:
        answer, text = _COMMANDS[args.rollout_command](_Client(url, _actor()), args)
    except UsageError as exc:
        print(f"dhow: {exc}", file=sys.stderr)
        return 2
    except Unreachable as exc:
        print(f"dhow: cannot reach dhow at {url}: {exc}", file=sys.stderr)
        return 2
    except ServerRefused as exc:
        print(f"dhow: {exc.message} (HTTP {exc.status})", file=sys.stderr)
        return 1
    output = json.dumps(answer, indent=2, ensure_ascii=False) if args.as_json else text
    try:
        print(output)
    except UnicodeEncodeError:  # a terminal that cannot show "→" or a name's letters
        encoding = sys.stdout.encoding or "ascii"
        print(output.replace("→", "->").encode(encoding, "replace").decode(encoding))
    return 0


# -- human-readable forms ----------------------------------------------------------------


def describe_deployment(deployment: Any) -> str:
    """A deployment in a few lines: name and revision, last change, policy, live figures."""
    if not isinstance(deployment, dict):
        return json.dumps(deployment)
    lines = [
        f"{deployment.get('name', '?')}  revision {deployment.get('revision', '?')}, "
        f"{_who_when(deployment.get('updated_by'), deployment.get('updated_at'))}",
        f"  {describe_policy(deployment.get('policy'))}",
    ]
    status = deployment.get("status")
    if status:
        lines.append(f"  status: {_describe_status(status)}")
    return "\n".join(lines)


def describe_policy(policy: Any) -> str:
    """A policy in one short line, e.g. ``pinned: version 2``; ``none`` for no policy."""
    if policy is None:
        return "none"
    try:
        return _POLICY_FORMS[policy["kind"]](policy)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return json.dumps(policy, separators=(",", ":"))


def _pinned(policy: dict[str, Any]) -> str:
    return f"pinned: version {policy['version']}"


def _canary(policy: dict[str, Any]) -> str:
    steps = list(policy.get("steps") or [5, 25, 50, 100])
    step = int(policy.get("step", 0))
    state = policy.get("state", "progressing")
    weight = {"rolled_back": 0, "promoted": 100}.get(state, steps[step])
    text = (
        f"canary: version {policy['canary']} gets {weight}% (step {step + 1} of {len(steps)}), "
        f"primary version {policy['primary']}"
    )
    guards = {"max_error_rate": 0.05, "max_p99_ratio": 2.0, "min_requests": 50, **(policy.get("guards") or {})}
    text += (
        f"; guards: max error rate {_percent(guards['max_error_rate'])}, "
        f"max p99 ratio {float(guards['max_p99_ratio'])}"
        + (f" beyond {float(guards['min_p99_slack_ms']):g} ms" if "min_p99_slack_ms" in guards else "")
        + f", min {guards['min_requests']} requests"
    )
    if policy.get("auto_promote"):
        interval = float(policy.get("step_interval_s") or 0)
        text += f"; auto-promote{f' every {interval:g} s at least' if interval else ''}"
    return f"{text}; state {state}"


def _ab(policy: dict[str, Any]) -> str:
    variants = ", ".join(f"{v['name']} → version {v['version']} {v['weight']}%" for v in policy["variants"])
    return f"ab: {variants}; sticky by {policy.get('sticky_key') or 'user_id'}"


def _shadow(policy: dict[str, Any]) -> str:
    sample = policy.get("sample", 1.0)
    return f"shadow: version {policy['primary']} answers, {_percent(sample)} copied to version {policy['shadow']}"


def _bluegreen(policy: dict[str, Any]) -> str:
    active = policy.get("active", "blue")
    if active not in ("blue", "green"):
        raise ValueError(active)
    colours = [f"{c} version {policy[c]}{' (active)' if c == active else ''}" for c in ("blue", "green")]
    return f"bluegreen: {', '.join(colours)}"


_POLICY_FORMS: dict[str, Callable[[dict[str, Any]], str]] = {
    "pinned": _pinned,
    "canary": _canary,
    "ab": _ab,
    "shadow": _shadow,
    "bluegreen": _bluegreen,
}


def _describe_event(event: dict[str, Any]) -> str:
    """``at  kind  "reason"  figures``; the figures of a canary window read as a sentence."""
    details = event.get("details")
    if not isinstance(details, dict):
        skip = {"name", "at", "time", "kind", "action"}
        details = {key: value for key, value in event.items() if key not in skip}
    parts = [_when(event), str(event.get("kind") or event.get("action") or "event")]
    reason = details.get("reason")
    if isinstance(reason, str) and reason:
        parts.append(f'"{reason}"')
    figures: list[str] = []
    for key, value in details.items():
        if key == "reason" and isinstance(value, str):
            continue
        try:
            if isinstance(value, dict) and "requests" in value:
                figures.append(f"{key} {_window(value)}")
            elif key == "error_rate" and value is not None:
                figures.append(f"error rate {_percent(value)}")
            elif key == "p99_ratio" and value is not None:
                figures.append(f"p99 ratio {float(value):g}")
            elif key == "weight" and value is not None:
                figures.append(f"weight {value}%")
            else:
                figures.append(_flatten({key: value}))
        except (TypeError, ValueError):
            figures.append(_flatten({key: value}))
    if figures:
        parts.append("; ".join(figures))
    return "  ".join(parts)


def _describe_status(status: Any) -> str:
    if not isinstance(status, dict):
        return json.dumps(status)
    try:
        if "window" in status:
            return _canary_status(status)
        if isinstance(status.get("shadow"), dict):
            return _shadow_status(status["shadow"])
        if "agreed" in status:
            return _shadow_status(status)
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    return _flatten(status)


def _canary_status(status: dict[str, Any]) -> str:
    parts = [f"canary weight {status.get('weight', '?')}%"]
    parts += [f"{side} {_window(status['window'].get(side) or {})}" for side in ("primary", "canary")]
    return "; ".join(parts) + " (this step, this server)"


def _window(figures: dict[str, Any]) -> str:
    requests, errors = figures.get("requests", 0), figures.get("errors", 0)
    p99 = figures.get("p99_ms")
    latency = f", p99 {_ms(p99)}" if p99 is not None else ""
    return f"{_plural(requests, 'request')}, {_plural(errors, 'error')}{latency}"


def _shadow_status(status: dict[str, Any]) -> str:
    text = (
        f"{_plural(status.get('requests', 0), 'request')} compared, {status.get('agreed', 0)} agreed, "
        f"{status.get('disagreed', 0)} disagreed, {_plural(status.get('errors', 0), 'error')}, "
        f"{status.get('dropped', 0)} dropped"
    )
    if status.get("agreement_rate") is not None:
        text += f"; agreement {_percent(status['agreement_rate'])}"
    if status.get("mean_abs_difference") is not None:
        text += f"; mean abs difference {float(status['mean_abs_difference']):.3g}"
    if status.get("primary_p99_ms") is not None and status.get("shadow_p99_ms") is not None:
        text += f"; p99 primary {_ms(status['primary_p99_ms'])}, shadow {_ms(status['shadow_p99_ms'])}"
    return text


def _percent(fraction: Any) -> str:
    return f"{float(fraction) * 100:.4g}%"


def _ms(value: Any) -> str:
    return f"{float(value):.3g} ms"


def _plural(count: Any, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _flatten(values: Any, prefix: str = "") -> str:
    """``key=value`` pairs, nested objects as ``outer.inner=value``."""
    if not isinstance(values, dict):
        return f"{prefix}={json.dumps(values)}" if prefix else json.dumps(values)
    parts = []
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            parts.append(_flatten(value, name))
        elif isinstance(value, str):
            parts.append(f"{name}={value}" if value and " " not in value else f"{name}={json.dumps(value)}")
        else:
            parts.append(f"{name}={json.dumps(value)}")
    return " ".join(parts)


def _who_when(actor: Any, when: Any) -> str:
    return f"updated by {actor or 'anonymous'} at {when or '?'}"


def _when(row: dict[str, Any]) -> str:
    return str(row.get("time") or row.get("at") or row.get("updated_at") or "?")


def _items(answer: Any, key: str) -> list[dict[str, Any]]:
    items = answer.get(key) if isinstance(answer, dict) else None
    if not isinstance(items, list):
        raise ServerRefused(200, f"the answer has no '{key}' list")
    return [item for item in items if isinstance(item, dict)]
