"""`vertex-operator` command line, liveness, and the namespace-scoped mode."""

from __future__ import annotations

import json
import socket
import urllib.request
from typing import Any

import pytest

from tests.operator import objects as o
from tests.operator.conftest import RBAC_FILE, Cluster, eventually
from tests.operator.harness import KubeEmulator
from vertex_operator import cli


def test_flags_like_kopf_run() -> None:
    args = cli.build_parser().parse_args(["-n", "a", "--namespace", "b", "--standalone", "-L",
                                          "http://0.0.0.0:8080/healthz", "--verbose",
                                          "--webhook-port", "0", "--metrics-port", "-1"])
    options = cli.options_from_args(args)
    assert (options.clusterwide, options.namespaces, options.standalone) == (False, ("a", "b"), True)
    assert options.liveness == "http://0.0.0.0:8080/healthz"
    assert options.webhook_port is None and options.metrics_port is None
    everything = cli.options_from_args(cli.build_parser().parse_args([]))
    assert everything.clusterwide and everything.standalone is None and everything.webhook_port == 9443
    assert cli.options_from_args(cli.build_parser().parse_args(["-A"])).clusterwide


def test_google_endpoints_and_binding_timings() -> None:
    defaults = cli.options_from_args(cli.build_parser().parse_args([]))
    assert defaults.iam_endpoint == "https://iam.googleapis.com"
    assert defaults.resource_manager_endpoint == "https://cloudresourcemanager.googleapis.com"
    assert (defaults.iam_propagation_seconds, defaults.binding_recheck_seconds) == (120.0, 10.0)
    options = cli.options_from_args(cli.build_parser().parse_args([
        "--iam-endpoint", "http://127.0.0.1:9/iam", "--resource-manager-endpoint", "http://127.0.0.1:9/crm",
        "--iam-propagation-seconds", "5", "--binding-recheck-seconds", "1"]))
    assert (options.iam_endpoint, options.resource_manager_endpoint) == ("http://127.0.0.1:9/iam",
                                                                         "http://127.0.0.1:9/crm")
    assert (options.iam_propagation_seconds, options.binding_recheck_seconds) == (5.0, 1.0)


def test_excluded_namespaces() -> None:
    options = cli.options_from_args(cli.build_parser().parse_args(["--operator-namespace", "vertex-system"]))
    assert options.excluded_namespaces == {"kube-system", "kube-public", "kube-node-lease", "vertex-system"}
    # The chart's webhook.excludeNamespaces: the webhook is never called there either.
    more = cli.options_from_args(cli.build_parser().parse_args(
        ["--operator-namespace", "vertex-system", "--exclude-namespace", "monitoring", "--exclude-namespace", "ci"]))
    assert more.excluded_namespaces == options.excluded_namespaces | {"monitoring", "ci"}


def test_scope_flags_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["-A", "-n", "x"])


def test_webhook_needs_a_certificate(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["-A"])
    assert exc.value.code == 2
    assert "--webhook-cert" in capsys.readouterr().err


def test_rbac_record_is_sorted_unique_triples() -> None:
    data = json.loads(RBAC_FILE.read_text())
    triples = [tuple(t) for t in data]
    assert triples == sorted(set(triples)) and all(len(t) == 3 for t in triples)
    verbs = {"get", "list", "watch", "create", "update", "patch", "delete"}
    assert all(verb in verbs for _, _, verb in triples)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_liveness_endpoint(kube: KubeEmulator, start_operator: Any) -> None:
    url = f"http://127.0.0.1:{free_port()}/healthz"
    await start_operator(liveness=url)

    async def alive() -> bool:
        import asyncio
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        return isinstance(json.loads(body), dict)

    await eventually(alive)


async def test_namespace_scoped_operator_ignores_other_namespaces(
        kube: KubeEmulator, cluster: Cluster, start_operator: Any) -> None:
    await start_operator(clusterwide=False, namespaces=("team-a",))
    # team-b first: by the time team-a is served, an operator that saw team-b would have acted.
    for ns in ("team-b", "team-a"):
        await cluster.create(o.namespace(ns))
        await cluster.create(o.credential(ns=ns))
        await cluster.create(o.route(ns=ns))

    async def served() -> bool:
        route = await cluster.get("VertexRoute", "team-a", "gemini")
        return bool(route and route.get("status"))

    await eventually(served)
    assert await cluster.get("ConfigMap", "team-b", "vertex-sidecar-gemini") is None
    assert "status" not in (await cluster.get("VertexRoute", "team-b", "gemini") or {})
    touched = [r.url.path for r in list(kube._requests) if "/namespaces/team-b/" in r.url.path
               and r.headers.get("User-Agent", "").startswith(("kopf/", "vertex-operator/"))]
    assert touched == []
