"""One dhow server process: the data plane with its REST and gRPC doors on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Iterator

import uvicorn

from dhow.access.tls import TlsSettings
from dhow.core.artifacts import install_decryptor
from dhow.governance.masked_stream import mask_standard_streams
from dhow.governance.masking import Masker, install_log_masking, parse_masking
from dhow.governance.residency import ResidencyPolicy, check_region_name
from dhow.monitoring.metrics import ServerMetrics
from dhow.protocols.grpc import GrpcServer, create_grpc_server
from dhow.protocols.rest import RestApp
from dhow.protocols.rest.tls import https_port_protocol
from dhow.repository.encryption import Keyring
from dhow.repository.store import ModelRepository
from dhow.rollouts.controller import RolloutController
from dhow.rollouts.store import RegistryStore
from dhow.serving.dataplane import DataPlane
from dhow.serving.guard import AccessGuard
from dhow.serving.model_manager import ModelControl, ModelManager
from dhow.serving.security import Security, masking_key
from dhow.settings import ServerSettings

log = logging.getLogger("dhow.server")


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: the dhow server owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Server:
    """One server process; ``http_socket``: a REST socket bound by the caller (a worker sharing the port)."""

    def __init__(self, settings: ServerSettings, http_socket: socket.socket | None = None) -> None:
        self.settings = settings
        self.http_socket = http_socket
        self.metrics = ServerMetrics()
        control = ModelControl(settings.model_control)
        upload_dir = settings.data_dir / "uploads" if settings.allow_model_upload else None
        if upload_dir is not None:
            upload_dir.mkdir(parents=True, exist_ok=True)
        self.models = ModelManager(
            ModelRepository(settings.repository),
            self.metrics,
            control=control,
            upload_dir=upload_dir,
            workers=settings.workers,
        )
        self.dataplane = DataPlane(self.models)
        self.rest = RestApp(
            self.dataplane, max_body_bytes=settings.max_request_bytes, metrics_handler=self.metrics.render
        )
        # what can be checked without I/O is checked here, so that a wrong option fails before any port opens
        self.tls = TlsSettings.resolve(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca, settings.tls_client_auth, settings.require_tls
        )
        keyring = Keyring.load(settings.kek, settings.kek_file)
        install_decryptor(keyring.decrypt if keyring is not None else None)
        self.dataplane.region = check_region_name(settings.region, "--region")
        self.dataplane.residency = ResidencyPolicy.load(settings.residency_policy)
        self.security = Security(settings)
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def serve(self, on_ready: Callable[[], None] | None = None, *, load_first: bool = False) -> None:
        """Serve until stopped; ``on_ready`` is called once the models are loaded and the doors open.

        The doors open before the models load, and health says "not ready" meanwhile; with ``load_first`` (a
        worker replacing one that died) they open after, so that until then the kernel gives new connections
        to the workers that are serving.
        """
        settings = self.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        guard = await self.security.start(self.models, self.dataplane)
        self.rest.guard = guard
        rollouts = await self._load() if load_first else None
        http, http_task, grpc = await self._open_doors(guard)
        if rollouts is None:
            rollouts = await self._load()
        self.dataplane.is_ready = True
        self.metrics.workers.set(1)  # answering now: a worker that is still loading is not counted
        poller = None
        if self.models.control is ModelControl.POLL:
            poller = asyncio.create_task(self.models.poll_forever(settings.poll_interval))
        log.info("dhow is ready")
        if on_ready is not None:
            on_ready()
        await self._stop.wait()
        log.info("dhow is shutting down")
        self.dataplane.is_ready = False
        self.metrics.workers.set(0)
        if poller is not None:
            poller.cancel()
        http.should_exit = True
        await grpc.server.stop(5)
        await http_task
        await rollouts.close()
        await self.models.close()
        await self.security.close()
        log.info("dhow stopped")

    async def _load(self) -> RolloutController:
        """Load the models the control mode says to load at start, then apply the deployments."""
        control = self.models.control
        await self.models.start(None if control is not ModelControl.EXPLICIT else list(self.settings.load_models))
        return await self._start_rollouts()

    async def _open_doors(self, guard: AccessGuard) -> tuple[_HttpServer, asyncio.Task[None], GrpcServer]:
        """Start gRPC and REST; a port that cannot be served stops the process with a message."""
        settings = self.settings
        tls = self.tls
        http = _HttpServer(
            uvicorn.Config(
                self.rest,
                host=settings.host,
                port=settings.http_port,
                lifespan="off",
                access_log=False,
                # uvicorn's own records go to the root handlers, through the PII masking filter
                log_config=None,
                log_level="warning",
                # with TLS the port's own protocol starts it, so that plain HTTP gets a 400 instead of silence
                http=https_port_protocol(tls.ssl_context()) if tls is not None else "httptools",
                loop="none",
                timeout_keep_alive=30,
            )
        )
        grpc = await create_grpc_server(
            self.dataplane,
            settings.host,
            settings.grpc_port,
            max_message_bytes=settings.max_request_bytes,
            guard=guard,
            credentials=tls.grpc_credentials() if tls is not None else None,
            reuse_port=settings.workers > 1,
        )
        await grpc.server.start()
        http_task = asyncio.create_task(http.serve(None if self.http_socket is None else [self.http_socket]))
        while not http.started and not http_task.done():
            await asyncio.sleep(0.01)
        if http_task.done():
            await grpc.server.stop(None)
            await http_task
            raise SystemExit(f"dhow: cannot serve REST on {settings.host}:{settings.http_port}")
        log.info(
            "dhow serving %s: REST on %s://%s:%d, gRPC on %s:%d, model control %s",
            settings.repository,
            "https" if tls is not None else "http",
            settings.host,
            settings.http_port,
            settings.host,
            grpc.port,
            settings.model_control,
        )
        return http, http_task, grpc

    async def _start_rollouts(self) -> RolloutController:
        """Open the registry of deployments and apply them; the data plane then routes by them."""
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = await asyncio.to_thread(RegistryStore.open, settings.registry_url())
        rollouts = RolloutController(store, self.models, self.metrics, poll_s=settings.registry_poll)
        rollouts.audit = self.security.audit
        self.dataplane.rollouts = rollouts
        await rollouts.start(self.dataplane.infer_version)
        log.info("deployments: %d applied from %s", len(rollouts.active), _safe_url(settings.registry_url()))
        return rollouts


def _safe_url(url: str) -> str:
    """A database URL without its password, for the log."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        credentials, _, host = rest.rpartition("@")
        rest = f"{credentials.split(':', 1)[0]}@{host}"
    return f"{scheme}{sep}{rest}"


def configure_logging(settings: ServerSettings) -> None:
    """Log lines to stderr, masked like what model code prints; with several workers each names its process."""
    process = "[%(process)d]" if settings.workers > 1 else ""
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s %(name)s{process}: %(message)s"
    )
    masker = Masker(parse_masking(None, "logs"), masking_key(settings))
    # PII never reaches a log line, whichever logger wrote it
    install_log_masking(masker)
    # nor this process's output: a thread instance's model prints here (a process instance's output is logged)
    mask_standard_streams(masker)


def run_server(
    settings: ServerSettings,
    *,
    http_socket: socket.socket | None = None,
    on_ready: Callable[[], None] | None = None,
    load_first: bool = False,
) -> None:
    """Run one server process until SIGINT or SIGTERM (see ``Server``)."""
    configure_logging(settings)

    async def main() -> None:
        await Server(settings, http_socket).serve(on_ready, load_first=load_first)

    if settings.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed; using asyncio's event loop")
        else:
            # asyncio.run() takes loop_factory only from 3.12; Runner has it in 3.11
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main())
            return
    asyncio.run(main())
