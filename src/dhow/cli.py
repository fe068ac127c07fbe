"""The ``dhow`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dhow import __version__
from dhow.core.errors import DhowError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dhow",
        description="Serve trained models over the Open Inference Protocol (REST and gRPC).",
        epilog="Run 'dhow COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"dhow {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="serve every model of a repository",
        description="Serve the models of a repository over REST and gRPC. Settings come from the options, "
        "then DHOW_* environment variables (e.g. DHOW_HTTP_PORT), then --config FILE, then defaults.",
    )
    serve.add_argument(
        "--repository",
        "--model-repository",
        dest="repository",
        metavar="DIR",
        help="model repository folder (default: ./models)",
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--http-port", type=int, help="REST port (default 8080; 0 picks a free one)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 8081; 0 picks a free one)")
    serve.add_argument(
        "--model-control",
        choices=["none", "poll", "explicit"],
        help="none: load all at start (default); poll: also follow changes on disk; "
        "explicit: load and unload only through the repository API",
    )
    serve.add_argument(
        "--load-model",
        dest="load_models",
        action="append",
        metavar="NAME",
        help="under explicit control, a model to load at start ('*' = all); repeatable",
    )
    serve.add_argument(
        "--poll-interval", type=float, metavar="SECONDS", help="seconds between repository scans under poll (default 5)"
    )
    serve.add_argument(
        "--max-request-bytes", type=int, metavar="N", help="largest request body or gRPC message (default 64 MiB)"
    )
    serve.add_argument(
        "--allow-model-upload",
        action="store_const",
        const=True,
        help="accept model files in load requests (they can run code)",
    )
    serve.add_argument("--data-dir", metavar="DIR", help="where dhow keeps its own state (default ./.dhow)")
    serve.add_argument(
        "--registry",
        metavar="URL",
        help="where deployments and their history are kept: sqlite:///path or postgresql://user@host/db; "
        "default: SQLite in the data folder",
    )
    serve.add_argument(
        "--registry-poll",
        type=float,
        metavar="SECONDS",
        help="how often to look for deployment changes made by other servers sharing the registry (default 2)",
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    serve.add_argument("--loop", choices=["uvloop", "asyncio"], help="event loop (default uvloop)")
    serve.add_argument(
        "--config", type=Path, metavar="FILE", help="a YAML file of settings (same names, e.g. http_port: 9000)"
    )

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

    models = commands.add_parser("models", help="work with a model repository", description="Check a model repository.")
    model_commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    validate = model_commands.add_parser(
        "validate",
        help="check every model.yaml of a repository",
        description="Check every model.yaml of a repository and say what is wrong; exits 1 if any is invalid.",
    )
    validate.add_argument("repository", type=Path, metavar="DIR", help="the repository folder")

    from dhow.rollouts import cli as rollout_cli

    rollout_cli.add_parser(commands)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from dhow.server import run_server
    from dhow.settings import resolve_settings

    settings = resolve_settings(vars(args), config_file=args.config)
    if not settings.repository.is_dir():
        print(f"dhow: the model repository {settings.repository} is not a folder (see --repository)", file=sys.stderr)
        return 2
    run_server(settings)
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
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "demo":
            return _demo_build(args)
        if args.command == "rollout":
            from dhow.rollouts import cli as rollout_cli

            return rollout_cli.run(args)
        return _validate(args)
    except DhowError as exc:
        print(f"dhow: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
