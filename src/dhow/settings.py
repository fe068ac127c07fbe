"""The server's settings: one tree, one precedence (command line > environment > file > default).

Every field has a default and says what it is for. ``resolve_settings`` is the only place
that decides which source wins.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from dhow.core.errors import InvalidInput

ENV_PREFIX = "DHOW_"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    #: the model repository: a folder per model with a model.yaml and integer version folders
    repository: Path = Path("models")
    #: address the REST and gRPC ports listen on
    host: str = "127.0.0.1"
    #: REST (Open Inference Protocol v2 over HTTP) port
    http_port: int = 8080
    #: gRPC (inference.GRPCInferenceService) port
    grpc_port: int = 8081
    #: none: load all at start; poll: also follow the repository; explicit: load through the API
    model_control: str = "none"
    #: models to load at start under explicit control ("*" = all)
    load_models: tuple[str, ...] = ()
    #: seconds between repository scans under poll control
    poll_interval: float = 5.0
    #: largest request body (REST) or message (gRPC) accepted, in bytes
    max_request_bytes: int = 64 * 1024 * 1024
    #: accept model files in load requests (they can run code, so off by default)
    allow_model_upload: bool = False
    #: where dhow keeps its own state (uploaded models, the SQLite registry)
    data_dir: Path = Path(".dhow")
    #: the registry of deployments: sqlite:///path or postgresql://...; empty = SQLite in data_dir
    registry: str = ""
    #: seconds between checks for deployment changes made by other servers sharing the registry
    registry_poll: float = 2.0
    #: debug, info, warning or error
    log_level: str = "info"
    #: event loop: uvloop (faster) or asyncio
    loop: str = "uvloop"
    #: server processes sharing the ports (1: this process serves; more: a supervisor starts that many)
    workers: int = 1

    # -- security (see docs/security.md) --
    #: on: every request but health needs a credential (API key, JWT or client certificate); none: local development
    auth: str = "on"
    #: JWT bearer tokens: the issuer ("iss") to accept; empty = JWTs are not accepted
    jwt_issuer: str = ""
    #: JWT bearer tokens: the audience ("aud") they must name
    jwt_audience: str = "dhow"
    #: JWT bearer tokens: the issuer's JWKS, a file path or an http(s):// URL
    jwt_jwks: str = ""
    #: JWT claim holding the roles ("invoker" or "invoker:fraud-*")
    jwt_roles_claim: str = "roles"
    #: JWT claim holding the tenant
    jwt_tenant_claim: str = "tenant"
    #: TLS certificate (PEM) for the REST and gRPC ports; with tls_key, both ports speak TLS only
    tls_cert: str = ""
    #: TLS private key (PEM) of tls_cert
    tls_key: str = ""
    #: CA (PEM) of client certificates; set = mutual TLS, clients identified by their certificate's CN
    tls_client_ca: str = ""
    #: with tls_client_ca: required (no certificate, no connection) or optional (a key or JWT will do)
    tls_client_auth: str = "required"
    #: refuse to start unless the ports speak TLS
    require_tls: bool = False
    #: key-encryption keys for encrypted artifacts, "id:base64key[,id:base64key]" (prefer DHOW_KEK or kek_file)
    kek: str = ""
    #: a file of key-encryption keys, one "id:base64key" a line
    kek_file: str = ""
    #: load only artifacts whose SHA-256 was recorded with `dhow models trust`
    require_digests: bool = False
    #: Redis URL for rate limits shared by every server (redis://host:port/db); empty = limits per process
    redis: str = ""
    #: this server's region (e.g. ae, eu): where the data it processes is processed
    region: str = "default"
    #: YAML file of the data-residency policy (which data regions may be processed in which regions)
    residency_policy: str = ""
    #: the audit trail: sqlite:///path or postgresql://...; empty = SQLite in data_dir
    audit_store: str = ""
    #: audit stores of other data regions, "region=URL": a request's records go to its data region's store
    audit_region_stores: tuple[str, ...] = ()
    #: file of the keyed-hash secret used by PII masking (created when absent); empty = masking.key in data_dir
    masking_key_file: str = ""

    def registry_url(self) -> str:
        """The registry's URL, with the default (SQLite in the data folder) filled in."""
        return self.registry or f"sqlite:///{(self.data_dir / 'registry.sqlite3').resolve()}"

    def audit_url(self) -> str:
        """The audit trail's URL (this server's region), with the default (SQLite in the data folder) filled in."""
        return self.audit_store or f"sqlite:///{(self.data_dir / 'audit.sqlite3').resolve()}"


_CHOICES = {
    "model_control": ("none", "poll", "explicit"),
    "log_level": ("debug", "info", "warning", "error"),
    "loop": ("uvloop", "asyncio"),
    "auth": ("on", "none"),
    "tls_client_auth": ("required", "optional"),
}
#: integer settings with a lower bound
_AT_LEAST = {"workers": 1}


def _convert(name: str, value: object, source: str) -> object:
    """Turn a value from any source into the field's type, or refuse it naming the source."""
    kind = {f.name: f.type for f in dataclasses.fields(ServerSettings)}[name]
    try:
        if kind == "Path":
            result: object = Path(str(value))
        elif kind == "int":
            result = int(str(value))
        elif kind == "float":
            result = float(str(value))
        elif kind == "bool":
            result = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        elif kind == "tuple[str, ...]":
            items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
            result = tuple(str(item).strip() for item in items if str(item).strip())
        else:
            result = str(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{source}: '{name}' expects {kind}, got {value!r}") from None
    if name in _CHOICES and result not in _CHOICES[name]:
        raise InvalidInput(f"{source}: '{name}' must be one of {', '.join(_CHOICES[name])}, got {value!r}")
    if name in _AT_LEAST and isinstance(result, int) and result < _AT_LEAST[name]:
        raise InvalidInput(f"{source}: '{name}' must be an integer of at least {_AT_LEAST[name]}, got {value!r}")
    return result


def resolve_settings(
    cli: Mapping[str, object], env: Mapping[str, str] | None = None, config_file: Path | None = None
) -> ServerSettings:
    """Merge the sources: command line over DHOW_* environment over the YAML file over defaults."""
    names = [f.name for f in dataclasses.fields(ServerSettings)]
    values: dict[str, object] = {}
    if config_file is not None:
        try:
            data = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidInput(f"cannot read settings file {config_file}: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidInput(f"settings file {config_file}: expected a mapping of settings")
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise InvalidInput(f"settings file {config_file}: unknown setting '{key}' (known: {', '.join(names)})")
            values[name] = _convert(name, value, f"settings file {config_file}")
    environ = os.environ if env is None else env
    for name in names:
        variable = ENV_PREFIX + name.upper()
        if variable in environ:
            values[name] = _convert(name, environ[variable], f"environment variable {variable}")
    for name, value in cli.items():
        if value is not None and name in names:
            values[name] = _convert(name, value, f"option --{name.replace('_', '-')}")
    return ServerSettings(**values)  # type: ignore[arg-type]
