"""One dhow server process, and its composition root: every object is built here with its collaborators.

The core service (the data plane behind its one admission point) with its REST and gRPC doors on one event
loop; the model lifecycle below it; the rollouts beside it, routing through ``serving``'s ``TrafficRouter``.
SIGINT and SIGTERM drain it (``serving/drain.py``: not ready, ports closed, what is in flight finished);
SIGHUP reloads what can change while it serves (``Server.reload``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import uvicorn
from prometheus_client import ProcessCollector

from dhow.access.tls import ServerCertificates, TlsSettings
from dhow.core import affinity
from dhow.core.errors import DhowError
from dhow.core.heap import settle_heap
from dhow.governance.masked_stream import mask_standard_streams
from dhow.governance.masking import Masker, install_log_masking, parse_masking
from dhow.monitoring.metrics import ServerMetrics
from dhow.monitoring.resources import GpuCollector, HeapCollector, InstanceCollector
from dhow.protocols.grpc import GrpcConnectionLimits, GrpcServer, create_grpc_server
from dhow.protocols.rest import RestApp
from dhow.protocols.rest.access_log import AccessLog
from dhow.protocols.rest.body import Receive, Scope, Send
from dhow.protocols.rest.connection import ConnectionTimeouts, DeadlineHttpProtocol
from dhow.protocols.rest.cors import CorsMiddleware, CorsPolicy
from dhow.protocols.rest.front import HttpFront
from dhow.protocols.rest.tls import ClientCertHttpProtocol, https_port_protocol
from dhow.rollouts.analysis import CanaryAnalyst
from dhow.rollouts.controller import RolloutController
from dhow.rollouts.editor import DeploymentEditor
from dhow.rollouts.routing import DeploymentTable
from dhow.rollouts.shadow import ShadowQueue, ShadowRunner
from dhow.rollouts.store import RegistryStore
from dhow.serving.admin import AccessAdmin
from dhow.serving.composition import CorePolicies, Observers, compose_core
from dhow.serving.dataplane import DataPlane
from dhow.serving.drain import Drain
from dhow.serving.lifecycle import ModelControl, ModelLifecycle
from dhow.serving.poller import RepositoryPoller
from dhow.serving.security import Security, masking_key
from dhow.serving.service import CoreService, service_identity
from dhow.serving.watch import ModelWatch
from dhow.settings import ServerSettings, SettingsSource, live_settings

log = logging.getLogger("dhow.server")


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: the dhow server owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


#: what serves the REST port (``--http-front``): both have uvicorn's switches (started, should_exit, force_exit)
_RestPort = _HttpServer | HttpFront


@dataclass(frozen=True, slots=True)
class _Parts:
    """What one server process is made of, built together by ``Server._compose``."""

    models: ModelLifecycle
    dataplane: DataPlane
    service: CoreService
    rollouts: RolloutController
    rest: RestApp
    poller: RepositoryPoller | None
    observers: Observers
    watch: ModelWatch


class Server:
    """One server process; ``http_socket``: a REST socket bound by the caller (a worker sharing the port);
    ``source``: where the settings came from, read again on SIGHUP (None: they do not change)."""

    def __init__(
        self, settings: ServerSettings, http_socket: socket.socket | None = None, source: SettingsSource | None = None
    ) -> None:
        self.settings = settings
        self.source = source
        #: the settings as their source gave them, to tell what a reload changed
        self._read = source.read() if source is not None else settings
        self.http_socket = http_socket
        self.metrics = ServerMetrics()
        # what can be checked without I/O is checked here, so that a wrong option fails before any port opens
        self.policies = CorePolicies.load(settings)
        self.control = self.policies.control
        self.tls = TlsSettings.resolve(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca, settings.tls_client_auth, settings.require_tls
        )
        self.certificates = ServerCertificates(self.tls) if self.tls is not None else None
        self.security = Security(settings)
        self.cors = CorsPolicy.of(settings.cors_origins, settings.cors_methods, settings.cors_headers)
        self.access_log = AccessLog(enabled=settings.access_log)
        self._stop = asyncio.Event()
        self._forced = asyncio.Event()
        #: the drain has begun stopping the gRPC server (with its grace): a second signal then cuts it short
        self._grpc_stopping = False
        self._http: _RestPort | None = None
        self._grpc: GrpcServer | None = None
        #: what finishes in-flight work on a stop besides the doors (stream consumers register here)
        self.drain = Drain()
        self._serving = asyncio.Event()
        self._reloading: asyncio.Task[None] | None = None
        self.streams = _stream_specs(settings)

    def stop(self) -> None:
        """Drain and stop (SIGTERM, SIGINT); a second signal during the drain cuts what is still in flight."""
        if not self._stop.is_set():
            self._stop.set()
            return
        log.warning("a second signal: stopping now, cutting the calls still in flight")
        self._forced.set()
        if self._http is not None:
            self._http.force_exit = True
        # grpc.aio's server must not be stopped twice at once: before the drain stops it, the drain sees
        # ``_forced`` and stops it with no grace itself
        if self._grpc is not None and self._grpc_stopping:
            asyncio.get_running_loop().create_task(self._grpc.server.stop(0))

    async def serve(self, on_ready: Callable[[], None] | None = None, *, load_first: bool = False) -> None:
        """Serve until stopped; ``on_ready`` is called once the models are loaded and the doors open.

        The doors open before the models load, and health says "not ready" meanwhile; with ``load_first`` (a
        worker replacing one that died) they open after, so that until then the kernel gives new connections
        to the workers that are serving.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        parts = await self._compose()
        if load_first:
            await self._load(parts)
        http, http_task, grpc = await self._open_doors(parts)
        self._serving.set()
        if not load_first:
            await self._load(parts)
        poller = watching = streams = None
        settle_heap()  # what start-up built lives as long as the server: collections need not walk it
        if not self._stop.is_set():  # a SIGTERM while the models loaded: never ready, straight to the drain
            parts.dataplane.is_ready = True
            self.metrics.workers.set(1)  # answering now: a worker that is still loading is not counted
            poller = asyncio.create_task(parts.poller.run()) if parts.poller is not None else None
            watching = asyncio.create_task(parts.watch.run())
            streams = await self._start_streams(parts) if self.streams else None
            log.info("dhow is ready")
            parts.dataplane.warn_if_unready()
            if on_ready is not None:
                on_ready()
        await self._stop.wait()
        if self._reloading is not None:
            self._reloading.cancel()
        if poller is not None:
            poller.cancel()
        if watching is not None:
            watching.cancel()
        if streams is not None:  # what the consumers read is answered and committed before the doors drain
            await streams.stop()
        await self._drain(parts, http, http_task, grpc)
        await parts.rollouts.close()
        await parts.models.close()
        await asyncio.to_thread(parts.observers.close)  # after the models: every answered request is offered
        await parts.watch.close()  # (the predictions kept for feedback and not written to --redis yet)
        parts.service.guard.close()
        await self.security.close()
        log.info("dhow stopped")
        self.access_log.close()

    async def _drain(self, parts: _Parts, http: _RestPort, http_task: asyncio.Task[None], grpc: GrpcServer) -> None:
        """Not ready at once; the ports closed after ``drain_delay``; then ``drain_seconds`` for what is in flight
        (REST requests, gRPC calls, the drain hooks) before it is cut (see ``serving/drain.py``)."""
        settings = self.settings
        parts.dataplane.is_ready = False
        self.metrics.workers.set(0)
        log.info(
            "dhow is draining: not ready now, closing its ports in %g s, then %g s for what is in flight",
            settings.drain_delay,
            settings.drain_seconds,
        )
        if settings.drain_delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._forced.wait(), settings.drain_delay)
        http.should_exit = True
        grace = 0.0 if self._forced.is_set() else settings.drain_seconds
        self._grpc_stopping = True
        _, _, unfinished = await asyncio.gather(grpc.server.stop(grace), http_task, self.drain.run(grace))
        if unfinished:
            log.error("drain: did not finish in time: %s", ", ".join(unfinished))

    def _on_hangup(self) -> None:
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.get_running_loop().create_task(self.reload())

    async def reload(self) -> None:
        """Read again what may change while serving, and say in one log line what was reloaded.

        The TLS certificate and key (new connections get them), the API keys and the JWKS, and the settings
        marked live (``live_settings``: the log level); a changed setting of any other kind is named as
        needing a restart. What cannot be read keeps its old value and is named in the line.
        """
        await self._serving.wait()  # a SIGHUP during start-up waits until there is something to reload
        reloaded: list[str] = []
        failed: list[str] = []
        if self.certificates is not None:
            try:
                await asyncio.to_thread(self.certificates.reload)
                reloaded.append(f"the TLS certificate {self.certificates.settings.cert}")
            except DhowError as exc:
                failed.append(exc.message)
        if self.security.authenticator is not None:
            try:
                reloaded.extend(await self.security.authenticator.refresh())
            except DhowError as exc:
                failed.append(exc.message)
        restart = self._reload_settings(reloaded, failed)
        line = f"SIGHUP: reloaded {', '.join(reloaded) or 'nothing'}"
        if restart:
            line += f"; changed but applied only at a restart: {', '.join(restart)}"
        if failed:
            line += f"; kept the old values of what could not be read: {'; '.join(failed)}"
        log.log(logging.WARNING if failed or restart else logging.INFO, "%s", line)

    def _reload_settings(self, reloaded: list[str], failed: list[str]) -> list[str]:
        """Apply the live settings read again from their source; the names of the others that changed."""
        if self.source is None:
            return []
        try:
            fresh = self.source.read()
        except DhowError as exc:
            failed.append(exc.message)
            return []
        live = live_settings()
        changed = [f.name for f in dataclasses.fields(fresh) if getattr(fresh, f.name) != getattr(self._read, f.name)]
        applied = {name: getattr(fresh, name) for name in changed if name in live}
        if "log_level" in applied:
            logging.getLogger().setLevel(fresh.log_level.upper())
        self.access_log.enabled = fresh.access_log
        reloaded.extend(f"{name} {value}" for name, value in applied.items())
        self.settings = dataclasses.replace(self.settings, **applied)
        self._read = dataclasses.replace(self._read, **applied)
        return [name for name in changed if name not in live]

    async def _compose(self) -> _Parts:
        """Build the server's objects, each with its collaborators, in the order they depend on each other."""
        settings, metrics = self.settings, self.metrics
        shadow_queue = ShadowQueue(metrics.registry)
        table = DeploymentTable(shadow_queue, metrics.registry)
        observers = Observers.open(settings, metrics, f"dhow://{socket.gethostname()}:{settings.http_port}")
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = await asyncio.to_thread(RegistryStore.open, settings.registry_url())
        # the models are watched (drift, latency anomalies, feedback); episodes go to the registry's event history
        core = await compose_core(
            settings, self.security, self.policies, metrics=metrics, router=table, observers=observers, events=store
        )
        models, dataplane, service = core.models, core.dataplane, core.service
        # read at each scrape: this process (and its heap), its process instances, the GPUs (absent without one)
        instances = models.process_instances
        for collector in (ProcessCollector(registry=None), HeapCollector(), InstanceCollector(instances)):
            metrics.add_collector(collector)
        metrics.add_collector(GpuCollector(instances))
        editor = DeploymentEditor(store, models, table)
        watch = dataplane.watch
        assert watch is not None  # given the event history, the core watches its models
        rollouts = RolloutController(
            editor,
            CanaryAnalyst(editor, service, metrics.registry),
            ShadowRunner(shadow_queue, service.invoker(service_identity("dhow:shadow")), metrics.registry),
            poll_s=settings.registry_poll,
        )
        assert self.security.authenticator is not None and self.security.audit is not None
        rest = RestApp(
            service,
            max_body_bytes=settings.max_request_bytes,
            metrics_handler=metrics.render,
            deployments=editor,
            access=AccessAdmin(self.security.authenticator, self.security.audit),
            access_log=self.access_log,
        )
        self.access_log.start()
        poller = None
        if self.control is ModelControl.POLL:
            poller = RepositoryPoller(models, service, settings.poll_interval)
        return _Parts(models, dataplane, service, rollouts, rest, poller, observers, watch)

    async def _start_streams(self, parts: _Parts) -> Any:
        """The ``streams:`` of the settings, consuming once the models are loaded (a stream that cannot start
        stops the server: it was asked for)."""
        from dhow.monitoring.streams import StreamMetrics
        from dhow.registry.checkpoints import CheckpointStore
        from dhow.streaming import StreamGroup, load_stream_models, open_consumer, status_folder

        meter = StreamMetrics(self.metrics.registry)
        group = StreamGroup(parts.service)
        await load_stream_models(parts.models, self.streams)
        stores = functools.partial(CheckpointStore.open, self.settings.registry_url())
        for spec in self.streams:
            status_dir = status_folder(self.settings.data_dir)
            group.start(
                await open_consumer(spec, parts.service, meter=meter, status_dir=status_dir, shard_stores=stores)
            )
        return group

    async def _load(self, parts: _Parts) -> None:
        """Load the models the control mode says to load at start, then apply the deployments."""
        explicit = self.control is ModelControl.EXPLICIT
        await parts.models.start(list(self.settings.load_models) if explicit else None)
        await parts.rollouts.start()
        log.info(
            "deployments: %d applied from %s",
            len(parts.rollouts.editor.active),
            _safe_url(self.settings.registry_url()),
        )

    def _rest_port(self, parts: _Parts) -> _RestPort:
        """What serves the REST port (``--http-front``): dhow's own HTTP/1.1 or uvicorn's, with the same limits."""
        settings = self.settings
        certificates = self.certificates
        timeouts = ConnectionTimeouts(header_s=settings.header_timeout, body_s=settings.body_timeout)
        app: Callable[[Scope, Receive, Send], Awaitable[None]] = parts.rest
        if self.cors is not None:
            app = CorsMiddleware(app, self.cors)
        if settings.http_front == "native":
            return HttpFront(
                app,
                host=settings.host,
                port=settings.http_port,
                timeouts=timeouts,
                keepalive_s=settings.keepalive_timeout,
                limit=settings.max_connections or None,
                refused=self.metrics.connections_refused.labels(port="rest").inc,
                drain_s=settings.drain_seconds,
                ssl_context=certificates.context if certificates is not None else None,
                plaintext=self.metrics.plaintext_refused.labels(port="rest").inc,
            )
        protocol = ClientCertHttpProtocol if certificates is not None else DeadlineHttpProtocol
        return _HttpServer(
            uvicorn.Config(
                app,
                host=settings.host,
                port=settings.http_port,
                lifespan="off",
                access_log=False,
                # uvicorn's own records go to the root handlers, through the PII masking filter
                log_config=None,
                log_level="warning",
                # with TLS the port's own protocol starts it, so that plain HTTP gets a 400 instead of silence
                http=(
                    https_port_protocol(
                        certificates.context,
                        protocol.with_timeouts(timeouts),
                        self.metrics.plaintext_refused.labels(port="rest").inc,
                    )
                    if certificates is not None
                    else protocol.with_timeouts(timeouts)
                ),
                loop="none",
                timeout_keep_alive=settings.keepalive_timeout,
                limit_concurrency=settings.max_connections or None,
                timeout_graceful_shutdown=settings.drain_seconds,  # type: ignore[arg-type]  # any number works
            )
        )

    async def _open_doors(self, parts: _Parts) -> tuple[_RestPort, asyncio.Task[None], GrpcServer]:
        """Start gRPC and REST; a port that cannot be served stops the process with a message."""
        settings = self.settings
        certificates = self.certificates
        http = self._rest_port(parts)
        self._http = http
        grpcio = settings.grpc_front == "grpcio"
        grpc = await create_grpc_server(
            parts.service,
            settings.host,
            settings.grpc_port,
            max_message_bytes=settings.max_request_bytes,
            credentials=certificates.grpc_credentials() if certificates is not None and grpcio else None,
            ssl_context=certificates.h2_context() if certificates is not None and not grpcio else None,
            reuse_port=settings.workers > 1,
            limits=GrpcConnectionLimits(
                handshake_s=settings.header_timeout,
                idle_s=settings.grpc_idle_timeout,
                keepalive_s=settings.grpc_keepalive,
                max_connections=settings.max_connections or None,
            ),
            front=settings.grpc_front,
            refused=self.metrics.connections_refused.labels(port="grpc").inc,
            plaintext=self.metrics.plaintext_refused.labels(port="grpc").inc,
        )
        await grpc.server.start()
        self._grpc = grpc
        http_task = asyncio.create_task(http.serve(None if self.http_socket is None else [self.http_socket]))
        while not http.started and not http_task.done():
            await asyncio.sleep(0.01)
        if http_task.done():
            await grpc.server.stop(None)
            await http_task
            raise SystemExit(f"dhow: cannot serve REST on {settings.host}:{settings.http_port}")
        log.info(
            "dhow serving %s: REST on %s://%s:%d (%s front), gRPC on %s:%d (%s front), model control %s",
            settings.repository,
            "https" if certificates is not None else "http",
            settings.host,
            settings.http_port,
            settings.http_front,
            settings.host,
            grpc.port,
            settings.grpc_front,
            settings.model_control,
        )
        return http, http_task, grpc


def _safe_url(url: str) -> str:
    """A database URL without its password, for the log."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        credentials, _, host = rest.rpartition("@")
        rest = f"{credentials.split(':', 1)[0]}@{host}"
    return f"{scheme}{sep}{rest}"


def _stream_specs(settings: ServerSettings) -> tuple[Any, ...]:
    """The settings' ``streams:`` checked (before any port opens); the Kafka client is imported only for them."""
    if not settings.streams:
        return ()
    from dhow.streaming import parse_streams

    return parse_streams(list(settings.streams), "settings 'streams'")


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
    source: SettingsSource | None = None,
    worker_index: int = 0,
) -> None:
    """Run one server process until SIGINT or SIGTERM (see ``Server``); ``worker_index``: which of ``--workers``
    (from 0), for ``--cpu-affinity``."""
    configure_logging(settings)
    pinned = settings.cpu_affinity == "auto"
    if pinned:  # this thread runs the event loop: pinned before it starts anything (``core/affinity.py``)
        log.info("CPU affinity: %s", affinity.pin_loop(settings.workers, worker_index))
    else:  # a plan inherited (this server started by a pinned one's model) is not this one's: its writers ignore it
        os.environ.pop(affinity.PLAN_ENV, None)

    async def main() -> None:
        if pinned:  # the loop's threads for blocking work (loading models, scoring drift) are not the loop's
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(initializer=affinity.as_any))
        await Server(settings, http_socket, source).serve(on_ready, load_first=load_first)

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
