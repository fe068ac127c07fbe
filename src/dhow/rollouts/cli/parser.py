"""``dhow rollout``'s options: the parser, the checks of each value, and the policy JSON they make."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dhow.rollouts.cli.client import DEFAULT_URL
from dhow.rollouts.cli.errors import UsageError
from dhow.settings import CONFIG_FILE_HELP

__all__ = ["ACTIONS", "SHAPING", "add_parser", "build_policy"]

#: the actions that set a policy from options
SHAPING = ("pin", "canary", "ab", "shadow", "bluegreen", "set")
#: the actions that move a running policy on
ACTIONS = {
    "promote": "canary: go to the next step (past the last one the canary is promoted)",
    "rollback": "canary: send all traffic back to the primary (weight 0, state rolled_back)",
    "switch": "blue/green: swap the active colour",
    "release": "blue/green: pin the deployment to the active version, releasing the other",
}

if TYPE_CHECKING:  # argparse's class is generic only to the type checker
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
_NAME_HELP = "the deployment (a model name)"


def add_parser(commands: Subparsers) -> None:
    """Add ``dhow rollout`` and its actions to the ``dhow`` command."""
    connection, editing = _connection_options(), _editing_options()
    rollout = commands.add_parser(
        "rollout",
        help="manage deployments: which model versions answer a model's traffic",
        description="Manage deployments through a running server's admin API: pin a version, run a canary, "
        "an A/B test, a shadow or a blue/green switch, and read their history. See docs/rollouts.md.",
    )
    actions = rollout.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    _add_reading(actions, connection)
    both = [connection, editing]
    _add_pin(actions, both)
    _add_canary(actions, both)
    _add_ab(actions, both)
    _add_shadow(actions, both)
    _add_bluegreen(actions, both)
    for action, summary in ACTIONS.items():
        parser = actions.add_parser(action, parents=both, help=summary.split(": ", 1)[1], description=summary + ".")
        parser.add_argument("name", metavar="NAME", help=_NAME_HELP)
    _add_set_and_delete(actions, both)
    _add_history(actions, connection)


def _connection_options() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--url",
        default=None,
        help=f"the dhow server's REST address (default $DHOW_URL, else {DEFAULT_URL})",
    )
    connection.add_argument(
        "--json", dest="as_json", action="store_true", help="print the server's JSON answer instead of text"
    )
    connection.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_FILE_HELP)
    return connection


def _editing_options() -> argparse.ArgumentParser:
    editing = argparse.ArgumentParser(add_help=False)
    editing.add_argument("--reason", default="", metavar="TEXT", help="why, recorded in the history")
    editing.add_argument(
        "--revision",
        type=_count,
        metavar="N",
        help="the revision this edit is based on; refused (409) if the deployment has moved on "
        "(default: the current one, read first)",
    )
    return editing


def _add_reading(actions: Subparsers, connection: argparse.ArgumentParser) -> None:
    actions.add_parser(
        "list", parents=[connection], help="list the deployments", description="List every deployment, one a line."
    )
    show = actions.add_parser(
        "show",
        parents=[connection],
        help="show a deployment",
        description="Show a deployment: its policy, revision, last change and this server's live figures.",
    )
    show.add_argument("name", metavar="NAME", help=_NAME_HELP)


def _add_pin(actions: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    pin = actions.add_parser(
        "pin",
        parents=parents,
        help="send all traffic to one version",
        description="Pin a deployment to one version (creates the deployment if there is none).",
    )
    pin.add_argument("name", metavar="NAME", help=_NAME_HELP)
    pin.add_argument("version", type=_version, metavar="VERSION", help="the version that answers")


def _add_canary(actions: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    canary = actions.add_parser(
        "canary",
        parents=parents,
        help="send a growing share of traffic to a new version",
        description="Start a canary: steps[step] percent of requests go to --canary, the rest to --primary. "
        "The server rolls back when a guard is breached; options left out take the server's defaults.",
    )
    canary.add_argument("name", metavar="NAME", help=_NAME_HELP)
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
    _add_guards(canary)


def _add_guards(canary: argparse.ArgumentParser) -> None:
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
    canary.add_argument(
        "--min-accuracy-ratio",
        type=_number,
        metavar="RATIO",
        help="quality guard: roll back when the canary's accuracy from feedback falls below this share of the "
        "primary's (off)",
    )
    canary.add_argument(
        "--min-feedback", type=_count, metavar="N", help="labels each version needs before the quality guard (20)"
    )


def _add_ab(actions: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    ab = actions.add_parser(
        "ab",
        parents=parents,
        help="split traffic between versions by weight",
        description="Start an A/B test: each request key meets always the same variant while the weights hold.",
    )
    ab.add_argument("name", metavar="NAME", help=_NAME_HELP)
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
        help="request parameter that keeps a caller on one variant (default user_id); else the x-dhow-ab-key header",
    )


def _add_shadow(actions: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    shadow = actions.add_parser(
        "shadow",
        parents=parents,
        help="copy traffic to a version whose answers are only compared",
        description="Start a shadow: --primary answers; a copy of the requests goes to --shadow and "
        "the answers are compared (see 'dhow rollout show').",
    )
    shadow.add_argument("name", metavar="NAME", help=_NAME_HELP)
    shadow.add_argument("--primary", type=_version, required=True, metavar="VERSION", help="the version that answers")
    shadow.add_argument("--shadow", type=_version, required=True, metavar="VERSION", help="the compared version")
    shadow.add_argument("--sample", type=_number, metavar="FRACTION", help="share of requests copied, 0-1 (default 1)")
    shadow.add_argument(
        "--compare",
        type=_output_setting,
        action="append",
        metavar="OUTPUT=label",
        help="compare an output by label (a classifier's scores: the argmax) or values (the default); repeatable",
    )
    shadow.add_argument(
        "--tolerance",
        type=_output_setting,
        action="append",
        metavar="OUTPUT=RTOL,ATOL",
        help="how far a float output's values may differ, e.g. scores=0.01,0.001 (default 0.001,0.00001); repeatable",
    )


def _add_bluegreen(actions: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    bluegreen = actions.add_parser(
        "bluegreen",
        parents=parents,
        help="keep two versions loaded and send all traffic to one",
        description="Start a blue/green deployment: all traffic goes to the active colour; "
        "'dhow rollout switch' swaps it at once.",
    )
    bluegreen.add_argument("name", metavar="NAME", help=_NAME_HELP)
    bluegreen.add_argument("--blue", type=_version, required=True, metavar="VERSION", help="the blue version")
    bluegreen.add_argument("--green", type=_version, required=True, metavar="VERSION", help="the green version")
    bluegreen.add_argument("--active", choices=["blue", "green"], help="the colour that answers (default blue)")


def _add_set_and_delete(actions: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    set_policy = actions.add_parser(
        "set",
        parents=parents,
        help="set any policy from JSON",
        description="Set a deployment's policy from a JSON object (see docs/rollouts.md for the kinds).",
    )
    set_policy.add_argument("name", metavar="NAME", help=_NAME_HELP)
    set_policy.add_argument(
        "--policy",
        type=_policy_argument,
        required=True,
        metavar="JSON|@FILE",
        help='the policy, e.g. \'{"kind": "pinned", "version": 2}\', or @file.json',
    )
    delete = actions.add_parser(
        "delete",
        parents=parents,
        help="delete a deployment",
        description="Delete a deployment: the model is served as before (its newest loaded version answers).",
    )
    delete.add_argument("name", metavar="NAME", help=_NAME_HELP)


def _add_history(actions: Subparsers, connection: argparse.ArgumentParser) -> None:
    history = actions.add_parser(
        "history",
        parents=[connection],
        help="list a deployment's changes",
        description="List every change of a deployment, oldest first (a deleted one's too). A model unknown to "
        "the server is refused.",
    )
    history.add_argument("name", metavar="NAME", help=_NAME_HELP)
    events = actions.add_parser(
        "events",
        parents=[connection],
        help="list a model's events: the analysis's decisions and the monitoring's episodes",
        description="List a model's events with their figures, oldest first: the decisions of the automatic "
        "analysis (advances, promotions, rollbacks) and the episodes of its monitoring (drift, drift_cleared, "
        "latency_anomaly, latency_normal). A model unknown to the server is refused.",
    )
    events.add_argument("name", metavar="NAME", help=_NAME_HELP)


# -- values --------------------------------------------------------------------------------


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


def _output_setting(text: str) -> tuple[str, str]:
    """``OUTPUT=VALUE`` of --compare and --tolerance (the server checks the value)."""
    output, equals, value = text.partition("=")
    if not equals or not output.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected OUTPUT=VALUE like probabilities=label, got {text!r}")
    return output.strip(), value.strip()


def _tolerance(text: str) -> dict[str, float]:
    rtol, comma, atol = text.partition(",")
    try:
        return {"rtol": float(rtol), "atol": float(atol)} if comma else {"rtol": float(rtol)}
    except ValueError:
        raise UsageError(f"--tolerance expects OUTPUT=RTOL,ATOL like scores=0.01,0.001, got {text!r}") from None


def _shadow_policy(args: argparse.Namespace) -> dict[str, Any]:
    policy: dict[str, Any] = {"kind": "shadow", "primary": args.primary, "shadow": args.shadow}
    policy.update(_given(sample=args.sample))
    if args.compare:
        policy["compare"] = dict(args.compare)
    if args.tolerance:
        policy["tolerances"] = {output: _tolerance(value) for output, value in args.tolerance}
    return policy


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


# -- the policy JSON ---------------------------------------------------------------------


def build_policy(args: argparse.Namespace) -> dict[str, Any]:
    """The policy JSON of a shaping command (pin, canary, ab, shadow, bluegreen, set)."""
    build = _POLICIES.get(args.rollout_command)
    if build is None:
        raise UsageError(f"'{args.rollout_command}' does not set a policy")
    return build(args)


def _given(**values: Any) -> dict[str, Any]:
    """The options given; the server fills in its defaults for the others."""
    return {key: value for key, value in values.items() if value is not None}


def _canary_policy(args: argparse.Namespace) -> dict[str, Any]:
    policy: dict[str, Any] = {"kind": "canary", "primary": args.primary, "canary": args.canary}
    policy.update(_given(steps=args.steps, auto_promote=args.auto_promote, step_interval_s=args.step_interval))
    guards = _given(
        max_error_rate=args.max_error_rate,
        max_p99_ratio=args.max_p99_ratio,
        min_p99_slack_ms=args.min_p99_slack,
        min_requests=args.min_requests,
        min_accuracy_ratio=args.min_accuracy_ratio,
        min_feedback=args.min_feedback,
    )
    if guards:
        policy["guards"] = guards
    return policy


_POLICIES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "pin": lambda args: {"kind": "pinned", "version": args.version},
    "canary": _canary_policy,
    "ab": lambda args: {"kind": "ab", "variants": args.variants, **_given(sticky_key=args.sticky_key)},
    "shadow": _shadow_policy,
    "bluegreen": lambda args: {
        "kind": "bluegreen",
        "blue": args.blue,
        "green": args.green,
        **_given(active=args.active),
    },
    "set": lambda args: dict(args.policy),
}
