"""The options of a command that composes the core without a port (``dhow batch run``, ``dhow stream run``):
where the models, the stores and the policies are, found as ``dhow serve`` finds them."""

from __future__ import annotations

import argparse
from pathlib import Path

from dhow.settings import CONFIG_FILE_HELP, ServerSettings, resolve_settings

__all__ = ["add_core_options", "core_settings"]


def add_core_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--repository", metavar="DIR|URL",
        help="the model repository, a folder or s3://bucket/prefix (default $DHOW_REPOSITORY, ./models)")  # fmt: skip
    add("--region", default=None, metavar="REGION", help="where this runs (default $DHOW_REGION, else default)")
    add("--residency-policy", default=None, metavar="FILE", help="which data regions may be processed where")
    add("--data-dir", type=Path, metavar="DIR", help="dhow's data folder: keys, audit trail (default ./.dhow)")
    add("--config", type=Path, metavar="FILE", help=CONFIG_FILE_HELP)
    add("--registry", default=None, metavar="URL", help="the registry database: keys, and a Kinesis stream's "
        "checkpoints (default $DHOW_REGISTRY, else SQLite in the data folder; postgresql://... to share)")  # fmt: skip


def core_settings(args: argparse.Namespace) -> ServerSettings:
    """The settings of the options above: option > ``DHOW_*`` > ``--config`` file > default."""
    given = {
        "repository": args.repository,
        "data_dir": args.data_dir,
        "region": args.region,
        "residency_policy": args.residency_policy,
        "registry": args.registry,
    }
    return resolve_settings(given, config_file=args.config)
