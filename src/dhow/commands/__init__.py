"""The `dhow` command's admin subcommands that work on the stores directly, before or beside any server:
``keys`` and ``tenants`` (keys.py), ``audit`` (audit.py), ``models encrypt|rewrap|keygen|push`` (models.py),
``batch`` (batch.py), ``stream`` (stream.py), and ``gateway config`` (gateway.py, writing a proxy's configuration).

They sit above the layers they use: one command may touch the access store, the audit trail and the repository.
"""

from __future__ import annotations

import argparse

__all__ = ["add_command_with_actions"]


def add_command_with_actions(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str, description: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """Add ``dhow NAME ACTION ...``; its actions' subparsers (the action in ``<name>_command``)."""
    command = commands.add_parser(name, help=summary, description=description)
    return command.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True)
