"""Which source gives each setting its value: command line > ``DHOW_*`` environment > settings file > default.

``resolve_settings`` is the only place that decides it, for every command: ``serve`` and the administration
commands (``keys``, ``tenants``, ``audit``, ``models``, ``rollout``), which find the stores and name their
actor the same way. ``setting_options`` tells the CLI how ``serve`` takes each field as an option.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dhow.core.errors import InvalidInput
from dhow.core.spelling import did_you_mean
from dhow.settings.fields import ENV_PREFIX, ServerSettings

__all__ = ["SettingOption", "SettingsSource", "resolve_settings", "resolve_settings_and_sources", "setting_options"]


@dataclass(frozen=True, slots=True)
class SettingsSource:
    """Where a server's settings came from, so that it can read them again (SIGHUP): the command line's
    values and the settings file. The environment is the process's own, which nobody changes."""

    cli: Mapping[str, object]
    config_file: Path | None = None

    def read(self) -> ServerSettings:
        return resolve_settings(self.cli, config_file=self.config_file, serving=True)


_CHOICES = {
    "model_control": ("none", "poll", "explicit"),
    "log_level": ("debug", "info", "warning", "error"),
    "loop": ("uvloop", "asyncio"),
    "cpu_affinity": ("off", "auto"),
    "writer_priority": ("idle", "normal"),
    "auth": ("on", "none"),
    "tls_client_auth": ("required", "optional"),
    "grpc_front": ("native", "grpcio"),
    "http_front": ("native", "uvicorn"),
}
#: integer settings with a lower bound
_AT_LEAST = {"workers": 1, "max_connections": 0, "keepalive_timeout": 1, "payload_log_queue": 1,
             "payload_log_queue_bytes": 1}  # fmt: skip
#: durations that must be more than zero (a zero timeout would close every connection at once)
_POSITIVE = ("header_timeout", "body_timeout", "grpc_idle_timeout", "grpc_keepalive", "drain_seconds")
_NOT_NEGATIVE = ("drain_delay",)
#: the longest wait for an audit commit (``audit_commit_ms``): a window of a second of answered requests' records
MAX_AUDIT_COMMIT_MS = 1000
_FIELDS = {field.name: field for field in dataclasses.fields(ServerSettings)}


@dataclass(frozen=True, slots=True)
class SettingOption:
    """How ``dhow serve`` takes one setting on its command line (argparse stays in the CLI)."""

    name: str
    flags: tuple[str, ...]
    #: the field's type: Path, int, float, bool, str or tuple[str, ...] (a repeatable option)
    kind: str
    default: object
    doc: str
    metavar: str | None
    #: the help section: "" for the main one
    group: str
    choices: tuple[str, ...] | None


def setting_options() -> list[SettingOption]:
    """The command-line options of the settings, in field order (settings with no option left out)."""
    options = []
    for name, field in _FIELDS.items():
        meta = field.metadata
        flags = meta.get("flags", ("--" + name.replace("_", "-"),))
        if flags:
            kind = str(field.type)
            group = meta.get("group", "")
            options.append(
                SettingOption(
                    name, flags, kind, field.default, meta["doc"], meta.get("metavar"), group, _CHOICES.get(name)
                )
            )
    return options


def _typed(kind: str, value: object) -> object:
    if kind == "Path":
        return Path(str(value))
    if kind == "int":
        return int(str(value))
    if kind == "float":
        return float(str(value))
    if kind == "bool":
        return value if isinstance(value, bool) else _boolean(str(value))
    if kind == "tuple[str, ...]":
        items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
        return tuple(str(item).strip() for item in items if str(item).strip())
    if kind == "tuple[dict[str, Any], ...]":
        return _mappings(value)
    return str(value)


def _mappings(value: object) -> tuple[dict[str, Any], ...]:
    """A list of mappings (``streams:``), from a settings file or from YAML text (the environment)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"not YAML: {exc}") from None
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(item, dict) for item in value):
        raise ValueError("expected a list of mappings")
    return tuple({str(key): item for key, item in entry.items()} for entry in value)


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not true or false: {text!r}")


def _convert(name: str, value: object, source: str) -> object:
    """Turn a value from any source into the field's type, or refuse it naming the source."""
    kind = str(_FIELDS[name].type)
    try:
        result = _typed(kind, value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{source}: '{name}' expects {kind}, got {value!r}") from None
    if name in _CHOICES and result not in _CHOICES[name]:
        raise InvalidInput(f"{source}: '{name}' must be one of {', '.join(_CHOICES[name])}, got {value!r}")
    if name in _AT_LEAST and isinstance(result, int) and result < _AT_LEAST[name]:
        raise InvalidInput(f"{source}: '{name}' must be an integer of at least {_AT_LEAST[name]}, got {value!r}")
    if name == "audit_commit_ms" and isinstance(result, int) and not 0 <= result <= MAX_AUDIT_COMMIT_MS:
        raise InvalidInput(
            f"{source}: 'audit_commit_ms' must be an integer of milliseconds from 0 to {MAX_AUDIT_COMMIT_MS}, "
            f"got {value!r}"
        )
    if name == "trace_sample_ratio" and isinstance(result, float) and not 0 <= result <= 1:
        raise InvalidInput(f"{source}: 'trace_sample_ratio' must be a number from 0 to 1, got {value!r}")
    if name in _POSITIVE and isinstance(result, float) and not result > 0:
        raise InvalidInput(f"{source}: '{name}' must be a number of seconds above 0, got {value!r}")
    if name in _NOT_NEGATIVE and isinstance(result, float) and not result >= 0:
        raise InvalidInput(f"{source}: '{name}' must be a number of seconds, 0 or more, got {value!r}")
    return result


def _from_file(config_file: Path) -> dict[str, tuple[object, str]]:
    try:
        data = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput(f"cannot read settings file {config_file}: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"settings file {config_file}: expected a mapping of settings")
    source = f"settings file {config_file}"
    values: dict[str, tuple[object, str]] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            hint = did_you_mean(name, _FIELDS)
            raise InvalidInput(
                f"{source}: unknown setting '{key}'{f', {hint}' if hint else ''} (known: {', '.join(_FIELDS)})"
            )
        values[name] = (_convert(name, value, source), source)
    return values


def _given(
    cli: Mapping[str, object], env: Mapping[str, str] | None, config_file: Path | None
) -> dict[str, tuple[object, str]]:
    """Each setting some source gives, converted, with the source that won: option > environment > file."""
    values = _from_file(config_file) if config_file is not None else {}
    environ = os.environ if env is None else env
    for name in _FIELDS:
        variable = ENV_PREFIX + name.upper()
        if variable in environ:
            source = f"environment variable {variable}"
            values[name] = (_convert(name, environ[variable], source), source)
    for name, value in cli.items():
        if value is not None and name in _FIELDS:
            source = f"option --{name.replace('_', '-')}"
            values[name] = (_convert(name, value, source), source)
    return values


def resolve_settings(
    cli: Mapping[str, object],
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    *,
    serving: bool = False,
) -> ServerSettings:
    """Merge the sources: command line over DHOW_* environment over the YAML file over defaults.

    ``cli`` maps setting names to the options given (``None`` = not given; other names are ignored);
    ``env`` is ``os.environ`` unless given. ``serving``: for ``dhow serve``, which also refuses settings that
    only a server would act on wrongly (a trace ratio without a collector); an admin command (``dhow keys``,
    ``dhow audit``) sharing the server's environment or file must not be refused for them.
    """
    return resolve_settings_and_sources(cli, env, config_file, serving=serving)[0]


def resolve_settings_and_sources(
    cli: Mapping[str, object],
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    *,
    serving: bool = False,
) -> tuple[ServerSettings, dict[str, str]]:
    """``resolve_settings``, and where each setting that is not at its default came from
    (``{"data_dir": "environment variable DHOW_DATA_DIR"}``): a command can tell a folder someone
    named from the default one."""
    given = _given(cli, env, config_file)
    if serving and "trace_sample_ratio" in given and "otlp_endpoint" not in given:
        # a ratio with no collector traced nothing, silently; an endpoint given empty turns tracing off on purpose
        raise InvalidInput(
            f"{given['trace_sample_ratio'][1]}: the share of requests traced needs --otlp-endpoint, the collector "
            "the spans go to (e.g. http://127.0.0.1:4318); without one nothing is traced"
        )
    settings = ServerSettings(**{name: value for name, (value, _) in given.items()})  # type: ignore[arg-type]
    return settings, {name: source for name, (_, source) in given.items()}
