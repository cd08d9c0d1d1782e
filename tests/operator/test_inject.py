"""`inject`: pod → JSON patch, checked by applying the patch and looking at the pod."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jsonpatch
import pytest

from tests.operator import objects as o
from vertex_operator import inject
from vertex_operator.crd import parse_credential, parse_route

IMAGE = "registry.test/vertex-sidecar:1"


def make_plan(route_extra: dict[str, Any] | None = None, credential_spec: dict[str, Any] | None = None,
              server_version: tuple[int, int] | None = (1, 31)) -> inject.SidecarPlan:
    route = parse_route(o.route(**(route_extra or {})))
    credential = parse_credential(o.credential(**(credential_spec or {})))
    return inject.plan_sidecar(route, credential, default_image=IMAGE, server_version=server_version)


def make_pod(**spec: Any) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {"containers": [{"name": "app", "image": "app:1"}]}
    pod_spec.update(spec)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "chat-", "namespace": o.NS, "labels": {"app": "chat"}},
            "spec": pod_spec}


def apply(pod: dict[str, Any], plan: inject.SidecarPlan) -> dict[str, Any]:
    result = inject.inject(pod, plan)
    assert result.injected, result.reason
    return jsonpatch.apply_patch(copy.deepcopy(pod), result.patch)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def sidecar_of(pod: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
             if c["name"] == "vertex-sidecar"]
    assert len(found) == 1
    return found[0]


def test_native_sidecar_full_pod() -> None:
    pod = apply(make_pod(), make_plan())
    assert pod["metadata"]["annotations"] == {"vertex.passthrough.dev/route": "gemini"}
    assert pod["spec"]["serviceAccountName"] == "vertex"
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["vertex-sidecar"]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["app"]
    sidecar = pod["spec"]["initContainers"][0]
    assert sidecar == {
        "name": "vertex-sidecar",
        "image": IMAGE,
        "command": ["vertex-sidecar", "--config", "/etc/vertex-sidecar/config.yaml"],
        # The admin host (pod IP); showback: who spends (generateName "chat-", no owner: a bare pod's stem).
        "env": [{"name": "VERTEX_SIDECAR_ADMIN_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "VERTEX_SIDECAR_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "VERTEX_SIDECAR_WORKLOAD", "value": "chat"}],
        "ports": [{"name": "vertex-admin", "containerPort": 9464, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False, "privileged": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
        },
        "startupProbe": {"httpGet": {"path": "/readyz", "port": 9464}, "periodSeconds": 1,
                         "timeoutSeconds": 1, "failureThreshold": 120},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": 9464}, "periodSeconds": 5,
                           "timeoutSeconds": 2, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": 9464}, "periodSeconds": 10,
                          "timeoutSeconds": 2, "failureThreshold": 3},
        "volumeMounts": [
            {"name": "vertex-sidecar-config", "mountPath": "/etc/vertex-sidecar", "readOnly": True},
            {"name": "vertex-sidecar-tmp", "mountPath": "/tmp"},
        ],
        "restartPolicy": "Always",
    }
    assert pod["spec"]["volumes"] == [
        {"name": "vertex-sidecar-config", "configMap": {"name": "vertex-sidecar-gemini"}},
        {"name": "vertex-sidecar-tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    assert env_of(pod["spec"]["containers"][0]) == {
        "GOOGLE_VERTEX_BASE_URL": "http://127.0.0.1:4000/vertex_ai",
        "GOOGLE_GENAI_USE_VERTEXAI": "true",
        "GOOGLE_CLOUD_PROJECT": "my-project",
        "GOOGLE_CLOUD_LOCATION": "europe-west4",
    }


def test_regular_container_when_not_native() -> None:
    plan = make_plan({"sidecar": {"nativeSidecar": "false"}})
    pod = apply(make_pod(), plan)
    assert "initContainers" not in pod["spec"]
    # First: the kubelet starts the app only after the sidecar's postStart (ready) returned.
    assert [c["name"] for c in pod["spec"]["containers"]] == ["vertex-sidecar", "app"]
    sidecar = pod["spec"]["containers"][0]
    assert "restartPolicy" not in sidecar
    assert sidecar["lifecycle"] == {
        "postStart": {"exec": {"command": ["vertex-sidecar", "--wait-ready", "http://127.0.0.1:9464/readyz",
                                           "--wait-timeout", "120"]}},
        "preStop": {"exec": {"command": ["vertex-sidecar", "--linger", "10"]}},
    }
    assert pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "app"
    assert env_of(pod["spec"]["containers"][1])["GOOGLE_GENAI_USE_VERTEXAI"] == "true"
    # The sidecar itself gets no app env, only its admin host (the pod IP) and its showback env.
    assert [e["name"] for e in sidecar["env"]] == [
        "VERTEX_SIDECAR_ADMIN_HOST", "VERTEX_SIDECAR_NAMESPACE", "VERTEX_SIDECAR_WORKLOAD"]


@pytest.mark.parametrize(("setting", "version", "native"), [
    ("auto", (1, 29), True), ("auto", (1, 33), True), ("auto", (1, 28), False), ("auto", None, False),
    ("true", (1, 27), True), ("false", (1, 33), False),
])
def test_native_resolution(setting: str, version: tuple[int, int] | None, native: bool) -> None:
    assert inject.resolve_native(setting, version) is native
    plan = make_plan({"sidecar": {"nativeSidecar": setting}}, server_version=version)
    assert plan.native is native


def test_native_sidecar_goes_first_and_init_containers_get_env() -> None:
    pod = apply(make_pod(initContainers=[{"name": "migrate", "image": "m:1"}]), make_plan())
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["vertex-sidecar", "migrate"]
    assert env_of(pod["spec"]["initContainers"][1])["GOOGLE_CLOUD_PROJECT"] == "my-project"


def test_regular_sidecar_leaves_init_containers_alone() -> None:
    plan = make_plan({"sidecar": {"nativeSidecar": "false"}})
    pod = apply(make_pod(initContainers=[{"name": "migrate", "image": "m:1"}]), plan)
    assert pod["spec"]["initContainers"] == [{"name": "migrate", "image": "m:1"}]


def test_env_set_by_the_container_wins_and_other_env_is_kept() -> None:
    container = {"name": "app", "image": "app:1", "env": [
        {"name": "GOOGLE_CLOUD_LOCATION", "value": "us-east4"},
        {"name": "GOOGLE_CLOUD_PROJECT", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "p"}}},
        {"name": "OTHER", "value": "1"},
    ]}
    pod = apply(make_pod(containers=[container, {"name": "second", "image": "s:1"}]), make_plan())
    first, second = pod["spec"]["containers"]
    assert [e["name"] for e in first["env"]] == [
        "GOOGLE_CLOUD_LOCATION", "GOOGLE_CLOUD_PROJECT", "OTHER",
        "GOOGLE_VERTEX_BASE_URL", "GOOGLE_GENAI_USE_VERTEXAI"]
    assert env_of(first)["GOOGLE_CLOUD_LOCATION"] == "us-east4"
    assert first["env"][1]["valueFrom"] == {"configMapKeyRef": {"name": "c", "key": "p"}}
    assert env_of(second)["GOOGLE_CLOUD_LOCATION"] == "europe-west4"


def test_idempotent_on_a_pod_that_has_the_sidecar() -> None:
    plan = make_plan()
    once = apply(make_pod(), plan)
    again = inject.inject(once, plan)
    assert not again.injected and again.reason == "the pod already has the sidecar" and not again.warnings


def test_opt_out_annotation() -> None:
    pod = make_pod()
    pod["metadata"]["annotations"] = {"vertex.passthrough.dev/inject": "false"}
    result = inject.inject(pod, make_plan())
    assert not result.injected and "opted out" in result.reason and not result.warnings


def test_host_network_is_refused_with_a_warning() -> None:
    result = inject.inject(make_pod(hostNetwork=True), make_plan())
    assert not result.injected
    assert len(result.warnings) == 1
    assert "hostNetwork" in result.warnings[0] and "Workload Identity" in result.warnings[0]
    assert "gemini" in result.warnings[0]


def test_own_service_account_conflicts_with_workload_identity() -> None:
    result = inject.inject(make_pod(serviceAccountName="app-sa"), make_plan())
    assert not result.injected
    assert "'app-sa'" in result.warnings[0] and "'vertex'" in result.warnings[0]


def test_own_service_account_is_kept_with_a_key_secret() -> None:
    plan = make_plan(credential_spec={"secretRef": {"name": "vertex-key"}})
    pod = apply(make_pod(serviceAccountName="app-sa"), plan)
    assert pod["spec"]["serviceAccountName"] == "app-sa"


@pytest.mark.parametrize("own", [None, "default", "vertex"])
def test_service_account_is_set(own: str | None) -> None:
    spec = {} if own is None else {"serviceAccountName": own, "serviceAccount": own}
    pod = apply(make_pod(**spec), make_plan())
    assert pod["spec"]["serviceAccountName"] == "vertex"
    if own is not None:
        assert pod["spec"]["serviceAccount"] == "vertex"


def test_same_named_volume_is_refused() -> None:
    pod = make_pod(volumes=[{"name": "vertex-sidecar-config", "emptyDir": {}}])
    result = inject.inject(pod, make_plan())
    assert not result.injected and "vertex-sidecar-config" in result.warnings[0]


def test_existing_annotations_and_volumes_are_extended() -> None:
    pod = make_pod(volumes=[{"name": "data", "emptyDir": {}}])
    pod["metadata"]["annotations"] = {"team": "a"}
    out = apply(pod, make_plan())
    assert out["metadata"]["annotations"] == {"team": "a", "vertex.passthrough.dev/route": "gemini"}
    assert [v["name"] for v in out["spec"]["volumes"]] == ["data", "vertex-sidecar-config", "vertex-sidecar-tmp"]


def test_federation_mounts_token_and_credential_config() -> None:
    plan = make_plan(credential_spec={"federation": {
        "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k8s",
        "credentialConfig": {"configMapName": "wif-config"}, "tokenExpirationSeconds": 7200}})
    pod = apply(make_pod(), plan)
    volume = pod["spec"]["volumes"][-1]
    assert volume == {"name": "vertex-federation", "projected": {"defaultMode": 0o444, "sources": [
        {"serviceAccountToken": {
            "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k8s",
            "expirationSeconds": 7200, "path": "token"}},
        {"configMap": {"name": "wif-config", "items": [
            {"key": "credential-configuration.json", "path": "credential-configuration.json"}]}},
    ]}}
    assert {"name": "vertex-federation", "mountPath": "/var/run/secrets/vertex/federation",
            "readOnly": True} in sidecar_of(pod)["volumeMounts"]
    assert pod["spec"]["serviceAccountName"] == "vertex"


def test_key_secret_is_mounted() -> None:
    plan = make_plan(credential_spec={"secretRef": {"name": "vertex-key", "key": "sa.json"}})
    pod = apply(make_pod(), plan)
    assert pod["spec"]["volumes"][-1] == {"name": "vertex-credential-key", "secret": {
        "secretName": "vertex-key", "items": [{"key": "sa.json", "path": "key.json"}], "defaultMode": 0o444}}
    assert {"name": "vertex-credential-key", "mountPath": "/var/run/secrets/vertex/key",
            "readOnly": True} in sidecar_of(pod)["volumeMounts"]


def test_tls_shares_the_ca_bundle_with_app_containers() -> None:
    plan = make_plan({"sidecar": {"tls": {"enabled": True, "port": 4443}}})
    container = {"name": "app", "image": "app:1", "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                 "env": [{"name": "SSL_CERT_FILE", "value": "/own/ca.pem"}]}
    pod = apply(make_pod(containers=[container, {"name": "b", "image": "b:1"}],
                         volumes=[{"name": "data", "emptyDir": {}}]), plan)
    assert {"name": "vertex-sidecar-tls", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}} in pod["spec"]["volumes"]
    first, second = pod["spec"]["containers"]
    tls_mount = {"name": "vertex-sidecar-tls", "mountPath": "/var/run/vertex-sidecar/tls", "readOnly": True}
    assert first["volumeMounts"] == [{"name": "data", "mountPath": "/data"}, tls_mount]
    assert second["volumeMounts"] == [tls_mount]
    assert env_of(first)["SSL_CERT_FILE"] == "/own/ca.pem"
    assert env_of(second)["SSL_CERT_FILE"] == "/var/run/vertex-sidecar/tls/ca.crt"
    assert env_of(second)["GOOGLE_VERTEX_BASE_URL"] == "https://localhost:4443/vertex_ai"
    assert {"name": "vertex-sidecar-tls", "mountPath": "/var/run/vertex-sidecar/tls"} in sidecar_of(pod)["volumeMounts"]


def test_every_runtime_is_pointed_at_the_ca_and_the_containers_own_values_win() -> None:
    plan = make_plan({"sidecar": {"tls": {"enabled": True, "trustBundle": {"configMapName": "corp-roots",
                                                                           "key": "bundle.pem"}}}})
    own = {"name": "app", "image": "app:1", "env": [{"name": "NODE_EXTRA_CA_CERTS", "value": "/corp/ca.pem"},
                                                   {"name": "REQUESTS_CA_BUNDLE", "value": "/corp/all.pem"}]}
    pod = apply(make_pod(containers=[own, {"name": "b", "image": "b:1"}]), plan)
    first, second = pod["spec"]["containers"]
    bundle, pod_ca = "/var/run/vertex-sidecar/tls/ca.crt", "/var/run/vertex-sidecar/tls/pod-ca.crt"
    assert {k: v for k, v in env_of(second).items() if k.endswith(("_CERTS", "_FILE", "_BUNDLE", "_PATH"))} == {
        "SSL_CERT_FILE": bundle, "REQUESTS_CA_BUNDLE": bundle, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": bundle,
        "NODE_EXTRA_CA_CERTS": pod_ca}
    assert env_of(first)["NODE_EXTRA_CA_CERTS"] == "/corp/ca.pem" and env_of(first)["REQUESTS_CA_BUNDLE"] == "/corp/all.pem"
    assert env_of(first)["SSL_CERT_FILE"] == bundle
    # The organisation's roots reach the sidecar only (it writes them into the bundle).
    trust = {"name": "vertex-sidecar-trust", "configMap": {"name": "corp-roots",
                                                           "items": [{"key": "bundle.pem", "path": "roots.pem"}]}}
    assert trust in pod["spec"]["volumes"]
    assert {"name": "vertex-sidecar-trust", "mountPath": "/etc/vertex-sidecar/trust", "readOnly": True} in (
        sidecar_of(pod)["volumeMounts"])
    assert not any(m["name"] == "vertex-sidecar-trust" for c in (first, second) for m in c.get("volumeMounts", []))
    assert plan.config_hash != make_plan({"sidecar": {"tls": {"enabled": True}}}).config_hash


def test_custom_ports_image_and_resources() -> None:
    plan = make_plan({"sidecar": {"image": "own:2", "imagePullPolicy": "Always", "port": 5000,
                                  "adminPort": 9500, "resources": {"limits": {"memory": "1Gi", "cpu": 1}}}})
    pod = apply(make_pod(), plan)
    sidecar = sidecar_of(pod)
    assert sidecar["image"] == "own:2" and sidecar["imagePullPolicy"] == "Always"
    assert sidecar["resources"] == {"limits": {"memory": "1Gi", "cpu": "1"}}
    assert sidecar["readinessProbe"]["httpGet"]["port"] == 9500
    assert env_of(pod["spec"]["containers"][0])["GOOGLE_VERTEX_BASE_URL"] == "http://127.0.0.1:5000/vertex_ai"


def test_annotation_keys_are_escaped_in_json_pointers() -> None:
    result = inject.inject({**make_pod(), "metadata": {"annotations": {"a": "b"}}}, make_plan())
    assert result.patch[0]["path"] == "/metadata/annotations/vertex.passthrough.dev~1route"


def test_config_hash_tracks_what_needs_new_pods_only() -> None:
    base = make_plan()
    assert base.config_hash == make_plan().config_hash
    # Policy is hot-reloaded: no new pods.
    assert make_plan({"match": {"models": ["claude-*"]}, "limits": {"requestsPerMinute": 5}}).config_hash == base.config_hash
    changed = [
        make_plan({"sidecar": {"image": "other:1"}}),
        make_plan({"sidecar": {"port": 4001}}),
        make_plan({"sidecar": {"tls": {"enabled": True}}}),
        make_plan({"defaults": {"project": "other-project", "location": "europe-west4"}}),
        make_plan(credential_spec={"secretRef": {"name": "k"}}),
        make_plan(credential_spec={"serviceAccountName": "other",
                                   "workloadIdentity": {"projectId": "my-project", "projectNumber": "1"}}),
        dataclasses.replace(base, route_name="other"),
    ]
    assert len({p.config_hash for p in changed} | {base.config_hash}) == len(changed) + 1
    # The cluster version alone does not restart workloads.
    assert make_plan(server_version=(1, 28)).config_hash == base.config_hash


def test_pull_secrets_of_the_new_account_are_added_once() -> None:
    pod = make_pod(imagePullSecrets=[{"name": "a"}])
    result = inject.inject(pod, make_plan(), pull_secrets=["b", "a", "b"])
    assert result.service_account == "vertex"
    patched = jsonpatch.apply_patch(copy.deepcopy(pod), result.patch)
    assert patched["spec"]["imagePullSecrets"] == [{"name": "a"}, {"name": "b"}]
    assert inject.pull_secret_ops({}, []) == []


# ------------------------------------------------------- interception (zero-code-change mode)

CA = "/var/run/vertex-sidecar/tls/ca.crt"


def test_interception_sets_proxy_and_ca_bundle_env_and_shares_the_bundle() -> None:
    plan = make_plan({"sidecar": {"interception": True}})
    pod = apply(make_pod(initContainers=[{"name": "migrate", "image": "m:1"}]), plan)
    for container in (pod["spec"]["containers"][0], pod["spec"]["initContainers"][1]):  # native: init too
        env = env_of(container)
        assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://127.0.0.1:4080"
        assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1,.svc,.svc.cluster.local,.cluster.local,169.254.169.254,metadata.google.internal"
        assert env["NODE_USE_ENV_PROXY"] == "1"
        assert all(env[name] == CA for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE",
                                                "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"))
        assert env["NODE_EXTRA_CA_CERTS"] == "/var/run/vertex-sidecar/tls/pod-ca.crt"  # Node adds it to its roots
        assert env["GOOGLE_GENAI_USE_VERTEXAI"] == "true" and env["GOOGLE_CLOUD_LOCATION"]  # bare SDK clients
        assert {"name": "vertex-sidecar-tls", "mountPath": "/var/run/vertex-sidecar/tls", "readOnly": True} in (
            container["volumeMounts"])
    assert "HTTPS_PROXY" not in env_of(sidecar_of(pod))  # the sidecar itself dials Google directly
    assert {"name": "vertex-sidecar-tls", "mountPath": "/var/run/vertex-sidecar/tls"} in sidecar_of(pod)["volumeMounts"]
    assert "HTTPS_PROXY" not in env_of(apply(make_pod(), make_plan())["spec"]["containers"][0])  # off by default


def test_interception_keeps_and_extends_no_proxy_and_the_containers_own_values_win() -> None:
    plan = make_plan({"sidecar": {"interception": True}})
    app = {"name": "app", "image": "app:1", "env": [
        {"name": "NO_PROXY", "value": "internal.example.com, localhost"},
        {"name": "HTTPS_PROXY", "value": "http://corp-proxy:3128"},
        {"name": "no_proxy", "valueFrom": {"configMapKeyRef": {"name": "proxy", "key": "no_proxy"}}},
    ]}
    pod_in = make_pod(containers=[app, {"name": "worker", "image": "w:1"}])
    result = inject.inject(pod_in, plan)
    pod = jsonpatch.apply_patch(copy.deepcopy(pod_in), result.patch)
    env = env_of(pod["spec"]["containers"][0])
    assert env["NO_PROXY"] == "internal.example.com,localhost,127.0.0.1,::1,.svc,.svc.cluster.local,.cluster.local,169.254.169.254,metadata.google.internal"
    assert env["HTTPS_PROXY"] == "http://corp-proxy:3128" and env["https_proxy"] == "http://127.0.0.1:4080"
    assert [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == "no_proxy"] == [app["env"][2]]
    assert env_of(pod["spec"]["containers"][1])["HTTPS_PROXY"] == "http://127.0.0.1:4080"
    assert result.warnings == ["VertexRoute 'gemini': container 'app' sets HTTPS_PROXY, no_proxy itself: its value "
                               "wins, so its HTTPS calls may not go through the sidecar's proxy (or may not trust "
                               "its CA)"]
    assert inject.interception_warnings(pod_in["spec"], make_plan()) == []


def test_interception_renders_the_proxy_listener_and_needs_a_free_port() -> None:
    from vertex_operator import render
    from vertex_operator.crd import SpecError

    route = parse_route(o.route(sidecar={"interception": True}))
    settings = render.tls_settings(route)
    assert settings == {"proxy_listen": "127.0.0.1:4080", "proxy": {"other_hosts": "tunnel"}, "tls": {
        "ca_bundle_path": CA, "ca_cert_path": "/var/run/vertex-sidecar/tls/pod-ca.crt"}}
    from vertex_operator import interception
    assert set(interception.CA_VARS) == {*inject.CA_BUNDLE_ENV, *inject.CA_EXTRA_ENV}
    assert make_plan({"sidecar": {"interception": True}}).config_hash != make_plan().config_hash
    with pytest.raises(SpecError, match="4080"):
        parse_route(o.route(sidecar={"interception": True, "port": 4080}))
