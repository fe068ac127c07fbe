"""The configuration of an existing proxy (HAProxy or nginx) in front of dhow replicas on one host or a few.

dhow writes the proxy's configuration; it does not proxy itself. What every configuration does:

- REST (HTTP/1.1) and gRPC (HTTP/2 cleartext, h2c, to the replicas) on their own ports;
- least-connections balancing: a replica busy with a slow batch gets fewer new requests;
- retries on another replica (redispatch) when a connection to a replica fails, and, for the calls that are
  safe to repeat (inference is a pure function of its inputs; reads), also when a replica closed the
  connection without an answer (killed) or answered 503 (a model not loaded there); the admin API's writes
  are retried only when they never reached a replica. HAProxy can repeat a request only if it had the whole
  of it before sending it on (it keeps a copy then), so the configuration makes it wait for those bodies;
  nginx reads a REST body whole by default (``proxy_request_buffering``), but streams a gRPC call's body, so
  it repeats a gRPC call only when the call never reached a replica;
- HAProxy only: active health checks on each replica's ``GET /v2/health/ready`` (a gRPC back end is checked
  on its replica's REST port), so that a replica that is loading or draining gets no new requests.
  nginx's open-source build has no active checks: it takes a replica out after a failed attempt.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass

from dhow.core.errors import InvalidInput

__all__ = ["PROXIES", "Endpoint", "GatewayPlan", "parse_endpoint", "render"]

PROXIES = ("haproxy", "nginx")
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
#: REST paths whose POST is safe to repeat on another replica: inference, in every protocol dhow speaks
_REST_INFERENCE = (
    r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$",  # Open Inference Protocol v2
    r"^/v1/models/[^/]+(/versions/[^/]+)?:(predict|classify|regress)$",  # TensorFlow Serving, KServe v1
    r"^/predictions/",  # TorchServe
)
#: gRPC methods that change the server: never repeated once they reached a replica
_GRPC_WRITES = "/inference.GRPCInferenceService/RepositoryModel"
#: the gRPC inference service's calls, every one but the stream a single message (a whole body to wait for)
_GRPC_INFERENCE = "/inference.GRPCInferenceService/"
_GRPC_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
#: how long HAProxy waits for a request's headers, and for the body of a request it may have to repeat
_HAPROXY_REQUEST_WAIT = "10s"
#: why HAProxy waits for the body of the requests it may repeat (said once in each back end that does)
_HAPROXY_WHOLE_BODY = (
    "    # HAProxy keeps a copy to repeat (retry-on) only of a request it had whole when it sent it on: a body",
    "    # that came after its headers (clients write them apart, a busy host reads them apart) made a killed",
    "    # replica's call a 502 with no retry. So wait for the body (one buffer at most, 408 after the wait).",
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str, option: str, *, default_host: str | None = None) -> Endpoint:
    """``HOST:PORT`` (``[IPv6]:PORT``; with ``default_host``, a bare ``PORT`` too), or an error saying what is
    wrong with it and what is expected."""
    expected = f"{option} expects HOST:PORT (e.g. 127.0.0.1:9001, replica-1:9001 or [::1]:9001)"
    value = text.strip()
    if "://" in value:
        raise InvalidInput(f"{expected}, got {text!r}: leave out the scheme ('{value.split('://', 1)[0]}://')")
    if "/" in value:
        raise InvalidInput(f"{expected}, got {text!r}: an address has no path")
    if default_host is not None and value.isdigit():
        host, port_text = default_host, value
    elif value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise InvalidInput(f"{expected}, got {text!r}: an IPv6 address is written [ADDRESS]:PORT")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise InvalidInput(f"{expected}, got {text!r}: the port is missing")
        if ":" in host:
            raise InvalidInput(f"{expected}, got {text!r}: write an IPv6 address in brackets, [ADDRESS]:PORT")
    return Endpoint(_host(host, text, expected), _port(port_text, text, expected))


def _host(host: str, text: str, expected: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host) or host.replace(".", "").isdigit():
        raise InvalidInput(f"{expected}, got {text!r}: {host!r} is neither an IP address nor a host name")
    return host.lower()


def _port(port_text: str, text: str, expected: str) -> int:
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InvalidInput(f"{expected}, got {text!r}: the port must be a number from 1 to 65535")
    return int(port_text)


@dataclass(frozen=True, slots=True)
class GatewayPlan:
    """What the proxy does: where it listens, the replicas (the i-th gRPC back end is the i-th REST one's
    replica, checked on its REST port), and its time limits."""

    backends: tuple[Endpoint, ...]
    grpc_backends: tuple[Endpoint, ...]
    listen: Endpoint
    grpc_listen: Endpoint
    stats_listen: Endpoint | None = None
    check_interval_s: float = 1.0
    connect_timeout_s: float = 2.0
    timeout_s: float = 60.0
    retries: int = 2
    max_body_mb: int = 64

    def __post_init__(self) -> None:
        if not self.backends:
            raise InvalidInput("give at least one replica: --backend HOST:PORT (its REST port), once per replica")
        if self.grpc_backends and len(self.grpc_backends) != len(self.backends):
            raise InvalidInput(
                f"{len(self.backends)} --backend and {len(self.grpc_backends)} --grpc-backend: give one gRPC address "
                "per replica, in the same order as --backend (the replica's REST port answers its health checks)"
            )
        for option, endpoints in (("--backend", self.backends), ("--grpc-backend", self.grpc_backends)):
            seen = {str(e) for e in endpoints}
            if len(seen) != len(endpoints):
                raise InvalidInput(f"{option}: a replica is given twice; each address once")
        listens = [self.listen, self.grpc_listen] + ([self.stats_listen] if self.stats_listen else [])
        if len({e.port for e in listens}) != len(listens):
            raise InvalidInput("--listen, --grpc-listen and --stats-listen need a port each")
        for listen in listens:
            for backend in self.backends + self.grpc_backends:
                if _same_socket(listen, backend):
                    raise InvalidInput(
                        f"the proxy would listen on {listen}, which is the replica {backend}: choose another port"
                    )
        for name, value in (
            ("--check-interval", self.check_interval_s),
            ("--connect-timeout", self.connect_timeout_s),
            ("--timeout", self.timeout_s),
        ):
            if not value > 0:
                raise InvalidInput(f"{name} must be a number of seconds above 0, got {value:g}")
        if self.max_body_mb < 1:
            raise InvalidInput(f"--max-body-mb must be at least 1, got {self.max_body_mb}")
        if not 0 <= self.retries <= 10:
            raise InvalidInput(f"--retries must be from 0 to 10, got {self.retries}")

    def replica(self, index: int) -> str:
        return f"replica{index + 1}"


def _same_socket(listen: Endpoint, backend: Endpoint) -> bool:
    """Whether the proxy listening there would take a replica's port on this host."""
    if listen.port != backend.port:
        return False
    local = backend.host == "localhost" or (_is_ip(backend.host) and ipaddress.ip_address(backend.host).is_loopback)
    return listen.host == backend.host or (listen.host in ("0.0.0.0", "::") and local)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def render(plan: GatewayPlan, proxy: str) -> str:
    """The proxy's whole configuration file."""
    if proxy == "haproxy":
        return _haproxy(plan)
    if proxy == "nginx":
        return _nginx(plan)
    raise InvalidInput(f"--proxy must be one of {', '.join(PROXIES)}, got {proxy!r}")


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _haproxy(plan: GatewayPlan) -> str:
    check = f"check inter {_ms(plan.check_interval_s)} fall 2 rise 2"
    lines = [
        "# HAProxy >= 2.4 configuration written by `dhow gateway config`; check it with: haproxy -c -f FILE",
        "global",
        "    # no maxconn: HAProxy derives it from the file descriptor limit (ulimit -n) it is started with",
        "    # a request is retried on another replica only if it fits in one buffer: 64 KiB of JSON or tensors",
        "    tune.bufsize 65536",
        "",
        "defaults",
        "    mode http",
        "    log stderr format raw local0",
        "    option httplog",
        f"    timeout connect {_ms(plan.connect_timeout_s)}",
        f"    timeout client {_ms(plan.timeout_s)}",
        f"    timeout server {_ms(plan.timeout_s)}",
        f"    timeout http-request {_HAPROXY_REQUEST_WAIT}",
        "    timeout http-keep-alive 10s",
        "    timeout queue 10s",
        "    # a failed try goes to another replica (redispatch); what is retried is said per back end",
        f"    retries {plan.retries}",
        "    option redispatch 1",
        "    # a replica is sent traffic only while it says it is ready (models loaded and warmed, not draining)",
        "    option httpchk",
        "    http-check send meth GET uri /v2/health/ready ver HTTP/1.1 hdr host dhow",
        "    http-check expect status 200",
        "",
        "frontend dhow_rest",
        f"    bind {plan.listen}",
        "    option forwardfor",
        "    http-request set-header X-Forwarded-Proto http",
        f"    http-request deny deny_status 413 if {{ req.hdr_val(content-length) gt {plan.max_body_mb << 20} }}",
        "    default_backend dhow_rest",
        "",
        "backend dhow_rest",
        "    balance leastconn",
        "    # inference is idempotent (a pure function of its inputs), reads too: both are safe to repeat, so",
        "    # they are retried when a replica died with them or had no model",
        "    retry-on conn-failure empty-response junk-response 503",
        "    acl safe_to_repeat method GET HEAD",
        *(f"    acl safe_to_repeat path_reg {pattern}" for pattern in _REST_INFERENCE),
        "    # anything else (the admin API's writes) only when it never reached a replica",
        "    http-request disable-l7-retry unless safe_to_repeat",
        *_HAPROXY_WHOLE_BODY,
        f"    http-request wait-for-body time {_HAPROXY_REQUEST_WAIT} if safe_to_repeat",
        *(f"    server {plan.replica(i)} {backend} {check}" for i, backend in enumerate(plan.backends)),
    ]
    if plan.grpc_backends:
        lines += [
            "",
            "frontend dhow_grpc",
            f"    bind {plan.grpc_listen} proto h2",
            "    default_backend dhow_grpc",
            "",
            "backend dhow_grpc",
            "    balance leastconn",
            "    # inference is idempotent: a call ending without an answer (replica killed) is repeated elsewhere;",
            "    # loads and unloads are not",
            "    retry-on conn-failure empty-response junk-response",
            f"    acl write_call path_beg {_GRPC_WRITES}",
            f"    acl inference_call path_beg {_GRPC_INFERENCE}",
            f"    acl stream_call path {_GRPC_STREAM}",
            "    http-request disable-l7-retry if write_call",
            *_HAPROXY_WHOLE_BODY,
            "    # (streams are not waited for: their bodies end when the client is done, which may be never)",
            f"    http-request wait-for-body time {_HAPROXY_REQUEST_WAIT} if inference_call !stream_call !write_call",
        ]
        for i, (grpc, rest) in enumerate(zip(plan.grpc_backends, plan.backends, strict=True)):
            # checked on its replica's REST port (HTTP/1.1), at the REST address when the host differs
            where = f"port {rest.port}" if rest.host == grpc.host else f"addr {rest.host} port {rest.port}"
            lines.append(f"    server {plan.replica(i)} {grpc} proto h2 {check} check-proto h1 {where}")
    if plan.stats_listen is not None:
        lines += [
            "",
            "frontend stats",
            f"    bind {plan.stats_listen}",
            "    # the proxy's own figures for Prometheus, and its status page",
            "    http-request use-service prometheus-exporter if { path /metrics }",
            "    stats enable",
            "    stats uri /stats",
            "    stats refresh 5s",
        ]
    return "\n".join(lines) + "\n"


def _nginx(plan: GatewayPlan) -> str:
    tries = plan.retries + 1
    timeouts = [
        f"proxy_connect_timeout {_ms(plan.connect_timeout_s)};",
        f"proxy_read_timeout {_ms(plan.timeout_s)};",
        f"proxy_send_timeout {_ms(plan.timeout_s)};",
    ]
    # nginx takes whole seconds here
    fail = f"max_fails=1 fail_timeout={max(1, math.ceil(plan.check_interval_s * 5))}s"
    lines = [
        "# nginx configuration written by `dhow gateway config`; check it with: nginx -t -c FILE",
        "# nginx's open-source build has no active health checks: a replica is taken out for fail_timeout after a",
        "# failed attempt, and the request goes to the next one. HAProxy (--proxy haproxy) checks readiness itself.",
        "worker_processes auto;",
        "error_log stderr warn;",
        "pid nginx-dhow.pid;",
        "events { worker_connections 4096; }",
        "",
        "http {",
        "    access_log off;",
        f"    client_max_body_size {plan.max_body_mb}m;",
        "    upstream dhow_rest {",
        "        least_conn;",
        *(f"        server {backend} {fail};" for backend in plan.backends),
        "        keepalive 64;",
        "    }",
        "    server {",
        f"        listen {plan.listen};",
        "        proxy_http_version 1.1;",
        '        proxy_set_header Connection "";',
        "        proxy_set_header Host $host;",
        "        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        *(f"        {line}" for line in timeouts),
        f"        proxy_next_upstream_tries {tries};",
        "        # a request is repeated on another replica only if nginx read it whole before sending it on",
        "        proxy_request_buffering on;",
        "        # inference is idempotent (a pure function of its inputs): safe to repeat on another replica",
        f"        location ~ ({'|'.join(_REST_INFERENCE)}) {{",
        "            proxy_next_upstream error timeout http_502 http_503 non_idempotent;",
        "            proxy_pass http://dhow_rest;",
        "        }",
        "        # anything else: reads are repeated, writes only when they never reached a replica",
        "        location / {",
        "            proxy_next_upstream error timeout http_502 http_503;",
        "            proxy_pass http://dhow_rest;",
        "        }",
        "    }",
    ]
    if plan.grpc_backends:
        lines += [
            "    upstream dhow_grpc {",
            "        least_conn;",
            *(f"        server {grpc} {fail};" for grpc in plan.grpc_backends),
            "        keepalive 64;",
            "    }",
            "    server {",
            f"        listen {plan.grpc_listen} http2;",
            f"        grpc_connect_timeout {_ms(plan.connect_timeout_s)};",
            f"        grpc_read_timeout {_ms(plan.timeout_s)};",
            f"        grpc_next_upstream_tries {tries};",
            "        # nginx streams a gRPC call's body to the replica (no buffering): a call is repeated on another",
            "        # one only if it never reached the first; HAProxy repeats those a killed replica held too",
            f"        location {_GRPC_WRITES} {{",
            "            grpc_next_upstream error timeout;",
            "            grpc_pass grpc://dhow_grpc;",
            "        }",
            "        location / {",
            "            grpc_next_upstream error timeout http_502 http_503 non_idempotent;",
            "            grpc_pass grpc://dhow_grpc;",
            "        }",
            "    }",
        ]
    if plan.stats_listen is not None:
        lines += [
            "    server {",
            f"        listen {plan.stats_listen};",
            "        location = /stats { stub_status; }",
            "    }",
        ]
    return "\n".join([*lines, "}"]) + "\n"
