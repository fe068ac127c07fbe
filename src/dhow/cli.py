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
    _add_security_options(serve)
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    serve.add_argument("--loop", choices=["uvloop", "asyncio"], help="event loop (default uvloop)")
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="server processes sharing the ports, each with its own copy of the models (default 1)",
    )
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

    models = commands.add_parser(
        "models",
        help="work with a model repository",
        description="Check, encrypt and trust the artifacts of a model repository.",
    )
    model_commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    validate = model_commands.add_parser(
        "validate",
        help="check every model.yaml of a repository",
        description="Check every model.yaml of a repository and say what is wrong; exits 1 if any is invalid.",
    )
    validate.add_argument("repository", type=Path, metavar="DIR", help="the repository folder")

    from dhow.access import commands as access_commands
    from dhow.governance import commands as audit_commands
    from dhow.repository import commands as repository_commands
    from dhow.rollouts import cli as rollout_cli

    repository_commands.add_parsers(model_commands)
    access_commands.add_parsers(commands, model_commands)
    audit_commands.add_parser(commands)
    rollout_cli.add_parser(commands)
    return parser


def _add_security_options(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("security", "identities, TLS, encrypted artifacts, quotas, audit, residency")
    group.add_argument(
        "--auth",
        choices=["on", "none"],
        help="on (default): every request but health needs an API key, JWT or client certificate; "
        "none: no authentication, for local development only",
    )
    group.add_argument("--jwt-issuer", metavar="ISS", help="accept JWT bearer tokens from this issuer")
    group.add_argument("--jwt-audience", metavar="AUD", help="the audience JWTs must name (default dhow)")
    group.add_argument("--jwt-jwks", metavar="FILE|URL", help="the issuer's JWKS: a file or an http(s):// URL")
    group.add_argument("--jwt-roles-claim", metavar="CLAIM", help="JWT claim with the roles (default roles)")
    group.add_argument("--jwt-tenant-claim", metavar="CLAIM", help="JWT claim with the tenant (default tenant)")
    group.add_argument("--tls-cert", metavar="PEM", help="serve REST and gRPC over TLS with this certificate")
    group.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    group.add_argument("--tls-client-ca", metavar="PEM", help="CA of client certificates: mutual TLS")
    group.add_argument(
        "--tls-client-auth", choices=["required", "optional"], help="with --tls-client-ca: required (default)"
    )
    group.add_argument("--require-tls", action="store_const", const=True, help="refuse to serve without TLS")
    group.add_argument(
        "--kek-file", metavar="FILE", help="key-encryption keys of encrypted artifacts (or DHOW_KEK=id:base64key)"
    )
    group.add_argument(
        "--require-digests",
        action="store_const",
        const=True,
        help="load only artifacts whose SHA-256 was recorded with 'dhow models trust'",
    )
    group.add_argument("--redis", metavar="URL", help="share rate limits through Redis (redis://host:port/db)")
    group.add_argument("--region", metavar="REGION", help="this server's region, e.g. ae or eu (default: default)")
    group.add_argument("--residency-policy", metavar="FILE", help="YAML: which data regions may be processed where")
    group.add_argument("--audit-store", metavar="URL", help="audit trail: sqlite:///path or postgresql://...")
    group.add_argument(
        "--audit-region-store",
        dest="audit_region_stores",
        action="append",
        metavar="REGION=URL",
        help="the audit store of another data region; repeatable",
    )
    group.add_argument("--masking-key-file", metavar="FILE", help="secret of keyed-hash PII masking")


def _serve(args: argparse.Namespace) -> int:
    from dhow.server import run_server
    from dhow.settings import resolve_settings

    settings = resolve_settings(vars(args), config_file=args.config)
    if not settings.repository.is_dir():
        print(f"dhow: the model repository {settings.repository} is not a folder (see --repository)", file=sys.stderr)
        return 2
    if settings.workers > 1:
        from dhow.supervisor import serve_workers

        return serve_workers(settings)
    from dhow.supervisor import check_port

    # before any store opens or model loads: a busy port is the commonest start-up mistake (a busy port 0
    # cannot be; the server then binds a free one itself)
    for door, port in (("REST", settings.http_port), ("gRPC", settings.grpc_port)):
        if port:
            check_port(settings.host, port, door)
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
        if args.command == "audit":
            from dhow.governance import commands as audit_commands

            return audit_commands.run(args)
        from dhow.access import commands as access_commands
        from dhow.repository import commands as repository_commands

        for module in (access_commands, repository_commands):
            code: int | None = module.run(args)
            if code is not None:
                return code
        return _validate(args)
    except DhowError as exc:
        print(f"dhow: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
