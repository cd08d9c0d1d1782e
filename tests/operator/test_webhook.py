"""The injection webhook: real AdmissionReview v1 requests, over TLS, to the operator's server."""

from __future__ import annotations

import base64
import copy
import json
import ssl
import uuid
from typing import Any

import aiohttp
import jsonpatch
import pytest
import yaml

from tests.operator import objects as o
from tests.operator.conftest import Cluster, OperatorThread, eventually, webhook_samples
from tests.operator.harness import KubeEmulator

PATH = "/inject-vertex-sidecar"


def review(pod: dict[str, Any], namespace: str = o.NS, dry_run: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "", "namespace": namespace, "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "uid": "u", "groups": ["system:serviceaccounts"]},
            "object": pod, "oldObject": None, "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def pod(labels: dict[str, str] | None = None, namespace: str | None = None, **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"generateName": "chat-7d9f-", "labels": labels or {"app": "chat"}}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": [{"name": "app", "image": "app:1"}], **spec}}


class Admission:
    def __init__(self, operator: OperatorThread, ca: str) -> None:
        self.url = operator.webhook_url + PATH
        self.ssl = ssl.create_default_context(cafile=ca)

    async def post(self, body: dict[str, Any]) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.post(self.url, json=body, ssl=self.ssl) as response:
                assert response.status == 200, await response.text()
                return await response.json()

    async def admit(self, obj: dict[str, Any], namespace: str = o.NS) -> tuple[dict[str, Any], dict[str, Any]]:
        """The pod as the API server would store it, and the review response."""
        request = review(obj, namespace)
        answer = (await self.post(request))["response"]
        assert answer["uid"] == request["request"]["uid"]
        assert answer["allowed"] is True
        result = copy.deepcopy(obj)
        if "patch" in answer:
            assert answer["patchType"] == "JSONPatch"
            ops = json.loads(base64.b64decode(answer["patch"]))
            result = jsonpatch.apply_patch(result, ops)
        return result, answer


@pytest.fixture()
async def admission(operator: OperatorThread, tls_files: dict[str, Any]) -> Admission:
    return Admission(operator, str(tls_files["ca"]))


async def route_ready(cluster: Cluster, name: str = "gemini", ns: str = o.NS) -> None:
    async def check() -> bool:
        route = await cluster.get("VertexRoute", ns, name)
        return bool(route and route.get("status", {}).get("configHash"))
    await eventually(check)


async def arrange(cluster: Cluster, ns: str = o.NS, **route_extra: Any) -> None:
    await cluster.create(o.namespace(ns))
    await cluster.create(o.credential(ns=ns))
    await cluster.create(o.route(ns=ns, **route_extra))
    await route_ready(cluster, ns=ns)


def names(containers: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in containers]


async def test_selected_pod_gets_the_sidecar(cluster: Cluster, admission: Admission) -> None:
    await arrange(cluster)
    result, answer = await admission.admit(pod())
    assert "warnings" not in answer
    assert names(result["spec"]["initContainers"]) == ["vertex-sidecar"]
    sidecar = result["spec"]["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always"  # the emulated cluster reports 1.31
    assert sidecar["image"] == "registry.test/vertex-sidecar:test"
    assert result["spec"]["serviceAccountName"] == "vertex"
    assert {"name": "vertex-sidecar-config", "configMap": {"name": "vertex-sidecar-gemini"}} in result["spec"]["volumes"]
    env = {e["name"]: e["value"] for e in result["spec"]["containers"][0]["env"]}
    assert env == {"GOOGLE_VERTEX_BASE_URL": "http://127.0.0.1:4000/vertex_ai", "GOOGLE_GENAI_USE_VERTEXAI": "true",
                   "GOOGLE_CLOUD_PROJECT": "my-project", "GOOGLE_CLOUD_LOCATION": "europe-west4"}
    assert result["metadata"]["annotations"] == {"vertex.passthrough.dev/route": "gemini"}
    # The namespace was filled in from the review, and is not part of the patch.
    assert result["metadata"].get("namespace") is None


async def test_already_injected_pod_is_untouched(cluster: Cluster, admission: Admission) -> None:
    await arrange(cluster)
    once, _ = await admission.admit(pod())
    again, answer = await admission.admit(once)
    assert again == once and "patch" not in answer


async def test_unselected_and_opted_out_pods_are_untouched(cluster: Cluster, admission: Admission) -> None:
    await arrange(cluster)
    other = pod(labels={"app": "other"})
    assert (await admission.admit(other))[0] == other
    opted = pod()
    opted["metadata"]["annotations"] = {"vertex.passthrough.dev/inject": "false"}
    result, answer = await admission.admit(opted)
    assert result == opted and "warnings" not in answer


@pytest.mark.parametrize("namespace", ["kube-system", "vertex-system"])
async def test_system_and_operator_namespaces_are_never_injected(
        cluster: Cluster, admission: Admission, namespace: str) -> None:
    await cluster.create(o.namespace(namespace))
    await cluster.create(o.credential(ns=namespace))
    await cluster.create(o.route(ns=namespace))

    async def says_so() -> bool:  # the route tells why it serves nothing
        route = await cluster.get("VertexRoute", namespace, "gemini")
        ready = [c for c in ((route or {}).get("status") or {}).get("conditions") or [] if c["type"] == "Ready"]
        return bool(ready) and ready[0]["reason"] == "NamespaceExcluded"

    await eventually(says_so)
    obj = pod(namespace=namespace)
    result, answer = await admission.admit(obj, namespace=namespace)
    assert result == obj and "patch" not in answer


async def test_host_network_pod_is_refused_with_a_warning(cluster: Cluster, admission: Admission) -> None:
    await arrange(cluster)
    obj = pod(hostNetwork=True)
    result, answer = await admission.admit(obj)
    assert result == obj
    (warning,) = answer["warnings"]
    assert "VertexRoute 'gemini' selects this pod but did not inject its sidecar" in warning
    assert "hostNetwork" in warning


async def test_missing_credential_is_a_warning(cluster: Cluster, admission: Admission) -> None:
    await cluster.create(o.namespace())
    await cluster.create(o.route())

    async def warned() -> dict[str, Any]:
        result, answer = await admission.admit(pod())
        assert answer.get("warnings"), answer
        return answer

    answer = await eventually(warned)
    assert "VertexCredential 'vertex' does not exist" in answer["warnings"][0]


async def test_tls_route_and_regular_container(cluster: Cluster, admission: Admission, kube: KubeEmulator) -> None:
    await arrange(cluster, sidecar={"nativeSidecar": "false", "tls": {"enabled": True}})
    result, _ = await admission.admit(pod())
    # Below 1.29 the sidecar comes first (its postStart holds the app back until it is ready).
    assert names(result["spec"]["containers"]) == ["vertex-sidecar", "app"]
    env = {e["name"]: e["value"] for e in result["spec"]["containers"][1]["env"]}
    assert env["GOOGLE_VERTEX_BASE_URL"] == "https://localhost:4443/vertex_ai"
    assert env["SSL_CERT_FILE"] == "/var/run/vertex-sidecar/tls/ca.crt"


async def test_conflicting_routes_are_named_in_a_warning(cluster: Cluster, admission: Admission) -> None:
    await arrange(cluster)
    await cluster.create(o.route("later"))
    await route_ready(cluster, "later")
    result, answer = await admission.admit(pod())
    assert result["metadata"]["annotations"]["vertex.passthrough.dev/route"] == "gemini"
    assert "VertexRoute(s) 'later' also select this pod" in answer["warnings"][0]


async def test_webhook_metrics_count_answers_latency_and_patch_operations(
        cluster: Cluster, admission: Admission) -> None:
    await arrange(cluster)
    before = webhook_samples()
    injected, answer = await admission.admit(pod())
    await admission.admit(pod(labels={"app": "other"}))  # no route selects it
    await admission.admit(pod(hostNetwork=True))  # selected, not injected: a warning
    after = webhook_samples()
    delta = {key: after[key] - before[key] for key in after}
    assert {k: delta[k] for k in ("injected", "skipped", "warned", "error", "answered", "admission_errors")} == {
        "injected": 1, "skipped": 1, "warned": 1, "error": 0, "answered": 3, "admission_errors": 0}
    assert 0 < delta["seconds"] < 5
    # The operations the webhook built (sidecar, volumes, env, annotations, service account, ...);
    # kopf's answer is its own diff of the same change, so at least as many as it has.
    assert delta["patch_ops"] >= len(json.loads(base64.b64decode(answer["patch"]))) >= 4
    assert "vertex-sidecar" in json.dumps(injected)


async def test_bad_review_is_a_bad_request(operator: OperatorThread, admission: Admission) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(admission.url, data=b"not json", ssl=admission.ssl) as response:
            assert response.status == 400


async def test_native_auto_on_an_older_cluster(kube: KubeEmulator, cluster: Cluster, start_operator: Any,
                                               tls_files: dict[str, Any]) -> None:
    kube.server_version = {"major": "1", "minor": "28+", "gitVersion": "v1.28.3-gke.1"}
    admission = Admission(await start_operator(), str(tls_files["ca"]))
    await arrange(cluster)
    result, _ = await admission.admit(pod())
    assert "initContainers" not in result["spec"]
    assert names(result["spec"]["containers"]) == ["vertex-sidecar", "app"]


async def test_switched_pod_gets_the_new_accounts_pull_secrets(cluster: Cluster, admission: Admission) -> None:
    await arrange(cluster)
    await cluster.patch("ServiceAccount", o.NS, "vertex", {"imagePullSecrets": [{"name": "team-registry"}]})
    # As the ServiceAccount admission plugin left it: the default account's pull secret copied in.
    before = pod(imagePullSecrets=[{"name": "default-registry"}])
    result, answer = await admission.admit(before)
    assert result["spec"]["serviceAccountName"] == "vertex"
    assert result["spec"]["imagePullSecrets"] == [{"name": "default-registry"}, {"name": "team-registry"}]
    # None before: the list is created; and a pod that already runs as the account is left alone.
    result, _ = await admission.admit(pod())
    assert result["spec"]["imagePullSecrets"] == [{"name": "team-registry"}]
    result, _ = await admission.admit(pod(serviceAccountName="vertex"))
    assert "imagePullSecrets" not in result["spec"]


async def test_interception_route_through_the_webhook(cluster: Cluster, admission: Admission) -> None:
    await arrange(cluster, sidecar={"interception": True, "proxyOtherHosts": "deny"})
    config_map = await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini")
    assert config_map is not None
    rendered = yaml.safe_load(config_map["data"]["config.yaml"])
    assert rendered["proxy_listen"] == "127.0.0.1:4080" and rendered["proxy"] == {"other_hosts": "deny"}
    own = pod()
    own["spec"]["containers"][0]["env"] = [{"name": "HTTPS_PROXY", "value": "http://corp:3128"},
                                           {"name": "NO_PROXY", "value": "corp.example"}]
    result, answer = await admission.admit(own)
    env = {e["name"]: e.get("value") for e in result["spec"]["containers"][0]["env"]}
    assert env["HTTPS_PROXY"] == "http://corp:3128" and env["https_proxy"] == "http://127.0.0.1:4080"
    assert env["NO_PROXY"].startswith("corp.example,localhost,127.0.0.1")
    assert env["SSL_CERT_FILE"] == "/var/run/vertex-sidecar/tls/ca.crt" and env["NODE_USE_ENV_PROXY"] == "1"
    assert any("sets HTTPS_PROXY itself" in w for w in answer["warnings"])
