"""``dhow gateway config``: write the configuration of HAProxy or nginx in front of dhow replicas.

The proxy is an existing one, installed from the machine's packages (``apt-get install haproxy``); dhow only
writes its configuration (``commands/proxy_config.py`` says what it does). Exit status 0, or 2 with a message
naming the option that is wrong.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from dhow.commands import add_command_with_actions
from dhow.commands.proxy_config import PROXIES, GatewayPlan, parse_endpoint, render

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dhow gateway`` and its ``config`` action to the ``dhow`` command."""
    actions = add_command_with_actions(
        commands,
        "gateway",
        "configure a proxy (HAProxy, nginx) in front of several dhow replicas",
        "Write the configuration of an existing proxy that balances REST and gRPC over dhow replicas, checks "
        "their readiness and retries failed calls on another replica.",
    )
    config = actions.add_parser(
        "config",
        help="write the proxy's configuration",
        description="Write a whole configuration file for the proxy, e.g. 'dhow gateway config --backend "
        "127.0.0.1:9001 --backend 127.0.0.1:9002 --grpc-backend 127.0.0.1:9101 --grpc-backend 127.0.0.1:9102 "
        "--out /etc/haproxy/haproxy.cfg'.",
    )
    add = config.add_argument
    add("--backend", action="append", default=[], required=True, metavar="HOST:PORT",
        help="a replica's REST address (its /v2/health/ready is checked); repeat per replica")  # fmt: skip
    add("--grpc-backend", action="append", default=[], metavar="HOST:PORT",
        help="the same replica's gRPC address, in the order of --backend; none: no gRPC port")  # fmt: skip
    add("--proxy", default="haproxy", choices=PROXIES, help="the proxy (default haproxy: it checks readiness)")
    add(
        "--listen", default="0.0.0.0:8080", metavar="[HOST:]PORT", help="where clients reach REST (default %(default)s)"
    )
    add("--grpc-listen", default="0.0.0.0:8081", metavar="[HOST:]PORT",
        help="where clients reach gRPC (default %(default)s)")  # fmt: skip
    add("--stats-listen", default="", metavar="[HOST:]PORT",
        help="the proxy's own status page and, with HAProxy, its Prometheus /metrics (default: none)")  # fmt: skip
    add("--check-interval", type=float, default=1.0, metavar="SECONDS",
        help="seconds between readiness checks of a replica; two failed take it out (default 1)")  # fmt: skip
    add("--connect-timeout", type=float, default=2.0, metavar="SECONDS", help="to connect to a replica (default 2)")
    add("--timeout", type=float, default=60.0, metavar="SECONDS",
        help="longest wait for a replica's answer or a client's next bytes (default 60)")  # fmt: skip
    add("--retries", type=int, default=2, metavar="N", help="tries on other replicas after a failed one (default 2)")
    add("--max-body-mb", type=int, default=64, metavar="MB",
        help="largest request body accepted, as dhow's --max-request-bytes (default 64)")  # fmt: skip
    add("--out", type=Path, default=None, metavar="FILE", help="write it there (default: standard output)")


def run(args: argparse.Namespace) -> int | None:
    """``dhow gateway config``; None for any other command. Bad input raises ``InvalidInput`` (exit 2)."""
    if args.command != "gateway":
        return None
    plan = GatewayPlan(
        backends=tuple(parse_endpoint(text, "--backend") for text in args.backend),
        grpc_backends=tuple(parse_endpoint(text, "--grpc-backend") for text in args.grpc_backend),
        listen=parse_endpoint(args.listen, "--listen", default_host="0.0.0.0"),
        grpc_listen=parse_endpoint(args.grpc_listen, "--grpc-listen", default_host="0.0.0.0"),
        stats_listen=parse_endpoint(args.stats_listen, "--stats-listen", default_host="0.0.0.0")
        if args.stats_listen
        else None,
        check_interval_s=args.check_interval,
        connect_timeout_s=args.connect_timeout,
        timeout_s=args.timeout,
        retries=args.retries,
        max_body_mb=args.max_body_mb,
    )
    text = render(plan, args.proxy)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    _write(args.out, text)
    check = "haproxy -c -f" if args.proxy == "haproxy" else "nginx -t -c"
    print(f"wrote {args.out} ({args.proxy}, {len(plan.backends)} replicas); check it with: {check} {args.out}")
    return 0


def _write(path: Path, text: str) -> None:
    """Replace the file in one step: a proxy reloading meanwhile reads the old one or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
