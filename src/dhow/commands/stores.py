"""Where an admin command's stores are: found as the server finds them, said aloud, never made unasked.

``dhow keys create`` run from the wrong folder used to make ``./.dhow`` there and keep the key where no
server looks, saying nothing. Now every command that works on the registry and audit trail prints where
they are, and refuses to make the default data folder that no option, variable or settings file named.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from dhow.core.errors import InvalidInput
from dhow.registry.database import parse_url, redact_url
from dhow.settings import ServerSettings, resolve_settings_and_sources

__all__ = ["locate_stores"]


def locate_stores(command: str, given: Mapping[str, object], config_file: Path | None) -> ServerSettings:
    """The settings of ``dhow COMMAND``, once its stores are known to be where someone meant them.

    Refuses when the stores would go in a data folder that does not exist and that nobody named (the
    default, ``./.dhow``); else says on standard error where the registry and audit trail are.
    """
    settings, sources = resolve_settings_and_sources(given, config_file=config_file)
    folder = settings.data_dir
    in_folder = not settings.registry or not settings.audit_store
    if in_folder and "data_dir" not in sources and not folder.exists():
        raise InvalidInput(
            f"there is no data folder at {folder.resolve()} and none was named, so this would make one here, "
            "where no server looks. Name the server's data folder with --data-dir DIR (or DHOW_DATA_DIR, or "
            "data_dir in --config FILE), or its stores with --registry URL and --audit-store URL; to start a "
            f"new data folder here, pass --data-dir {folder}"
        )
    made = " (a new data folder)" if in_folder and not folder.exists() else ""
    print(
        f"dhow {command}: registry {_where(settings.registry_url())}, audit trail {_where(settings.audit_url())}"
        + made,
        file=sys.stderr,
    )
    return settings


def _where(url: str) -> str:
    """A SQLite store's file, or the database URL without its password."""
    dialect, target = parse_url(url)
    return target if dialect == "sqlite" else redact_url(url)
