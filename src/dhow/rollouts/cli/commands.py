"""``dhow rollout ACTION``: each action's requests to the admin API, and the exit status.

Exit status: 0 on success, 1 when the server refused (its message is printed), 2 on a usage error or when
the server cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from dhow.rollouts.cli.client import ADMIN, AdminClient, base_url, deployment_path, items
from dhow.rollouts.cli.errors import ServerRefused, Unreachable, UsageError
from dhow.rollouts.cli.formatting import describe_deployment, describe_event, describe_history_row, describe_listing
from dhow.rollouts.cli.parser import ACTIONS, SHAPING, build_policy
from dhow.settings import resolve_settings

__all__ = ["run"]

#: a command: the server's answer and its human-readable form
Outcome = tuple[Any, str]


def _list(client: AdminClient, args: argparse.Namespace) -> Outcome:
    answer = client.call("GET", ADMIN)
    return answer, describe_listing(items(answer, "deployments"))


def _show(client: AdminClient, args: argparse.Namespace) -> Outcome:
    answer = client.call("GET", deployment_path(args.name))
    return answer, describe_deployment(answer)


def _shape(client: AdminClient, args: argparse.Namespace) -> Outcome:
    policy = build_policy(args)
    revision = args.revision
    if revision is None:
        revision = client.current_revision(args.name, missing=0)
    body = {"policy": policy, "revision": revision, "reason": args.reason}
    answer = client.call("PUT", deployment_path(args.name), body)
    return answer, describe_deployment(answer)


def _act(client: AdminClient, args: argparse.Namespace) -> Outcome:
    body: dict[str, Any] = {"reason": args.reason}
    if args.revision is not None:
        body["revision"] = args.revision
    answer = client.call("POST", deployment_path(args.name, args.rollout_command), body)
    return answer, describe_deployment(answer)


def _delete(client: AdminClient, args: argparse.Namespace) -> Outcome:
    revision = args.revision
    if revision is None:
        revision = client.current_revision(args.name, missing=None)
    answer = client.call("DELETE", deployment_path(args.name), {"revision": revision, "reason": args.reason})
    return answer, f"deleted {args.name} (it was at revision {revision}); its newest loaded version answers now"


def _history(client: AdminClient, args: argparse.Namespace) -> Outcome:
    answer = client.call("GET", deployment_path(args.name, "history"))
    rows = items(answer, "history")
    if not rows:
        return answer, f"{args.name}: no history"
    return answer, "\n".join(describe_history_row(row) for row in rows)


def _events(client: AdminClient, args: argparse.Namespace) -> Outcome:
    answer = client.call("GET", deployment_path(args.name, "events"))
    events = items(answer, "events")
    if not events:
        return answer, f"{args.name}: no events"
    return answer, "\n".join(describe_event(event) for event in events)


_COMMANDS: dict[str, Callable[[AdminClient, argparse.Namespace], Outcome]] = {
    "list": _list,
    "show": _show,
    **dict.fromkeys(SHAPING, _shape),
    **dict.fromkeys(ACTIONS, _act),
    "delete": _delete,
    "history": _history,
    "events": _events,
}


def run(args: argparse.Namespace) -> int:
    """Run ``dhow rollout ACTION``; the exit status."""
    try:
        url = base_url(args.url)
    except UsageError as exc:
        print(f"dhow: {exc}", file=sys.stderr)
        return 2
    # who edits, named as every dhow command names a person (the server records it under --auth none)
    actor = resolve_settings({}, config_file=args.config).actor_name()
    try:
        answer, text = _COMMANDS[args.rollout_command](AdminClient(url, actor), args)
    except UsageError as exc:
        print(f"dhow: {exc}", file=sys.stderr)
        return 2
    except Unreachable as exc:
        print(f"dhow: cannot reach dhow at {url}: {exc}", file=sys.stderr)
        return 2
    except ServerRefused as exc:
        print(f"dhow: {exc.message} (HTTP {exc.status})", file=sys.stderr)
        return 1
    _print(json.dumps(answer, indent=2, ensure_ascii=False) if args.as_json else text)
    return 0


def _print(output: str) -> None:
    try:
        print(output)
    except UnicodeEncodeError:  # a terminal that cannot show "→" or a name's letters
        encoding = sys.stdout.encoding or "ascii"
        print(output.replace("→", "->").encode(encoding, "replace").decode(encoding))
