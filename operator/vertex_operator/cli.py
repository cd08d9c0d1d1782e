"""`vertex-operator`: run the operator, with the familiar `kopf run` flags and a few of ours."""

from __future__ import annotations

import argparse
import asyncio
import logging
import dataclasses
import os
import re
import sys
import threading
from typing import TYPE_CHECKING, Sequence

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
    p.add_argument("--standalone", action="store_true", help="no peering with other operator instances")
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
    )


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


async def run(options: Options, *, stop_flag: threading.Event | asyncio.Event | None = None,
              ready_flag: threading.Event | asyncio.Event | None = None,
              controller: Controller | None = None) -> None:
    """Run the operator until stopped (signal or `stop_flag`)."""
    # Imported here: registering the handlers is a side effect of the import.
    import vertex_operator.handlers  # noqa: F401
    from vertex_operator.controller import Controller
    from vertex_operator.metrics import MetricsServer

    ctl = controller if controller is not None else Controller(options)
    metrics_server = None
    if options.metrics_port is not None:
        metrics_server = MetricsServer(options.metrics_addr, options.metrics_port)
        port = metrics_server.start()
        logging.getLogger(__name__).info("Metrics on http://%s:%d/metrics", options.metrics_addr, port)
    try:
        await kopf.operator(
            clusterwide=options.clusterwide,
            namespaces=options.namespaces,
            standalone=options.standalone,
            liveness_endpoint=options.liveness,
            memo=kopf.Memo(controller=ctl),
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        if metrics_server is not None:
            metrics_server.stop()


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
