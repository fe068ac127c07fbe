"""`dhow gateway config`: what it writes is accepted by the real HAProxy and nginx, and bad input is refused with a
message naming the option, what is wrong and what is expected."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dhow.cli import main
from tests.conftest import system_binary

REPLICAS = ["--backend", "127.0.0.1:9001", "--backend", "localhost:9002",
            "--grpc-backend", "127.0.0.1:9101", "--grpc-backend", "localhost:9102"]  # fmt: skip


def _binary(name: str) -> str:
    return system_binary(name, "make system-packages (apt-get install haproxy nginx-light)")


def _write(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "proxy.cfg"
    assert main(["gateway", "config", *args, "--out", str(out)]) == 0
    return out


def test_the_haproxy_configuration_is_valid_and_checks_readiness(tmp_path: Path) -> None:
    out = _write(tmp_path, *REPLICAS, "--stats-listen", "8404")
    check = subprocess.run([_binary("haproxy"), "-c", "-f", str(out)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    text = out.read_text()
    assert "http-check send meth GET uri /v2/health/ready" in text
    assert "server replica2 localhost:9102 proto h2 check" in text
    # the gRPC back end of a replica is checked on that replica's REST port
    assert "check-proto h1 port 9002" in text
    assert "option redispatch 1" in text
    # a call is repeated only if HAProxy held it whole: it waits for the bodies of those it may repeat, but
    # not for a stream's, which ends only when its client is done
    assert "http-request wait-for-body time 10s if safe_to_repeat" in text
    assert "wait-for-body time 10s if inference_call !stream_call !write_call" in text


def test_the_nginx_configuration_is_valid(tmp_path: Path) -> None:
    out = _write(tmp_path, *REPLICAS, "--proxy", "nginx", "--stats-listen", "127.0.0.1:8404")
    text = out.read_text().replace("pid nginx-dhow.pid;", f"pid {tmp_path / 'nginx.pid'};")
    out.write_text(text)
    check = subprocess.run([_binary("nginx"), "-t", "-c", str(out), "-p", str(tmp_path)], capture_output=True,
                           text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "grpc_pass grpc://dhow_grpc;" in text and "listen 0.0.0.0:8081 http2;" in text
    assert "proxy_request_buffering on;" in text  # what lets nginx repeat a call a replica died with


def test_it_writes_to_standard_output_without_out(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gateway", "config", "--backend", "127.0.0.1:9001"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# HAProxy") and "frontend dhow_grpc" not in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "http://127.0.0.1:9001"], "leave out the scheme ('http://')"),
        (["--backend", "127.0.0.1"], "got '127.0.0.1': the port is missing"),
        (["--backend", "127.0.0.1:99999"], "the port must be a number from 1 to 65535"),
        (["--backend", "::1:9001"], "write an IPv6 address in brackets"),
        (["--backend", "bad_host:9001"], "'bad_host' is neither an IP address nor a host name"),
        (["--backend", "10.0.0:9001"], "'10.0.0' is neither an IP address nor a host name"),
        (["--backend", "a:1", "--backend", "a:1"], "--backend: a replica is given twice"),
        (["--backend", "a:1", "--backend", "b:1", "--grpc-backend", "a:2"], "2 --backend and 1 --grpc-backend"),
        (["--backend", "127.0.0.1:8080"], "the proxy would listen on 0.0.0.0:8080"),
        (["--backend", "a:1", "--listen", "9000", "--grpc-listen", "9000"], "need a port each"),
        (["--backend", "a:1", "--timeout", "0"], "--timeout must be a number of seconds above 0"),
        (["--backend", "a:1", "--retries", "-1"], "--retries must be from 0 to 10"),
    ],
)
def test_bad_input_is_refused_saying_what_is_wrong(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["gateway", "config", *args]) == 2
    error = capsys.readouterr().err
    assert message in error, error
    assert error.startswith("dhow: ")


def test_ipv6_and_bare_ports_are_written_as_the_proxy_reads_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gateway", "config", "--backend", "[::1]:9001", "--listen", "9000"]) == 0
    text = capsys.readouterr().out
    assert "server replica1 [::1]:9001 check" in text
    assert "bind 0.0.0.0:9000" in text
