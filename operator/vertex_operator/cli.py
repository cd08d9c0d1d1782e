"""`vertex-operator`: run the operator, with the familiar `kopf run` flags and a few of ours."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import re
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, Awaitable, Sequence

import kopf

from vertex_operator import __version__
from vertex_operator.crd import SecretKey
from vertex_operator.fleet import StoreSettings, load_ca
from vertex_operator.options import (
    DEFAULT_IAM_ENDPOINT, DEFAULT_RESOURCE_MANAGER_ENDPOINT, DEFAULT_SIDECAR_IMAGE, Options,
)
from vertex_operator.policy import PolicyError, load_policy
from vertex_operator.tracing import TracingDefaults

if TYPE_CHECKING:
    from vertex_operator.controller import Controller


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vertex-operator",
        description="Kubernetes operator of vertex-passthrough: VertexRoute/VertexCredential "
                    "reconciliation and the sidecar-injecting admission webhook. The cluster is "
                    "read from the in-cluster service account, else KUBECONFIG (or ~/.kube/config).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="serve every namespace (the default when no --namespace is given)")
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NAMESPACE",
                       help="serve only this namespace (repeatable; exact names: CRD and namespace scanning is off)")
    p.add_argument("--standalone", action="store_true",
                   help="a single replica: no leader election (by default replicas elect a leader on a Lease; "
                        "every replica serves the webhook, only the leader reconciles)")
    p.add_argument("-L", "--liveness", metavar="URL",
                   help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-d", "--debug", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--sidecar-image", default=DEFAULT_SIDECAR_IMAGE,
                   help="sidecar image for routes that set none (env VERTEX_SIDECAR_IMAGE)")
    p.add_argument("--operator-namespace", default=os.environ.get("POD_NAMESPACE"),
                   help="the operator's own namespace, never injected (env POD_NAMESPACE)")
    p.add_argument("--exclude-namespace", action="append", default=[], metavar="NAMESPACE",
                   help="another namespace that is never injected (repeatable; list those that the webhook "
                        "configuration leaves out, so that routes there say so instead of rolling workloads)")
    p.add_argument("--write-namespace", action="append", default=[], metavar="NAMESPACE",
                   help="with --all-namespaces: a namespace where the operator's RBAC lets it write (repeatable; the "
                        "chart passes rbac.workloadNamespaces). Routes and credentials elsewhere report that they "
                        "are not served; an empty value alone: nowhere. Without it: every namespace")
    p.add_argument("--injection-label", metavar="KEY=VALUE", type=_label,
                   help="the namespace label the webhook configuration selects (the chart: "
                        "vertex.passthrough.dev/injection=enabled); routes in namespaces without it say so")
    p.add_argument("--metrics-addr", default="0.0.0.0")
    p.add_argument("--metrics-port", type=int, default=8081, help="Prometheus /metrics port; -1 disables")
    p.add_argument("--resync-interval", type=float, default=300.0, metavar="SECONDS",
                   help="re-converge every route this often (repairs hand-edited ConfigMaps)")
    le = p.add_argument_group("leader election", "A coordination.k8s.io Lease in the operator's namespace "
                              "(client-go's rules: a standby takes over at most lease-duration + retry-period "
                              "after the leader's last renewal, at once when the leader shuts down cleanly).")
    le.add_argument("--lease-name", default="vertex-operator-leader")
    le.add_argument("--lease-namespace", help="default: --operator-namespace")
    le.add_argument("--lease-duration", type=float, default=15.0, metavar="SECONDS")
    le.add_argument("--renew-deadline", type=float, default=10.0, metavar="SECONDS",
                    help="the leader stops writing when it could not renew for this long (< lease duration)")
    le.add_argument("--retry-period", type=float, default=2.0, metavar="SECONDS")
    le.add_argument("--identity", default=None, help="candidate identity (default: POD_NAME + a random suffix)")
    p.add_argument("--repair-interval", type=float, default=60.0, metavar="SECONDS",
                   help="check the running pods of routes this often (pods without the current sidecar)")
    p.add_argument("--repair-backoff", type=float, default=600.0, metavar="SECONDS",
                   help="leave a workload restarted by spec.rollout.repair alone this long")
    p.add_argument("--readiness-addr", default="0.0.0.0")
    p.add_argument("--readiness-port", type=int, default=8082,
                   help="GET /readyz (a real AdmissionReview sent to the own webhook), /leader; -1 disables")
    p.add_argument("--shutdown-delay", type=float, default=0.0, metavar="SECONDS",
                   help="after SIGTERM keep answering the webhook this long (unready, no longer leading)")
    g = p.add_argument_group("VertexCredential bindings (binding.backend: iamApi)",
                             "The operator calls Google with its own Application Default Credentials.")
    g.add_argument("--iam-endpoint", default=DEFAULT_IAM_ENDPOINT, metavar="URL",
                   help="IAM API base URL (service account policies)")
    g.add_argument("--resource-manager-endpoint", default=DEFAULT_RESOURCE_MANAGER_ENDPOINT, metavar="URL",
                   help="Resource Manager API base URL (project policies and numbers)")
    g.add_argument("--iam-propagation-seconds", type=float, default=120.0, metavar="SECONDS",
                   help="report BindingReady=Unknown (Propagating) this long after granting a role")
    g.add_argument("--binding-recheck-seconds", type=float, default=10.0, metavar="SECONDS",
                   help="first retry after a binding error (doubling up to --resync-interval); also "
                        "how often Config Connector objects are re-read until Ready")
    g.add_argument("--policy-file", metavar="PATH",
                   help="the platform team's bounds on VertexCredentials and VertexRoutes (YAML; the chart "
                        "renders it from the policy values). Without it only roles/aiplatform.user is allowed "
                        "and no project, Google service account or pool: automatic backends grant nothing")
    t = p.add_argument_group("tracing of injected sidecars",
                             "Defaults for routes whose spec.sidecar.tracing does not say.")
    t.add_argument("--tracing", action="store_true",
                   help="injected sidecars export OpenTelemetry spans (OTLP/HTTP protobuf)")
    t.add_argument("--tracing-endpoint", metavar="URL",
                   help="the collector's OTLP/HTTP base URL, e.g. http://otel-collector.observability:4318")
    t.add_argument("--tracing-sample-ratio", type=_ratio, metavar="RATIO",
                   help="share of requests without a caller's traceparent that are traced (0 to 1; default 1)")
    f = p.add_argument_group(
        "fleet-wide limits and budgets",
        "The Redis (>= 6, Valkey, Memorystore) that sidecars share for routes with limits.scope: fleet or a "
        "budget. Without --store-redis-url those are counted per pod.")
    f.add_argument("--store-redis-url", metavar="URL", help="redis://HOST:PORT[/DB] or rediss:// (TLS); no password")
    f.add_argument("--store-redis-password-secret", metavar="NAME",
                   help="Secret with the password; it must exist in every namespace whose sidecars use the store")
    f.add_argument("--store-redis-password-key", default="password", metavar="KEY", help="key in that Secret")
    f.add_argument("--store-redis-tls-ca-file", metavar="PATH",
                   help="CA certificate (PEM) of the store; read at start and handed to sidecars in their ConfigMap")
    f.add_argument("--store-redis-timeout-ms", type=int, metavar="MS",
                   help="bound of every store call in the sidecars (default 50, at most 1000)")
    f.add_argument("--showback-team-label", metavar="KEY",
                   help="Namespace label whose value becomes the team of the sidecars' metrics and access log")
    w = p.add_argument_group("admission webhook")
    w.add_argument("--no-webhook", action="store_true", help="do not serve the injection webhook")
    w.add_argument("--webhook-addr", default="0.0.0.0")
    w.add_argument("--webhook-port", type=int, default=9443, help="0 picks a free port")
    w.add_argument("--webhook-host", help="host name in the URL of a kopf-managed webhook configuration")
    w.add_argument("--webhook-cert", help="TLS certificate (PEM) of the webhook server")
    w.add_argument("--webhook-key", help="TLS private key (PEM) of the webhook server")
    w.add_argument("--webhook-ca", help="CA bundle for a kopf-managed webhook configuration")
    w.add_argument("--webhook-managed", metavar="NAME",
                   help="let the operator own the MutatingWebhookConfiguration NAME (development; "
                        "the Helm chart ships its own configuration)")
    return p


def store_from_args(args: argparse.Namespace) -> StoreSettings | None:
    """The store settings, checked as the sidecar will check them; raises ValueError. The CA
    file is read later, at start (`fleet.load_ca`)."""
    if not args.store_redis_url:
        if args.store_redis_password_secret or args.store_redis_tls_ca_file:
            raise ValueError("--store-redis-password-secret and --store-redis-tls-ca-file need --store-redis-url")
        return None
    url = args.store_redis_url
    if not re.match(r"^rediss?://[^/\s@]+(/[0-9]+)?$", url):
        raise ValueError(f"--store-redis-url: expected redis://HOST:PORT[/DB] or rediss://..., without a "
                         f"password (use --store-redis-password-secret), got {url.split('@')[-1]!r}")
    secret = None
    if args.store_redis_password_secret:
        secret = SecretKey(args.store_redis_password_secret, args.store_redis_password_key)
    timeout = args.store_redis_timeout_ms
    if timeout is not None and not 1 <= timeout <= 1000:
        raise ValueError("--store-redis-timeout-ms: between 1 and 1000 (a slow store must not hold requests)")
    return StoreSettings(url=url, password_secret=secret, timeout_ms=timeout, tls_ca_file=args.store_redis_tls_ca_file)


def options_from_args(args: argparse.Namespace) -> Options:
    return Options(
        clusterwide=args.all_namespaces or not args.namespace,
        namespaces=tuple(args.namespace),
        standalone=True if args.standalone else None,
        liveness=args.liveness,
        sidecar_image=args.sidecar_image,
        operator_namespace=args.operator_namespace,
        metrics_addr=args.metrics_addr,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        webhook=not args.no_webhook,
        webhook_addr=args.webhook_addr,
        webhook_port=args.webhook_port or None,
        webhook_host=args.webhook_host,
        webhook_cert=args.webhook_cert,
        webhook_key=args.webhook_key,
        webhook_ca=args.webhook_ca,
        webhook_managed=args.webhook_managed,
        resync_seconds=args.resync_interval,
        iam_endpoint=args.iam_endpoint,
        resource_manager_endpoint=args.resource_manager_endpoint,
        iam_propagation_seconds=args.iam_propagation_seconds,
        binding_recheck_seconds=args.binding_recheck_seconds,
        extra_excluded_namespaces=frozenset(args.exclude_namespace),
        policy=load_policy(args.policy_file),
        # An empty --write-namespace= (the chart with no rbac.workloadNamespaces): nowhere.
        write_namespaces=frozenset(filter(None, args.write_namespace)) if args.write_namespace else None,
        injection_label=args.injection_label,
        tracing=TracingDefaults(enabled=args.tracing, endpoint=args.tracing_endpoint,
                                sample_ratio=args.tracing_sample_ratio),
        store=store_from_args(args),
        team_label=args.showback_team_label or None,
        lease_name=args.lease_name,
        lease_namespace=args.lease_namespace,
        lease_duration=args.lease_duration,
        renew_deadline=args.renew_deadline,
        retry_period=args.retry_period,
        identity=args.identity,
        readiness_addr=args.readiness_addr,
        readiness_port=None if args.readiness_port < 0 else args.readiness_port,
        shutdown_delay=args.shutdown_delay,
        repair_seconds=args.repair_interval,
        repair_backoff_seconds=args.repair_backoff,
    )


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


async def _wait_flag(flag: threading.Event | asyncio.Event | None, stopping: asyncio.Event) -> None:
    """Set `stopping` when the external stop flag is raised (polled: a thread must not block)."""
    if flag is None:
        return
    if isinstance(flag, asyncio.Event):
        await flag.wait()
    else:
        while not flag.is_set():
            await asyncio.sleep(0.05)
    stopping.set()


async def _until(condition: Any, interval: float = 0.05) -> None:
    """Poll a condition that another thread changes (no thread is left blocked on it)."""
    while not condition():
        await asyncio.sleep(interval)


def _own_signals(stopping: asyncio.Event) -> None:
    """SIGTERM/SIGINT stop the whole process (each kopf operator installs its own handlers,
    which would stop only itself: ours are put back after every kopf start)."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until the first of `aws` finishes; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ReconcilingHalf:
    """The reconciling kopf operator (the default registry) in a thread with its own loop.

    Its own loop because kopf, when stopping, cancels every task of its loop that started
    after it did (which would include the serving half's watches and webhook requests);
    its own Controller because the caches, locks and HTTP sessions belong to that loop.
    A new one is started at every acquisition of the Lease.
    """

    def __init__(self, options: Options, common: dict[str, Any], fence: Any = None) -> None:
        self.options, self.common, self.fence = options, common, fence
        self.stop_flag, self.ready = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="vertex-operator reconciling", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # surfaced by the supervisor
            self.error = exc

    async def _run(self) -> None:
        import dataclasses

        from vertex_operator.controller import Controller

        ctl = Controller(dataclasses.replace(self.options, webhook=False))
        await ctl.start()
        if self.fence is not None:
            ctl.fence(self.fence)
            if self.options.identity is not None and ctl.kube is not None:
                ctl.kube.api_client.user_agent = f"{ctl.kube.api_client.user_agent} ({self.options.identity})"
        try:
            await kopf.operator(memo=kopf.Memo(controller=ctl), stop_flag=self.stop_flag, ready_flag=self.ready,
                                **self.common)
        finally:
            await ctl.close()
            from vertex_operator import metrics

            metrics.PODS_WITHOUT_SIDECAR.clear()  # only the leader reports them

    def start(self) -> None:
        self.thread.start()

    async def stop(self) -> None:
        self.stop_flag.set()
        await _until(lambda: not self.thread.is_alive())


async def run(options: Options, *, stop_flag: threading.Event | asyncio.Event | None = None,
              ready_flag: threading.Event | asyncio.Event | None = None,
              controller: Controller | None = None) -> None:
    """Run the operator until stopped (signal or `stop_flag`).

    Two kopf operators share one Controller: the serving half (webhook and its indexes,
    `handlers.serving.SERVING`) runs from start to end; the reconciling half (the default
    registry) runs only while this replica holds the leader Lease (always with
    `standalone`). See `vertex_operator.leadership`.
    """
    # Imported here: registering the handlers is a side effect of the import.
    import vertex_operator.handlers  # noqa: F401
    from vertex_operator import metrics
    from vertex_operator.controller import Controller
    from vertex_operator.handlers.serving import SERVING
    from vertex_operator.leadership import LeaderElector, Timing
    from vertex_operator.metrics import MetricsServer
    from vertex_operator.readiness import ReadinessServer

    log = logging.getLogger(__name__)
    ctl = controller if controller is not None else Controller(options)
    stopping = asyncio.Event()
    metrics_server = None
    readiness_server: ReadinessServer | None = None
    elector: LeaderElector | None = None
    watchers: list[asyncio.Task[None]] = [asyncio.create_task(_wait_flag(stop_flag, stopping))]
    _own_signals(stopping)
    if options.metrics_port is not None:
        metrics_server = MetricsServer(options.metrics_addr, options.metrics_port)
        port = metrics_server.start()
        log.info("Metrics on http://%s:%d/metrics", options.metrics_addr, port)
    await ctl.start()
    assert ctl.kube is not None
    if options.leader_election:
        namespace = options.lease_namespace or options.operator_namespace
        if not namespace:
            raise ValueError("leader election needs the Lease's namespace (--operator-namespace or "
                             "POD_NAMESPACE), or --standalone for a single replica")
        timing = Timing(options.lease_duration, options.renew_deadline, options.retry_period)
        ctl.kube.lease_timeout = max(timing.retry_period, timing.renew_deadline / 2)
        elector = LeaderElector(ctl.kube, namespace, options.lease_name, identity=options.identity, timing=timing)
        ctl.elector = elector
        # Whose request is whose, in audit logs (and tests); the reconciling half does the same.
        options = dataclasses.replace(options, identity=elector.identity)
        ctl.kube.api_client.user_agent = f"{ctl.kube.api_client.user_agent} ({elector.identity})"
    else:
        metrics.LEADER.set(1)

    common: dict[str, Any] = dict(clusterwide=options.clusterwide, namespaces=options.namespaces,
                                  standalone=True)  # kopf's peering is off: the Lease decides
    serving_stop, serving_ready = asyncio.Event(), asyncio.Event()
    serving = asyncio.create_task(kopf.operator(
        registry=SERVING, liveness_endpoint=options.liveness, memo=kopf.Memo(controller=ctl),
        stop_flag=serving_stop, ready_flag=serving_ready, **common), name="vertex-operator serving")
    shutting_down = False

    def leader_info() -> dict[str, Any]:
        if elector is None:
            return {"leaderElection": False, "leading": True}
        return {"leaderElection": True, "identity": elector.identity, "leading": elector.holds(),
                "leader": elector.leader}

    if options.readiness_port is not None:
        webhook_url = None
        if ctl.webhook_server is not None:
            server = ctl.webhook_server
            webhook_url = lambda: server.url  # noqa: E731
        readiness_server = ReadinessServer(
            options.readiness_addr, options.readiness_port, webhook_url=webhook_url,
            serving=lambda: serving_ready.is_set() and not shutting_down and not serving.done(),
            leader=leader_info)
        port = await readiness_server.start()
        log.info("Readiness on http://%s:%d/readyz", options.readiness_addr, port)

    async def reconcile_while_leading(started: asyncio.Event) -> None:
        while not stopping.is_set():
            if elector is not None:
                await _first(elector.wait_until(True), stopping.wait())
                if stopping.is_set():
                    return
            half = ReconcilingHalf(options, common, fence=elector.check if elector is not None else None)
            half.start()
            await _until(lambda: half.ready.is_set() or not half.thread.is_alive())
            started.set()
            log.info("Reconciling (%s).", "leader" if elector is not None else "standalone")
            waits: list[Awaitable[Any]] = [stopping.wait(), _until(lambda: not half.thread.is_alive())]
            if elector is not None:
                waits.append(elector.wait_until(False))
            await _first(*waits)
            await half.stop()
            log.info("Stopped reconciling.")
            if half.error is not None and not stopping.is_set():
                raise half.error

    reconciling_started = asyncio.Event()
    reconciler = asyncio.create_task(reconcile_while_leading(reconciling_started), name="vertex-operator leading")
    elector_stop = asyncio.Event()
    election = asyncio.create_task(elector.run(elector_stop)) if elector is not None else None
    try:
        await _first(serving_ready.wait(), asyncio.shield(serving))
        _own_signals(stopping)
        if elector is None:
            await _first(reconciling_started.wait(), asyncio.shield(reconciler), asyncio.shield(serving))
        if not serving.done() and not reconciler.done():
            if ready_flag is not None:
                ready_flag.set()
            await _first(stopping.wait(), asyncio.shield(serving), asyncio.shield(reconciler))
    finally:
        shutting_down = True
        stopping.set()
        # Reconciling stops first and the Lease is released: a standby takes over at once,
        # while this replica's webhook keeps answering until the Service forgets it.
        await asyncio.gather(reconciler, return_exceptions=True)
        if election is not None:
            elector_stop.set()
            await asyncio.gather(election, return_exceptions=True)
        if options.shutdown_delay > 0 and not serving.done():
            await asyncio.sleep(options.shutdown_delay)
        serving_stop.set()
        await asyncio.gather(serving, return_exceptions=True)
        for watcher in watchers:
            watcher.cancel()
        if readiness_server is not None:
            await readiness_server.stop()
        if metrics_server is not None:
            metrics_server.stop()
        await ctl.close()
    for task in (serving, reconciler):
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.no_webhook and not (args.webhook_cert and args.webhook_key):
        parser.error("the webhook needs --webhook-cert and --webhook-key (the Helm chart mounts "
                     "them from a Secret); or run with --no-webhook")
    try:
        options = options_from_args(args)
        options = dataclasses.replace(options, store=load_ca(options.store))
    except (PolicyError, ValueError) as exc:
        parser.error(str(exc))
    if not args.standalone and not (args.lease_namespace or args.operator_namespace):
        parser.error("leader election needs a namespace for its Lease: --operator-namespace (env "
                     "POD_NAMESPACE) or --lease-namespace; or run a single replica with --standalone")
    try:
        from vertex_operator.leadership import Timing

        Timing(args.lease_duration, args.renew_deadline, args.retry_period)
    except ValueError as exc:
        parser.error(str(exc))
    kopf.configure(verbose=args.verbose, debug=args.debug, quiet=args.quiet)
    if not args.quiet:
        logging.getLogger("vertex_operator").setLevel(logging.DEBUG if args.debug else logging.INFO)
    log = logging.getLogger(__name__)
    if options.store is None:
        log.info("No store configured (--store-redis-url): rate limits and budgets are counted per pod.")
    else:
        log.info("Fleet-wide limits and budgets through %s.", options.store.url)
    try:
        asyncio.run(run(options))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
