"""The settings' fields: every one with its default, what it is for, and how ``dhow serve`` takes it.

``resolver`` decides which source gives each field its value.
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dhow.core.errors import InvalidInput
from dhow.core.file_urls import local_path
from dhow.core.names import check_region_name

__all__ = ["ANONYMOUS_ACTOR", "CONFIG_FILE_HELP", "ENV_PREFIX", "ServerSettings", "live_settings"]

ENV_PREFIX = "DHOW_"
#: the help of every command's ``--config FILE`` option
CONFIG_FILE_HELP = "a YAML file of settings, the one 'dhow serve --config' reads (same names, e.g. data_dir: /srv/dhow)"
#: the actor when no name can be found (no ``actor`` setting, no login name)
ANONYMOUS_ACTOR = "anonymous"

_T = TypeVar("_T")


def _setting(default: _T, doc: str, **option: Any) -> _T:
    """A field: its default, what it is for, and how ``dhow serve`` takes it as an option.

    ``option`` may say ``flags`` (default ``--field-name``; empty: environment and file only), ``metavar``,
    ``group`` (the help section) and ``live`` (a running server applies a new value when it gets SIGHUP).
    The default is shown after ``doc`` in the help, so ``doc`` leaves it out.
    """
    return dataclasses.field(default=default, metadata={"doc": doc, **option})


_SECURITY = "security"
_CONNECTIONS = "connections"
_MONITORING = "monitoring"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Every setting of a dhow server and of the commands that work on its stores."""

    repository: str = _setting(
        "models",
        "the model repository: a folder per model with a model.yaml and integer version folders, or the same in "
        "object storage, s3://bucket/prefix (other fsspec URLs too), copied into --repository-cache",
        flags=("--repository", "--model-repository"),
        metavar="DIR|URL",
    )
    host: str = _setting("127.0.0.1", "address the REST and gRPC ports listen on (0.0.0.0 for all)")
    http_port: int = _setting(
        8080, "REST (Open Inference Protocol v2 over HTTP) port; 0 picks a free one", metavar="PORT"
    )
    grpc_port: int = _setting(8081, "gRPC (inference.GRPCInferenceService) port; 0 picks a free one", metavar="PORT")
    model_control: str = _setting(
        "none",
        "none: load all at start; poll: also follow changes on disk; "
        "explicit: load and unload only through the repository API",
    )
    load_models: tuple[str, ...] = _setting(
        (),
        "under explicit control, a model to load at start ('*' = all); repeatable",
        flags=("--load-model",),
        metavar="NAME",
    )
    strict_readiness: bool = _setting(
        True,
        "health/ready (gRPC ServerReady) says ready only while every model the server should serve is loaded and "
        "warmed; false: ready once the models to load at start were tried, whatever their outcome",
        metavar="true|false",
    )
    poll_interval: float = _setting(
        5.0,
        "seconds between repository scans under poll control (object storage: each scan lists the bucket)",
        metavar="SECONDS",
    )
    repository_cache: str = _setting(
        "",
        "with a repository in object storage: the local folder its models are copied into and served from "
        "(default: repository-cache in the data folder)",
        metavar="DIR",
    )
    max_request_bytes: int = _setting(
        64 * 1024 * 1024, "largest request body (REST) or message (gRPC) accepted, in bytes", metavar="N"
    )
    allow_model_upload: bool = _setting(False, "accept model files in load requests (they can run code)")
    data_dir: Path = _setting(  # noqa: RUF009
        Path(".dhow"), "where dhow keeps its own state (uploaded models, the SQLite registry)", metavar="DIR"
    )
    registry: str = _setting(
        "",
        "where deployments, keys and their history are kept: sqlite:///path or postgresql://user@host/db; "
        "default: SQLite in the data folder",
        metavar="URL",
    )
    registry_poll: float = _setting(
        2.0,
        "how often to look for deployment and key changes made by other servers or the CLI sharing the registry",
        metavar="SECONDS",
    )
    log_level: str = _setting("info", "how much the server logs (applied again on SIGHUP)", live=True)
    access_log: bool = _setting(
        True,
        "log one line per REST request at info level: method, path, status, duration, principal, request id "
        "(applied again on SIGHUP)",
        live=True,
    )
    loop: str = _setting("uvloop", "event loop: uvloop (faster) or asyncio")
    workers: int = _setting(
        1,
        "server processes sharing the ports, each with its own copy of the models "
        "(1: this process serves; more: a supervisor starts that many)",
        metavar="N",
    )
    cpu_affinity: str = _setting(
        "off",
        "auto: each server process's event loop on a CPU of its own, the writer processes (payload log, tracing, "
        "audit trail) on the others, so that their work never preempts a loop (Linux; needs more CPUs than "
        "--workers; for a machine or a Kubernetes pod with CPUs of its own); off: the scheduler places everything",
    )

    # -- connections: how long a client may take, and how many may be served at once --
    header_timeout: float = _setting(
        10.0,
        "seconds a client has to send a request's headers (REST), from its first byte or the connection's start, "
        "and to open a gRPC connection (handshake and HTTP/2 settings); then the connection is closed",
        metavar="SECONDS",
        group=_CONNECTIONS,
    )
    body_timeout: float = _setting(
        30.0,
        "longest silence between two parts of a REST request's body; then 408 and the connection is closed",
        metavar="SECONDS",
        group=_CONNECTIONS,
    )
    keepalive_timeout: int = _setting(
        30,
        "seconds an idle REST connection is kept open for the client's next request "
        "(keep it above a load balancer's idle timeout)",
        metavar="SECONDS",
        group=_CONNECTIONS,
    )
    max_connections: int = _setting(
        1000,
        "connections a server process takes at once on each port, counted apart (keep twice it below 'ulimit -n'): "
        "REST connections and requests in flight, counting the one asking, past it a request is answered 503 and "
        "its connection closed; gRPC connections (native front), past it a new one is closed; 0: no bound",
        metavar="N",
        group=_CONNECTIONS,
    )
    http_front: str = _setting(
        "native",
        "what serves the REST port: 'native', dhow's own HTTP/1.1 on the event loop (less CPU per request), or "
        "'uvicorn', uvicorn's HTTP/1.1 server",
        metavar="FRONT",
        group=_CONNECTIONS,
    )
    grpc_front: str = _setting(
        "native",
        "what serves the gRPC port: 'native', dhow's own HTTP/2 on the event loop (a call costs less CPU than "
        "over REST), or 'grpcio', grpc.aio's server (a call costs more than over REST)",
        metavar="FRONT",
        group=_CONNECTIONS,
    )
    grpc_idle_timeout: float = _setting(
        300.0,
        "seconds a gRPC connection with no call in flight is kept open (then GOAWAY; clients reconnect)",
        metavar="SECONDS",
        group=_CONNECTIONS,
    )
    grpc_keepalive: float = _setting(
        60.0,
        "seconds between the server's pings on a quiet gRPC connection; one unanswered for 20 s closes it",
        metavar="SECONDS",
        group=_CONNECTIONS,
    )
    drain_delay: float = _setting(
        0.0,
        "on SIGTERM: seconds the server keeps serving while it says not-ready, so that a load balancer polling "
        "/v2/health/ready moves traffic away before the ports close (under Kubernetes a preStop sleep does this)",
        metavar="SECONDS",
        group=_CONNECTIONS,
    )
    drain_seconds: float = _setting(
        25.0,
        "on SIGTERM, once the ports are closed: seconds given to REST requests, gRPC calls and stream offsets in "
        "flight to finish (keep drain_delay + this + 5 within Kubernetes' terminationGracePeriodSeconds, 30 by "
        "default, minus any preStop sleep)",
        metavar="SECONDS",
        group=_CONNECTIONS,
    )
    #: who the administration commands are, not the server: no ``serve`` option
    actor: str = _setting(
        "",
        "who 'dhow keys', 'tenants', 'models trust' and 'rollout' say made a change (audit trail, history); "
        "default: the login name",
        flags=(),
    )

    # -- security (see docs/security.md) --
    auth: str = _setting(
        "on",
        "on: every request but health needs an API key, JWT or client certificate; "
        "none: no authentication, for local development only",
        group=_SECURITY,
    )
    jwt_issuer: str = _setting(
        "",
        "accept JWT bearer tokens from this issuer ('iss'); unset: JWTs are not accepted",
        metavar="ISS",
        group=_SECURITY,
    )
    jwt_audience: str = _setting("dhow", "the audience ('aud') JWTs must name", metavar="AUD", group=_SECURITY)
    jwt_jwks: str = _setting(
        "", "the JWT issuer's JWKS: a file or an http(s):// URL", metavar="FILE|URL", group=_SECURITY
    )
    jwt_roles_claim: str = _setting("roles", "JWT claim with the roles", metavar="CLAIM", group=_SECURITY)
    jwt_tenant_claim: str = _setting("tenant", "JWT claim with the tenant", metavar="CLAIM", group=_SECURITY)
    tls_cert: str = _setting(
        "", "serve REST and gRPC over TLS only, with this certificate (PEM)", metavar="PEM", group=_SECURITY
    )
    tls_key: str = _setting("", "the private key (PEM) of --tls-cert", metavar="PEM", group=_SECURITY)
    tls_client_ca: str = _setting(
        "", "CA (PEM) of client certificates: mutual TLS, clients named by their CN", metavar="PEM", group=_SECURITY
    )
    tls_client_auth: str = _setting(
        "required",
        "with --tls-client-ca: required (no certificate, no connection) or optional (a key or JWT will do)",
        group=_SECURITY,
    )
    require_tls: bool = _setting(False, "refuse to serve without TLS", group=_SECURITY)
    # never an option: other users of the machine could read it in the process list
    kek: str = _setting(
        "", "key-encryption keys of encrypted artifacts, 'id:base64key[,...]' (DHOW_KEK)", flags=(), group=_SECURITY
    )
    kek_file: str = _setting(
        "",
        "file of key-encryption keys of encrypted artifacts, one 'id:base64key' a line (or DHOW_KEK=id:base64key)",
        metavar="FILE",
        group=_SECURITY,
    )
    require_digests: bool = _setting(
        False, "load only artifacts whose SHA-256 was recorded with 'dhow models trust'", group=_SECURITY
    )
    redis: str = _setting(
        "",
        "share rate limits, and the predictions awaiting feedback, through Redis (redis://host:port/db); unset: "
        "both per process",
        metavar="URL",
        group=_SECURITY,
    )
    queue_timeout_ms: float = _setting(
        10_000.0,
        "how long a request may wait in a model's queue when its model.yaml sets no batching timeout_ms (504 "
        "past it); the queue is also bounded by what the model serves in that time (429 past it); 0: no limit",
        metavar="MS",
    )
    auth_failure_rate: float = _setting(
        10.0,
        "failed authentications per second allowed from one address; past its burst, its failures get 429",
        metavar="PER_SECOND",
        group=_SECURITY,
    )
    auth_failure_burst: float = _setting(
        200.0,
        "failed authentications one address may make at once before the rate applies",
        metavar="N",
        group=_SECURITY,
    )
    region: str = _setting(
        "default",
        "this server's region, e.g. ae or eu: where the data it processes is processed",
        metavar="REGION",
        group=_SECURITY,
    )
    residency_policy: str = _setting(
        "", "YAML file: which data regions may be processed in which regions", metavar="FILE", group=_SECURITY
    )
    audit_store: str = _setting(
        "",
        "the audit trail of this server's region: sqlite:///path or postgresql://...; "
        "default: SQLite in the data folder",
        metavar="URL",
        group=_SECURITY,
    )
    audit_commit_ms: int = _setting(
        25,
        "how long the audit writer gathers inference records before it commits them, in milliseconds (0: at once): "
        "a record has left the server before its request is answered, so a server's crash loses none, but a machine's "
        "crash (power, kernel) can lose up to that long's records of answered requests; admin changes are always "
        "durable before their answer. Fewer commits cost the machine less CPU",
        metavar="MS",
        group=_SECURITY,
    )
    audit_region_stores: tuple[str, ...] = _setting(
        (),
        "the audit store of another data region: a request's records go to its data region's store; repeatable",
        flags=("--audit-region-store",),
        metavar="REGION=URL",
        group=_SECURITY,
    )
    cors_origins: tuple[str, ...] = _setting(
        (),
        "a web origin whose pages may call the REST API from a browser, e.g. https://app.example.com "
        "('*': any); repeatable; unset: no CORS, preflights are refused",
        flags=("--cors-origin",),
        metavar="ORIGIN",
        group=_SECURITY,
    )
    cors_methods: tuple[str, ...] = _setting(
        ("GET", "POST", "PUT", "DELETE"),
        "with --cors-origin: the methods a browser may use; repeatable",
        flags=("--cors-method",),
        metavar="METHOD",
        group=_SECURITY,
    )
    cors_headers: tuple[str, ...] = _setting(
        ("authorization", "content-type", "inference-header-content-length", "x-request-id", "x-dhow-data-region"),
        "with --cors-origin: the request headers a browser may send; repeatable",
        flags=("--cors-header",),
        metavar="HEADER",
        group=_SECURITY,
    )
    masking_key_file: str = _setting(
        "",
        "file of the keyed-hash secret of PII masking (created when absent); default: masking.key in the data folder",
        metavar="FILE",
        group=_SECURITY,
    )

    streams: tuple[dict[str, Any], ...] = _setting(
        (),
        "stream consumers this server also runs: a list of {model, source, sink, dead_letter, group, format, ...} "
        "(the options of 'dhow stream run'); settings file or DHOW_STREAMS (YAML) only",
        flags=(),
    )

    # -- monitoring: payload log, tracing (README "Monitoring") --
    payload_log: str = _setting(
        "",
        "log every inference's masked request and answer, and every error, to file:///PATH.jsonl (rotated; "
        "?max_bytes=N&backups=N), kafka://HOST:PORT/TOPIC (?librdkafka.setting=value) or http(s)://URL "
        "(CloudEvents); a model opts out with 'payload_log: false' in its model.yaml; unset: off",
        metavar="URL",
        group=_MONITORING,
    )
    payload_log_queue: int = _setting(
        10_000,
        "payload events waiting for the sink at most; past it new events are dropped and counted, never waited for",
        metavar="N",
        group=_MONITORING,
    )
    payload_log_queue_bytes: int = _setting(
        256 << 20,
        "bytes of payload events waiting for the sink at most (their requests' JSON bodies or arrays and their "
        "answers' arrays; in the writer their JSON answers too), in the server and again in its writer: past it "
        "new events are dropped and counted, so that large bodies never hold gigabytes (what is being handed over "
        "comes on top: up to about twice; one event larger than it goes alone into an empty queue)",
        metavar="BYTES",
        group=_MONITORING,
    )
    writer_priority: str = _setting(
        "idle",
        "CPU priority of the payload log's and tracing's writer processes (Linux): idle (SCHED_IDLE: they use CPU "
        "time serving does not want, never delay a request, and a machine busy serving fills their queues: events "
        "dropped and counted) or normal (they take a fair share beside serving: events kept while they keep up, "
        "answers slower)",
        group=_MONITORING,
    )
    otlp_endpoint: str = _setting(
        "",
        "send OpenTelemetry spans (admission, queue, batch, compute, encoding) over OTLP/HTTP to this collector, "
        "e.g. http://127.0.0.1:4318; unset: no tracing, at no cost",
        metavar="URL",
        group=_MONITORING,
    )
    trace_sample_ratio: float = _setting(
        0.1,
        "share of requests traced when the caller's traceparent decides nothing (a sampled parent is always followed); "
        "needs --otlp-endpoint",
        metavar="RATIO",
        group=_MONITORING,
    )

    def repository_is_remote(self) -> bool:
        """Whether the repository is in object storage (a URL) rather than a folder."""
        location = str(self.repository)  # a caller building the settings in code may give a Path
        return "://" in location and not location.startswith("file://")

    def repository_folder(self) -> Path:
        """The folder the server reads models from: the repository itself, or its object storage's local copy."""
        if not self.repository_is_remote():
            return Path(local_path(str(self.repository), "--repository"))
        if self.repository_cache:
            return Path(self.repository_cache)
        digest = hashlib.sha256(str(self.repository).rstrip("/").encode()).hexdigest()[:12]
        return self.data_dir / "repository-cache" / digest

    def registry_url(self) -> str:
        """The registry's URL, with the default (SQLite in the data folder) filled in."""
        return self.registry or f"sqlite:///{(self.data_dir / 'registry.sqlite3').resolve()}"

    def audit_url(self) -> str:
        """The audit trail's URL (this server's region), with the default (SQLite in the data folder) filled in."""
        return self.audit_store or f"sqlite:///{(self.data_dir / 'audit.sqlite3').resolve()}"

    def audit_urls(self) -> dict[str, str]:
        """The audit store of each data region: this server's region, then the ``audit_region_stores`` entries."""
        urls = {self.region: self.audit_url()}
        for entry in self.audit_region_stores:
            region, sep, url = entry.partition("=")
            if not sep or not url.strip():
                raise InvalidInput(f"--audit-region-store expects REGION=URL, got {entry!r}")
            urls[check_region_name(region.strip(), "--audit-region-store")] = url.strip()
        return urls

    def actor_name(self) -> str:
        """Who a person running a dhow command is in the audit trail and the deployment history.

        The ``actor`` setting, else the login name (``$USER``, then the system's), else ``anonymous``. The
        name is bare (``alice``, not ``cli:alice``): it is what the server records for the CLI's admin
        requests under ``--auth none``, so that a person is named the same by every command.
        """
        return self.actor or _login_name()


def live_settings() -> tuple[str, ...]:
    """The settings a running server applies again when it gets SIGHUP; the others need a restart."""
    return tuple(field.name for field in dataclasses.fields(ServerSettings) if field.metadata.get("live"))


def _login_name() -> str:
    user = os.environ.get("USER")
    if user:
        return user
    try:
        return getpass.getuser() or ANONYMOUS_ACTOR
    except (KeyError, OSError, ImportError):  # no user name anywhere (a container without a passwd entry)
        return ANONYMOUS_ACTOR
