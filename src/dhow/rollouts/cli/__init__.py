"""``dhow rollout``: manage deployments and their traffic policies through a server's admin REST API.

``parser`` turns options into policy JSON, ``client`` talks HTTP with the standard library only,
``formatting`` writes the answers for people, and ``commands`` runs each action.
"""

from dhow.rollouts.cli.client import DEFAULT_URL
from dhow.rollouts.cli.commands import run
from dhow.rollouts.cli.formatting import describe_deployment, describe_policy
from dhow.rollouts.cli.parser import add_parser, build_policy

__all__ = ["DEFAULT_URL", "add_parser", "build_policy", "describe_deployment", "describe_policy", "run"]
