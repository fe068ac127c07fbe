"""The ``dhow`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dhow import __version__
from dhow.core.errors import DhowError
from dhow.settings import SettingOption, SettingsSource, setting_options

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dhow",
        description="Serve trained models over the Open Inference Protocol (REST and gRPC).",
        epilog="Run 'dhow COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"dhow {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve(commands)
    _add_demo(commands)
    model_commands = _add_models(commands)

    from dhow.commands import audit as audit_commands
    from dhow.commands import batch as batch_commands
    from dhow.commands import gateway as gateway_commands
    from dhow.commands import keys as access_commands
    from dhow.commands import models as repository_commands
    from dhow.commands import profile as profile_commands
    from dhow.commands import stream as stream_commands
    from dhow.rollouts import cli as rollout_cli

    repository_commands.add_parsers(model_commands)
    profile_commands.add_parser(model_commands)
    access_commands.add_parsers(commands, model_commands)
    audit_commands.add_parser(commands)
    batch_commands.add_parser(commands)
    stream_commands.add_parser(commands)
    gateway_commands.add_parser(commands)
    rollout_cli.add_parser(commands)
    return parser


def _add_serve(commands: Subparsers) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve every model of a repository",
        description="Serve the models of a repository over REST and gRPC. Settings come from the options, "
        "then DHOW_* environment variables (e.g. DHOW_HTTP_PORT), then --config FILE, then defaults.",
    )
    _add_settings_options(serve)
    serve.add_argument(
        "--config", type=Path, metavar="FILE", help="a YAML file of settings (same names, e.g. http_port: 9000)"
    )


def _add_demo(commands: Subparsers) -> None:
    demo = commands.add_parser(
        "demo",
        help="build the demo models",
        description="Build the demo model repository from seeded synthetic data (no downloads).",
    )
    demo_commands = demo.add_subparsers(dest="demo_command", metavar="ACTION", required=True)
    build = demo_commands.add_parser(
        "build", help="write the demo repository", description="Write the demo model repository."
    )
    build.add_argument(
        "--out", type=Path, default=Path("demo-models"), metavar="DIR", help="where to write it (default ./demo-models)"
    )
    build.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and weights (default 0)")


def _add_models(commands: Subparsers) -> Subparsers:
    """``dhow models`` with its ``validate`` action; the actions' subparsers, for the other modules' actions."""
    models = commands.add_parser(
        "models",
        help="work with a model repository",
        description="Check, encrypt, trust and profile the artifacts of a model repository.",
    )
    model_commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    validate = model_commands.add_parser(
        "validate",
        help="check every model.yaml of a repository",
        description="Check every model.yaml of a repository and say what is wrong; exits 1 if any is invalid.",
    )
    validate.add_argument("repository", type=Path, metavar="DIR", help="the repository folder")
    return model_commands


def _add_settings_options(serve: argparse.ArgumentParser) -> None:
    """One option per setting, its help and default taken from the settings field."""
    groups: dict[str, argparse._ActionsContainer] = {
        "": serve,
        "security": serve.add_argument_group(
            "security", "identities, TLS, encrypted artifacts, quotas, audit, residency"
        ),
        "connections": serve.add_argument_group(
            "connections", "time limits of slow or idle clients, and how many connections are served at once"
        ),
        "monitoring": serve.add_argument_group("monitoring", "payload log and tracing (README: Monitoring)"),
    }
    for option in setting_options():
        group = groups[option.group]
        if option.kind == "bool" and option.default:
            # a switch that is on by default also gets its --no- form, the plainest way to turn it off
            negated = [f"--no-{flag[2:]}" for flag in option.flags if flag.startswith("--")]
            group.add_argument(*negated, dest=option.name, action="store_const", const=False, help="turn it off")
        group.add_argument(*option.flags, dest=option.name, help=_help(option), **_shape(option))


def _shape(option: SettingOption) -> dict[str, Any]:
    """How argparse reads the option: its type, a repeatable list, a switch, a choice."""
    if option.kind == "bool":
        # a bare switch turns it on; a value (--strict-readiness false) says which
        return {"nargs": "?", "const": True, "metavar": "true|false"}
    shape: dict[str, Any] = {"metavar": option.metavar, "choices": option.choices}
    if option.kind == "tuple[str, ...]":
        shape["action"] = "append"
    elif option.kind in ("int", "float"):
        shape["type"] = int if option.kind == "int" else float
    return shape


def _help(option: SettingOption) -> str:
    # an empty default is described by the text itself ("default: SQLite in the data folder")
    if option.default in ("", (), False):
        return option.doc
    return f"{option.doc} (default: {option.default})"


def _serve(args: argparse.Namespace) -> int:
    from dhow.server import run_server

    # kept to read the settings again on SIGHUP (only the settings' own values: it goes to the workers)
    source = SettingsSource({option.name: getattr(args, option.name) for option in setting_options()}, args.config)
    settings = source.read()
    if not settings.repository_is_remote() and not settings.repository_folder().is_dir():
        print(f"dhow: the model repository {settings.repository} is not a folder (see --repository)", file=sys.stderr)
        return 2
    if settings.cpu_affinity == "auto":  # (said now, not by each worker as it starts)
        from dhow.core.affinity import check

        check(settings.workers)
        if settings.grpc_front == "grpcio":
            # grpc.aio starts its threads (event engine, timers, its poller) on the loop's thread, and its poller is
            # bound to that loop: they would share the loop's CPU, the very preemption the pinning is there to avoid
            print(
                "dhow: --cpu-affinity auto cannot place grpcio's threads, which would share the event loop's CPU; "
                "use --grpc-front native (the default) or leave --cpu-affinity off",
                file=sys.stderr,
            )
            return 2
    if settings.workers > 1:
        from dhow.supervisor import serve_workers

        return serve_workers(settings, source)
    from dhow.supervisor import check_port

    # before any store opens or model loads: a busy port is the commonest start-up mistake (a busy port 0
    # cannot be; the server then binds a free one itself)
    for door, port in (("REST", settings.http_port), ("gRPC", settings.grpc_port)):
        if port:
            check_port(settings.host, port, door)
    run_server(settings, source=source)
    return 0


def _demo_build(args: argparse.Namespace) -> int:
    from dhow.demo import build_demo_repository

    names = build_demo_repository(args.out, seed=args.seed)
    print(f"wrote {len(names)} models to {args.out}: {', '.join(names)}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from dhow.repository.store import ModelRepository

    repository = ModelRepository(args.repository)
    names = repository.model_names()
    if not names:
        print(f"{args.repository}: no model folders with a model.yaml", file=sys.stderr)
        return 1
    failures = 0
    for name in names:
        try:
            source = repository.source(name)
        except DhowError as exc:
            failures += 1
            print(f"FAIL {name}: {exc.message}")
            continue
        served = source.served_versions()
        if not served:
            failures += 1
            print(f"FAIL {name}: no integer version folder to serve in {source.path}")
            continue
        print(f"ok   {name}: runtime {source.config.runtime}, serving versions {', '.join(map(str, served))}")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a supervisor starts its workers with
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "demo":
            return _demo_build(args)
        if args.command == "rollout":
            from dhow.rollouts import cli as rollout_cli

            return rollout_cli.run(args)
        if args.command == "batch":
            from dhow.commands import batch as batch_commands

            return batch_commands.run(args)
        if args.command == "stream":
            from dhow.commands import stream as stream_commands

            return stream_commands.run(args)
        if args.command == "audit":
            from dhow.commands import audit as audit_commands

            return audit_commands.run(args)
        from dhow.commands import gateway as gateway_commands
        from dhow.commands import keys as access_commands
        from dhow.commands import models as repository_commands
        from dhow.commands import profile as profile_commands

        for module in (access_commands, repository_commands, profile_commands, gateway_commands):
            code: int | None = module.run(args)
            if code is not None:
                return code
        return _validate(args)
    except DhowError as exc:
        print(f"dhow: {exc.message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader left early ('dhow rollout show NAME | grep -q promoted'): nothing is wrong and
        # nothing more can be said; /dev/null takes what is left, so the interpreter's exit flush stays quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
