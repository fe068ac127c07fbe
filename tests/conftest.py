"""Shared fixtures: the demo repository, built once, and real `dhow serve` processes on free ports."""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar

import psycopg
import pytest

IN_CI = os.environ.get("CI") == "true"
#: a PostgreSQL role that may create databases; each test that needs one gets a fresh database
PG_ADMIN_URL = os.environ.get("DHOW_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
#: the machine's Redis (rate limits and feedback shared between processes)
REDIS_URL = os.environ.get("DHOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unavailable(message: str) -> NoReturn:
    """A test that needs something the machine lacks: skipped with the reason here, failed on CI."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def system_binary(name: str, install: str) -> str:
    """The path of a program installed from the machine's packages (``/usr/sbin`` included, off root's PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if found is None:
        unavailable(f"{name} is not installed: {install}")
    return found


def pg_url(database: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """``REDIS_URL``, once it answers (else skipped, failed on CI)."""
    import redis

    try:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2) as client:
            client.ping()
    except (redis.RedisError, OSError) as exc:
        unavailable(f"Redis is not reachable at {REDIS_URL} ({exc}); set DHOW_TEST_REDIS_URL")
    return REDIS_URL


@pytest.fixture(scope="session")
def pg_available() -> None:
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as err:
        unavailable(f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({err}); set DHOW_TEST_PG_ADMIN_URL")


def _fresh_database(options: str = "") -> Iterator[str]:
    """A fresh PostgreSQL database (made with ``options``), its URL yielded, dropped after the test."""
    name = f"dhow_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" {options}')
    try:
        yield pg_url(name)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')  # a test may have closed it
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_database(pg_available: None) -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database, dropped after the test."""
    yield from _fresh_database()


@pytest.fixture
def latin1_database(pg_available: None) -> Iterator[str]:
    """A PostgreSQL database in LATIN1 (as some older installations are): it cannot hold an emoji."""
    yield from _fresh_database("ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL on an empty database of each kind (SQLite in a folder the store must make)."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'nested' / 'store.sqlite3'}"
    return str(request.getfixturevalue("pg_database"))


class _Closable(Protocol):
    def close(self) -> None: ...


_Store = TypeVar("_Store", bound=_Closable)


@contextlib.contextmanager
def store_opener(open_url: Callable[[str], _Store], url: str) -> Iterator[Callable[[], _Store]]:
    """Opens stores (one connection each) on ``url``; all are closed when the block ends."""
    stores: list[_Store] = []

    def opener() -> _Store:
        store = open_url(url)
        stores.append(store)
        return store

    try:
        yield opener
    finally:
        for store in stores:
            store.close()


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition`` every 0.1 s until it holds; fail saying ``what`` did not happen within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not met in {timeout} s")


def make_key(data_dir: Path, name: str, roles: list[str], tenant: str = "default") -> str:
    """An API key made in a data folder's registry before a server starts there; its token."""
    from dhow.access.store import AccessStore

    store = AccessStore.open(f"sqlite:///{data_dir / 'registry.sqlite3'}")
    try:
        made = store.create_key(name, tenant=tenant, roles=roles, actor="test")
    finally:
        store.close()
    assert made is not None
    return made[1]


def http_request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One request on a new connection to 127.0.0.1 (JSON body if any); the status and the body answered."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"content-type": "application/json"})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (raises TimeoutError if it never does)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def write_model(repository: Path, name: str, manifest: str, files: dict[str, str]) -> Path:
    """A model folder: ``model.yaml`` and the files of its versions (``{"1/model.py": source}``); the folder."""
    folder = repository / name
    for path, text in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text, encoding="utf-8")
    (folder / "model.yaml").write_text(manifest, encoding="utf-8")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class DhowProcess:
    """A real `dhow serve` process; its log is kept so that tests can read what it wrote."""

    repository: Path | str
    http_port: int
    grpc_port: int
    log_path: Path
    process: subprocess.Popen[bytes]
    args: list[str] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dhow exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"dhow did not become ready in {timeout} s:\n{self.log()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_dhow(
    repository: Path | str,
    log_dir: Path,
    *extra: str,
    wait: bool = True,
    started: Callable[[DhowProcess], bool] | None = None,
) -> DhowProcess:
    """A server on free ports, ready unless ``wait`` is False (then, given ``started``, once that says it started
    or it exited). A port found free can be taken by another process before the server binds it: a server that
    exits saying so is started again on other ports (three tries)."""
    for attempt in range(3):
        server = _start_dhow(repository, log_dir, extra)
        if not wait and started is None:
            return server
        try:
            if wait:
                server.wait_ready()
            else:
                assert started is not None
                wait_until(lambda s=server: s.process.poll() is not None or started(s), 60.0, "the server's start")
                if server.process.poll() not in (None, 0) and "address already in use" in server.log().lower():
                    raise RuntimeError("a port was taken")
        except BaseException:
            server.stop()
            taken = server.process.returncode not in (None, 0) and "address already in use" in server.log().lower()
            if taken and attempt < 2:
                continue
            raise
        return server
    raise AssertionError("unreachable")


def _start_dhow(repository: Path | str, log_dir: Path, extra: tuple[str, ...]) -> DhowProcess:
    http_port, grpc_port = free_port(), free_port()
    args = [
        sys.executable, "-m", "dhow.cli", "serve",
        "--repository", str(repository),
        "--http-port", str(http_port),
        "--grpc-port", str(grpc_port),
        "--data-dir", str(log_dir / "data"),
        # tests of other features run without authentication unless they ask for it
        *(() if any(arg.startswith("--auth") for arg in extra) else ("--auth", "none")),
        *extra,
    ]  # fmt: skip
    log_path = log_dir / f"dhow-{http_port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT)
    return DhowProcess(repository, http_port, grpc_port, log_path, process, args)


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models, built once from seeded synthetic data (read-only: copy before changing)."""
    from dhow.demo import build_demo_repository

    out = tmp_path_factory.mktemp("demo") / "models"
    build_demo_repository(out)
    return out


@pytest.fixture
def repository_copy(demo_repository: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the demo repository."""
    target = tmp_path / "models"
    shutil.copytree(demo_repository, target)
    return target


@pytest.fixture(scope="session")
def dhow_server(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DhowProcess]:
    """One server over the demo repository, shared by the tests that only read."""
    server = start_dhow(demo_repository, tmp_path_factory.mktemp("server"))
    yield server
    assert server.stop() == 0, server.log()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local S3-compatible server (moto) for the tests of s3:// inputs and repositories; its URL."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as exc:
        unavailable(f"moto[server] and s3fs are needed for the S3 test ({exc}); pip install -e '.[dev]'")
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), 60, "the S3 server answering")
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


#: what boto3 and s3fs need to talk to the moto server
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
