"""`vertex-sidecar`: load the config, open the listeners, serve until SIGTERM, drain."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import uvicorn

from . import __version__
from .app import Sidecar
from .config import CONFIG_ENV_VAR, Config, ConfigError, ListenAddress, load_config, parse_listen
from .governor import Governor, wall_clock_from_env
from .listener import BoundedHttpToolsProtocol
from .showback import showback_from_env
from .proxy import StreamAborted
from .telemetry import Telemetry

if TYPE_CHECKING:
    from .forward_proxy import ForwardProxy
    from .tls import TlsFiles

log = logging.getLogger("vertex_sidecar")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"level": record.levelname.lower(), "logger": record.name,
                                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


class _DropStreamAborted(logging.Filter):
    """uvicorn logs any exception that ends an ASGI call; a broken upstream stream is already
    logged by the proxy in one line, so its traceback is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StreamAborted))


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("uvicorn.error").addFilter(_DropStreamAborted())
    logging.getLogger("uvicorn.access").disabled = True


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to us (several run side by side) and
    sleeps while idle: uvicorn's own main loop wakes ten times a second to look at
    `should_exit`; here setting it wakes the loop instead."""

    def __init__(self, config: uvicorn.Config) -> None:
        self._exit = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        super().__init__(config)

    @property  # type: ignore[override]
    def should_exit(self) -> bool:
        return self._exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if not value:
            self._exit.clear()
        elif self._loop is not None and _running_loop() is not self._loop:
            self._loop.call_soon_threadsafe(self._exit.set)  # set from another thread (tests)
        else:
            self._exit.set()

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.on_tick(0)  # sets the default headers once (no Date header: nothing to update)
        await self._exit.wait()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def bind(address: ListenAddress) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address.host, address.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app: Any, config: Config, **extra: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app, interface="asgi3", http=BoundedHttpToolsProtocol, ws="websockets-sansio", loop="none", lifespan="off", access_log=False,
        server_header=False, date_header=False, log_config=None, proxy_headers=False,
        timeout_graceful_shutdown=int(max(config.drain_seconds, 1)), timeout_keep_alive=75, **extra,
    )


def build_sidecar(config: Config) -> Sidecar:
    """The sidecar with its telemetry wired in: metrics, and tokens and cost in the access log."""
    telemetry = Telemetry(config, showback=showback_from_env())
    sidecar = Sidecar(config, observers=telemetry.observers(), refresh_observer=telemetry.token_refreshed)
    sidecar.metrics_renderer = telemetry.render
    sidecar.live.observer = telemetry
    sidecar.proxy_observer = telemetry
    telemetry.set_ready_probe(lambda: sidecar.state.ready)
    sidecar.state.governor = governor = Governor(config, registry=telemetry.registry, wall=wall_clock_from_env(),
                                                 showback=showback_from_env())
    sidecar.observers.add(governor)  # after telemetry: debits the tokens and cost it put in the record
    # A reload also brings new pricing and header-label settings to the telemetry.
    sidecar.reload_observer = lambda result: telemetry.config_reloaded(result, sidecar.config)
    _install_tracing(sidecar, config, telemetry)
    return sidecar


def _install_tracing(sidecar: Sidecar, config: Config, telemetry: Telemetry) -> None:
    """Spans for REST requests and Live turns when `tracing.enabled` (OpenTelemetry is imported
    only then). A bad OTEL_* setting is logged and leaves tracing off: requests go on."""
    from .tracing import TracingSetupError, start_tracing, tracing_settings

    try:
        settings = tracing_settings(config.tracing)
    except TracingSetupError as exc:
        log.error("tracing stays off: %s", exc)
        return
    if not settings.enabled:
        return
    tracer = start_tracing(settings, sidecar.state, telemetry.registry)
    sidecar.observers.add(tracer)  # last: the span carries the tokens and cost telemetry put in the record
    sidecar.live.tracer = tracer
    sidecar.on_close.append(tracer.aclose)
    reloaded = sidecar.reload_observer
    assert reloaded is not None

    def reload_observer(result: str) -> None:
        reloaded(result)
        if result == "success":
            tracer.apply_config(sidecar.config)

    sidecar.reload_observer = reload_observer


async def serve(config: Config, sidecar: Sidecar | None = None, config_path: str | None = None) -> None:
    sidecar = sidecar or build_sidecar(config)
    main_sock = bind(config.listen)
    admin_sock = bind(config.admin_listen)
    app_server = _Server(_uvicorn_config(sidecar.main_app, config))
    admin_server = _Server(_uvicorn_config(sidecar.admin_app(), config))
    files = _prepare_tls(config)
    tls = _tls_listener(config, sidecar, files)
    forward = _proxy_listener(config, sidecar, files)
    front = [app_server] + ([tls.server] if tls else [])  # the listeners callers use
    proxy_drain: asyncio.Future[None] | None = None
    sidecar.start()
    watcher = None
    if config_path is not None:
        from .reload import ConfigWatcher

        watcher = asyncio.ensure_future(ConfigWatcher(config_path, sidecar, sidecar.reload_observer)
                                        .run(config.reload_interval_seconds))

    loop = asyncio.get_running_loop()

    def drain(signame: str) -> None:
        nonlocal proxy_drain
        if sidecar.state.draining:
            for server in front:
                server.force_exit = True  # a second signal: stop now
            return
        log.info("received %s: draining in-flight requests (up to %gs)", signame, config.drain_seconds)
        sidecar.state.draining = True
        for server in front:
            server.should_exit = True
        if forward is not None:
            proxy_drain = asyncio.ensure_future(forward.proxy.shutdown(config.drain_seconds))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, drain, sig.name)

    listening = {"event": "listening", "version": __version__, "config": config.source,
                 "listen": _address(main_sock), "admin_listen": _address(admin_sock)}
    if tls:
        listening.update(tls_listen=_address(tls.sock), ca_bundle=tls.ca_bundle_path)
    if forward:
        await forward.proxy.start(forward.sock)
        listening.update(proxy_listen=_address(forward.sock), ca_bundle=forward.ca_bundle_path)
    print(json.dumps(listening), flush=True)
    admin_task = asyncio.ensure_future(admin_server.serve(sockets=[admin_sock]))
    tls_task = asyncio.ensure_future(tls.server.serve(sockets=[tls.sock])) if tls else None
    try:
        await app_server.serve(sockets=[main_sock])
    finally:
        if watcher is not None:
            watcher.cancel()
        admin_server.should_exit = True
        if tls and tls_task:
            tls.server.should_exit = True
            await tls_task
        if forward is not None:
            await (proxy_drain or forward.proxy.shutdown(0))
        await admin_task
        await sidecar.aclose()
        log.info("stopped")


@dataclass
class _TlsListener:
    sock: socket.socket
    server: _Server
    ca_bundle_path: str


def _prepare_tls(config: Config) -> "TlsFiles | None":
    """Certificates for `tls_listen` and `proxy_listen` (one pod-local CA for both)."""
    if config.tls_listen is None and config.proxy_listen is None:
        return None
    from .proxy_hosts import intercepted_names
    from .tls import prepare_tls_isolated  # raises TlsError (an OSError): "cannot start: ..."

    intercept = intercepted_names(config.proxy.extra_locations) if config.proxy_listen is not None else ()
    return prepare_tls_isolated(config.tls, intercept=intercept)


def _tls_listener(config: Config, sidecar: Sidecar, files: "TlsFiles | None") -> _TlsListener | None:
    """`tls_listen`: the same app over TLS (google-genai's Live API only dials wss://)."""
    if config.tls_listen is None:
        return None
    assert files is not None
    sock = bind(config.tls_listen)
    server = _Server(_uvicorn_config(sidecar.main_app, config, ssl_certfile=files.cert_file,
                                     ssl_keyfile=files.key_file))
    log.info("TLS listener on %s; apps trust it with SSL_CERT_FILE=%s", _address(sock), files.ca_bundle_path)
    return _TlsListener(sock, server, files.ca_bundle_path)


@dataclass
class _ProxyListener:
    sock: socket.socket
    proxy: "ForwardProxy"
    ca_bundle_path: str


def _proxy_listener(config: Config, sidecar: Sidecar, files: "TlsFiles | None") -> _ProxyListener | None:
    """`proxy_listen`: the HTTPS forward proxy (zero-code-change mode, forward_proxy.py)."""
    if config.proxy_listen is None:
        return None
    from .forward_proxy import ForwardProxy
    from .intercepted_app import InterceptedApp
    from .proxy_hosts import intercepted_names

    assert files is not None and files.proxy_cert_dir is not None
    proxy = ForwardProxy(names=intercepted_names(config.proxy.extra_locations), cert_dir=files.proxy_cert_dir,
                         http_config=_uvicorn_config(InterceptedApp(sidecar), config),
                         settings=lambda: sidecar.config.proxy, observer=sidecar.proxy_observer)
    sock = bind(config.proxy_listen)
    log.info("forward proxy on %s; apps use it with HTTPS_PROXY=http://%s and SSL_CERT_FILE=%s", _address(sock),
             _address(sock), files.ca_bundle_path)
    return _ProxyListener(sock, proxy, files.ca_bundle_path)


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


ADMIN_HOST_ENV_VAR = "VERTEX_SIDECAR_ADMIN_HOST"


def admin_listen_from_env(configured: ListenAddress, env: Mapping[str, str]) -> ListenAddress:
    """`VERTEX_SIDECAR_ADMIN_HOST` (an IP address; the pod IP from the downward API) replaces
    the admin listener's host and keeps its port, so the admin port is reachable on the pod
    IP only, never on every interface."""
    host = env.get(ADMIN_HOST_ENV_VAR, "").strip()
    if not host:
        return configured
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{ADMIN_HOST_ENV_VAR}: {host!r} is not an IP address (it is meant to be "
                          "the pod IP, from the downward API's status.podIP)") from None
    return ListenAddress(host, configured.port)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vertex-sidecar",
        description="Localhost pass-through to Google Vertex AI with injected Google credentials.",
    )
    parser.add_argument("--config", default=os.environ.get(CONFIG_ENV_VAR),
                        help=f"YAML config file (default: ${CONFIG_ENV_VAR}; none = allow all with ADC)")
    parser.add_argument("--listen", help="override `listen` (host:port; port 0 picks a free port)")
    parser.add_argument("--admin-listen", help="override `admin_listen`")
    parser.add_argument("--check-config", action="store_true", help="validate the config and exit")
    parser.add_argument("--log-level", default=os.environ.get("VERTEX_SIDECAR_LOG_LEVEL", "info"))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    hooks = parser.add_argument_group("lifecycle hooks (a regular container below Kubernetes 1.29)")
    hooks.add_argument("--wait-ready", metavar="URL", help="poll URL until 200 and exit (postStart)")
    hooks.add_argument("--wait-timeout", type=float, default=120.0, metavar="SECONDS")
    hooks.add_argument("--linger", type=float, metavar="SECONDS", help="sleep, then exit (preStop)")
    return parser.parse_args(argv)


def raise_open_file_limit() -> None:
    """Each proxied stream holds two sockets; lift the soft fd limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - best effort
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.wait_ready or args.linger is not None:
        from vertex_sidecar import lifecycle

        if args.wait_ready:
            return lifecycle.wait_ready(args.wait_ready, args.wait_timeout)
        return lifecycle.linger(args.linger)
    setup_logging(args.log_level)
    raise_open_file_limit()
    try:
        config = load_config(args.config)
        overrides: dict[str, Any] = {}
        admin_listen = admin_listen_from_env(config.admin_listen, os.environ)
        if admin_listen != config.admin_listen:
            overrides["admin_listen"] = admin_listen
        if args.listen:
            overrides["listen"] = parse_listen(args.listen, "--listen")
        if args.admin_listen:
            overrides["admin_listen"] = parse_listen(args.admin_listen, "--admin-listen")
        if overrides:
            from dataclasses import replace
            config = replace(config, **overrides)
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    if args.check_config:
        print(f"{config.source}: ok ({len(config.routes)} route(s), {len(config.credentials)} credential(s))")
        return 0
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(config, config_path=args.config))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
