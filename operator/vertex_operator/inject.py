"""Pod → JSON patch that adds the Vertex sidecar; pure.

`plan_sidecar` turns a route and its credential into a `SidecarPlan` (everything a pod
needs), `inject` turns a pod plus a plan into an RFC 6902 JSON patch. Nothing here talks
to the cluster, so every rule (idempotency, opt-out, refusals, env precedence, TLS,
the credential-specific volumes) is tested directly on pod dicts.

The credential-specific bits live here too: Workload Identity needs only the service
account; federation mounts its credential-config ConfigMap and a projected service
account token; a key Secret is mounted for `secretRef`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from vertex_operator import fleet, interception, isolation, render, showback
from vertex_operator.tracing import EffectiveTracing, TracingDefaults, effective_tracing, tracing_env
from vertex_operator.crd import (
    INJECT_ANNOTATION, PROXY_PORT, ROUTE_ANNOTATION, Credential, Federation, Route, SecretKey, TrustBundle,
)

CONTAINER_NAME = "vertex-sidecar"
CONFIG_VOLUME = "vertex-sidecar-config"
TMP_VOLUME = "vertex-sidecar-tmp"
TLS_VOLUME = "vertex-sidecar-tls"
FEDERATION_VOLUME = "vertex-federation"
KEY_VOLUME = "vertex-credential-key"
STORE_PASSWORD_VOLUME = "vertex-store-password"
ADMIN_PORT_NAME = "vertex-admin"
SIDECAR_UID = 65532  # the distroless "nonroot" user; numeric so runAsNonRoot can verify it

# Where each runtime looks for its CA roots. The bundle (public roots + the route's trust
# bundle + the pod CA) replaces a runtime's roots; Node's variable adds to its own, so it
# gets the pod CA alone.
CA_BUNDLE_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
CA_EXTRA_ENV = ("NODE_EXTRA_CA_CERTS",)
APP_ENV_NAMES = ("GOOGLE_VERTEX_BASE_URL", "GOOGLE_GENAI_USE_VERTEXAI",
                 "GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION", *CA_BUNDLE_ENV, *CA_EXTRA_ENV)
TRUST_VOLUME = "vertex-sidecar-trust"

# How long the app waits for the sidecar to be ready at pod start, and how long a regular
# (non-native) sidecar keeps serving after the pod is told to stop.
STARTUP_SECONDS = 120
LINGER_SECONDS = 10
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"

# Native sidecars (init containers with restartPolicy: Always) are on by default from 1.29.
NATIVE_SIDECAR_MIN_VERSION = (1, 29)

JsonPatch = list[dict[str, Any]]


@dataclass(frozen=True)
class SidecarPlan:
    """Everything about the sidecar that ends up in a pod."""

    route_name: str
    config_map: str
    image: str
    image_pull_policy: str | None
    port: int
    admin_port: int
    tls_enabled: bool
    tls_port: int
    resources: Mapping[str, Mapping[str, str]]
    native: bool
    native_setting: str
    service_account_name: str
    credential_mode: str
    federation: Federation | None
    secret: SecretKey | None
    project: str
    location: str
    isolation: str = isolation.COOPERATIVE
    trust_bundle: TrustBundle | None = None  # with TLS: the organisation's roots for the bundle
    tracing: EffectiveTracing | None = None  # None: tracing off
    interception: bool = False  # the forward proxy: HTTPS_PROXY and the CA bundle on app containers

    @property
    def shares_ca_bundle(self) -> bool:
        """Whether app containers mount the volume with the pod-local CA bundle."""
        return self.tls_enabled or self.interception
    store_secret: SecretKey | None = None  # the store's password Secret (fleet limits, budgets)
    store_fingerprint: tuple[Any, ...] | None = None  # set when the route's sidecar uses the store

    @property
    def base_url(self) -> str:
        if self.tls_enabled:
            # "localhost", not the IP: the pod-local certificate is issued for that name.
            return f"https://localhost:{self.tls_port}/vertex_ai"
        return f"http://127.0.0.1:{self.port}/vertex_ai"

    @property
    def config_hash(self) -> str:
        """Hash of what needs new pods to change; stamped as `config-hash` on pod templates.

        Policy (the ConfigMap's content) is deliberately not part of it: the sidecar
        hot-reloads that. `native_setting` is hashed rather than the resolved `native`
        so that a cluster upgrade alone does not restart every selected workload.
        """
        hashed: dict[str, Any] = {
            "route": self.route_name,
            "image": self.image,
            "imagePullPolicy": self.image_pull_policy,
            "ports": [self.port, self.admin_port, self.tls_port if self.tls_enabled else None],
            **({"trust": [self.trust_bundle.config_map_name, self.trust_bundle.key]} if self.trust_bundle else {}),
            "resources": self.resources,
            "native": self.native_setting,
            "credential": {
                "serviceAccountName": self.service_account_name,
                "mode": self.credential_mode,
                "federation": None if self.federation is None else [
                    self.federation.audience, self.federation.config_map_name,
                    self.federation.config_map_key, self.federation.token_expiration_seconds],
                "secret": None if self.secret is None else [self.secret.secret_name, self.secret.key],
            },
            "env": [self.project, self.location],
        }
        if self.tracing is not None:  # only when on: pods without tracing keep their hash
            hashed["tracing"] = self.tracing.restart_key
        if self.interception:  # likewise
            hashed["interception"] = PROXY_PORT
        if self.store_fingerprint is not None:  # only with a store: other pods keep their hash
            hashed["store"] = list(self.store_fingerprint)
        return render.stable_hash(hashed)


def resolve_native(setting: str, server_version: tuple[int, int] | None) -> bool:
    """`auto` means native when the cluster supports it (unknown version: not native)."""
    if setting == "true":
        return True
    if setting == "false":
        return False
    return server_version is not None and server_version >= NATIVE_SIDECAR_MIN_VERSION


def plan_sidecar(route: Route, credential: Credential, *, default_image: str,
                 server_version: tuple[int, int] | None,
                 tracing_defaults: TracingDefaults = TracingDefaults(),
                 store: fleet.StoreSettings | None = None) -> SidecarPlan:
    sidecar = route.sidecar
    uses_store = store is not None and fleet.uses_store(route, store)
    return SidecarPlan(
        route_name=route.name,
        config_map=route.config_map_name,
        image=sidecar.image or default_image,
        image_pull_policy=sidecar.image_pull_policy,
        port=sidecar.port,
        admin_port=sidecar.admin_port,
        tls_enabled=sidecar.tls.enabled,
        tls_port=sidecar.tls.port,
        resources=sidecar.resources,
        native=resolve_native(sidecar.native_sidecar, server_version),
        native_setting=sidecar.native_sidecar,
        service_account_name=credential.service_account_name,
        credential_mode=credential.mode,
        federation=credential.federation,
        secret=credential.secret,
        project=route.defaults.project,
        location=route.defaults.location,
        isolation=credential.isolation,
        tracing=effective_tracing(sidecar.tracing, tracing_defaults),
        # The organisation's roots join the bundle, which interception shares too.
        trust_bundle=sidecar.tls.trust_bundle if sidecar.tls.enabled or sidecar.interception else None,
        interception=sidecar.interception,
        store_secret=fleet.password_secret(route, store),
        store_fingerprint=tuple(store.fingerprint) if store is not None and uses_store else None,
    )


# ------------------------------------------------------------------ pod pieces


def sidecar_container(plan: SidecarPlan) -> dict[str, Any]:
    mounts: list[dict[str, Any]] = [
        {"name": CONFIG_VOLUME, "mountPath": render.CONFIG_DIR, "readOnly": True},
        {"name": TMP_VOLUME, "mountPath": "/tmp"},
    ]
    if plan.federation is not None:
        mounts.append({"name": FEDERATION_VOLUME, "mountPath": render.FEDERATION_DIR, "readOnly": True})
    if plan.secret is not None:
        mounts.append({"name": KEY_VOLUME, "mountPath": render.KEY_DIR, "readOnly": True})
    if plan.shares_ca_bundle:
        mounts.append({"name": TLS_VOLUME, "mountPath": render.TLS_DIR})
        if plan.trust_bundle is not None:
            mounts.append({"name": TRUST_VOLUME, "mountPath": render.TRUST_DIR, "readOnly": True})
    if plan.store_secret is not None:
        mounts.append({"name": STORE_PASSWORD_VOLUME, "mountPath": fleet.STORE_PASSWORD_DIR, "readOnly": True})
    ports = [{"name": ADMIN_PORT_NAME, "containerPort": plan.admin_port, "protocol": "TCP"}]

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": plan.admin_port}, "periodSeconds": period,
                "timeoutSeconds": 2, "failureThreshold": failures}

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": plan.image,
        "command": ["vertex-sidecar", "--config", render.CONFIG_PATH],
        # The admin port listens on the pod IP only (where kubelet probes and Prometheus
        # connect), not on every interface of the pod.
        "env": [{"name": "VERTEX_SIDECAR_ADMIN_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": ports,
        "resources": {k: dict(v) for k, v in plan.resources.items()},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # Startup gates the app containers when native: they start once the sidecar can
        # serve (/readyz: it holds a Google token), never before. Readiness keeps checking
        # that; liveness only checks the process.
        "startupProbe": {**probe("/readyz", 1, STARTUP_SECONDS), "timeoutSeconds": 1},
        "readinessProbe": probe("/readyz", 5, 3),
        "livenessProbe": probe("/healthz", 10, 3),
        "volumeMounts": mounts,
    }
    if plan.image_pull_policy:
        container["imagePullPolicy"] = plan.image_pull_policy
    if plan.native:
        container["restartPolicy"] = "Always"
    else:
        # A regular container (below 1.29): first in the pod, and the kubelet starts the next
        # container only after this postStart returned, i.e. once /readyz answers. On
        # termination it lingers in preStop while the app finishes its last calls.
        ready_url = f"http://127.0.0.1:{plan.admin_port}/readyz"
        container["lifecycle"] = {
            "postStart": {"exec": {"command": ["vertex-sidecar", "--wait-ready", ready_url,
                                               "--wait-timeout", str(STARTUP_SECONDS)]}},
            "preStop": {"exec": {"command": ["vertex-sidecar", "--linger", str(LINGER_SECONDS)]}},
        }
    return container


def sidecar_volumes(plan: SidecarPlan) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        # Not optional: without its config the sidecar would allow everything.
        {"name": CONFIG_VOLUME, "configMap": {"name": plan.config_map}},
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    if plan.federation is not None:
        fed = plan.federation
        volumes.append({"name": FEDERATION_VOLUME, "projected": {
            # World-readable inside the pod: the sidecar runs as a non-root user.
            "defaultMode": 0o444,
            "sources": [
                {"serviceAccountToken": {"audience": fed.audience,
                                         "expirationSeconds": fed.token_expiration_seconds,
                                         "path": render.FEDERATION_TOKEN_FILE}},
                {"configMap": {"name": fed.config_map_name,
                               "items": [{"key": fed.config_map_key,
                                          "path": render.FEDERATION_CONFIG_FILE}]}},
            ],
        }})
    if plan.secret is not None:
        volumes.append({"name": KEY_VOLUME, "secret": {
            "secretName": plan.secret.secret_name,
            "items": [{"key": plan.secret.key, "path": render.KEY_FILE}],
            "defaultMode": 0o444,
        }})
    if plan.shares_ca_bundle:
        volumes.append({"name": TLS_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
        if plan.trust_bundle is not None:
            volumes.append({"name": TRUST_VOLUME, "configMap": {
                "name": plan.trust_bundle.config_map_name,
                "items": [{"key": plan.trust_bundle.key, "path": render.TRUST_FILE}]}})
    if plan.store_secret is not None:
        # Must exist in the pod's namespace: the operator copies no Secrets (README, "Fleet-wide limits").
        volumes.append({"name": STORE_PASSWORD_VOLUME, "secret": {
            "secretName": plan.store_secret.secret_name,
            "items": [{"key": plan.store_secret.key, "path": fleet.STORE_PASSWORD_FILE}],
            "defaultMode": 0o444,
        }})
    return volumes


def app_env(plan: SidecarPlan) -> list[dict[str, str]]:
    env = [
        {"name": "GOOGLE_VERTEX_BASE_URL", "value": plan.base_url},
        {"name": "GOOGLE_GENAI_USE_VERTEXAI", "value": "true"},
        {"name": "GOOGLE_CLOUD_PROJECT", "value": plan.project},
        {"name": "GOOGLE_CLOUD_LOCATION", "value": plan.location},
    ]
    if plan.tls_enabled:
        env += [{"name": name, "value": render.TLS_CA_PATH} for name in CA_BUNDLE_ENV]
        env += [{"name": name, "value": render.TLS_POD_CA_PATH} for name in CA_EXTRA_ENV]
    if plan.interception:
        if not plan.tls_enabled:  # the same CA variables as with the TLS listener
            env += [{"name": name, "value": render.TLS_CA_PATH} for name in CA_BUNDLE_ENV]
            env += [{"name": name, "value": render.TLS_POD_CA_PATH} for name in CA_EXTRA_ENV]
        env += interception.proxy_env(PROXY_PORT)
    return env


def interception_warnings(pod_spec: Mapping[str, Any], plan: SidecarPlan) -> list[str]:
    """App containers whose own proxy or CA settings win over the interception ones."""
    if not plan.interception:
        return []
    containers = list(pod_spec.get("containers") or [])
    if plan.native:
        containers += list(pod_spec.get("initContainers") or [])
    ours = {e["name"]: e["value"] for e in app_env(plan) if e["name"] in interception.ALL_VARS}
    warnings = []
    for container in containers:
        if container.get("name") == CONTAINER_NAME:
            continue
        names = interception.overrides(container, ours)
        if names:
            warnings.append(interception.warning(str(container.get("name")), names))
    return warnings


# ------------------------------------------------------------------ decisions


@dataclass
class Injection:
    """The outcome for one pod: a patch, or why there is none."""

    patch: JsonPatch = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reason: str = ""  # why nothing was injected ("" when injected)
    service_account: str | None = None  # the account the patch switches the pod to, if it does

    @property
    def injected(self) -> bool:
        return bool(self.patch)


def has_sidecar(pod_spec: Mapping[str, Any]) -> bool:
    containers = list(pod_spec.get("containers") or []) + list(pod_spec.get("initContainers") or [])
    return any(c.get("name") == CONTAINER_NAME for c in containers)


def opted_out(annotations: Mapping[str, str] | None) -> bool:
    return str((annotations or {}).get(INJECT_ANNOTATION, "")).lower() in ("false", "no", "0", "off")


def blockers(pod_spec: Mapping[str, Any], plan: SidecarPlan) -> list[str]:
    """Why this pod spec cannot get the sidecar; also checked on workload templates."""
    problems: list[str] = []
    if pod_spec.get("hostNetwork"):
        problems.append(
            "it uses hostNetwork: Workload Identity does not work there and the sidecar's "
            "127.0.0.1 ports would be shared by the whole node; run it without hostNetwork "
            f"or set the annotation {INJECT_ANNOTATION}: \"false\"")
    own_sa = pod_spec.get("serviceAccountName") or pod_spec.get("serviceAccount") or ""
    if plan.credential_mode != "secretRef" and own_sa not in ("", "default", plan.service_account_name):
        problems.append(
            f"it runs as service account {own_sa!r} but the route's credential uses "
            f"{plan.service_account_name!r}; remove serviceAccountName from the pod spec "
            "(the sidecar sets it) or point the VertexCredential at that service account")
    taken = {v.get("name") for v in pod_spec.get("volumes") or []}
    ours = {v["name"] for v in sidecar_volumes(plan)}
    if clash := sorted(taken & ours):
        problems.append(f"it already has volume(s) named {', '.join(clash)}, which the sidecar needs")
    if plan.isolation == isolation.SIDECAR_ONLY and plan.federation is not None:
        problems += isolation.pod_problems(pod_spec, plan.federation.audience)
    return problems


def _pointer(*parts: str | int) -> str:
    """An RFC 6901 JSON pointer; '/' and '~' in keys (annotation names) are escaped."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _append(patch: JsonPatch, path: tuple[str | int, ...], existing: Any, items: Sequence[Any]) -> None:
    """Append to a list that may not exist yet."""
    if not items:
        return
    if existing is None:
        patch.append({"op": "add", "path": _pointer(*path), "value": list(items)})
    else:
        for item in items:
            patch.append({"op": "add", "path": _pointer(*path, "-"), "value": item})


def _app_container_ops(patch: JsonPatch, path: tuple[str | int, ...], container: Mapping[str, Any],
                       plan: SidecarPlan) -> None:
    env = container.get("env")
    present = {e.get("name") for e in env or []}
    # The container's own values win: a developer can point one container elsewhere.
    if plan.interception:  # ...but its NO_PROXY is extended with localhost and the cluster's domains
        patch += interception.no_proxy_ops(env, _pointer(*path, "env"))
    _append(patch, (*path, "env"), env, [e for e in app_env(plan) if e["name"] not in present])
    if plan.shares_ca_bundle:
        mounts = container.get("volumeMounts")
        if not any(m.get("name") == TLS_VOLUME for m in mounts or []):
            _append(patch, (*path, "volumeMounts"), mounts,
                    [{"name": TLS_VOLUME, "mountPath": render.TLS_DIR, "readOnly": True}])


def pull_secret_ops(spec: Mapping[str, Any], account_secrets: Sequence[str]) -> JsonPatch:
    """Add the new service account's imagePullSecrets to the pod's.

    The API server's ServiceAccount admission plugin ran before this webhook and copied the
    *old* account's pull secrets (usually `default`'s) into a pod that named none; after the
    switch the pod must still pull what the new account can. The pod keeps what it has (its
    own, or the old account's) and gains the new account's, each name once.
    """
    existing = spec.get("imagePullSecrets")
    have = {s.get("name") for s in existing or []}
    adding = [{"name": n} for n in dict.fromkeys(account_secrets) if n not in have]
    patch: JsonPatch = []
    _append(patch, ("spec", "imagePullSecrets"), existing, adding)
    return patch


def inject(pod: Mapping[str, Any], plan: SidecarPlan, pull_secrets: Sequence[str] = (), *,
           team: str | None = None) -> Injection:
    """The JSON patch that adds the sidecar of `plan` to `pod` (a Pod as admitted).

    `pull_secrets`: the imagePullSecrets of `plan.service_account_name`, copied into the pod
    when the patch switches it to that account (the caller reads the account). `team`: the
    showback team of the pod's namespace."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotations = meta.get("annotations")
    if opted_out(annotations):
        return Injection(reason=f"opted out with the annotation {INJECT_ANNOTATION}")
    if has_sidecar(spec):
        if plan.isolation == isolation.SIDECAR_ONLY:
            # Reinvoked after another webhook: the sidecar's token stays the sidecar's.
            strip = isolation.foreign_mounts(spec, FEDERATION_VOLUME, CONTAINER_NAME)
            if strip:
                return Injection(patch=[{"op": "remove", "path": p} for p in strip], warnings=[
                    f"removed {len(strip)} mount(s) of the sidecar's token volume from other containers "
                    "(isolation sidecarOnly)"])
        return Injection(reason="the pod already has the sidecar")
    if problems := blockers(spec, plan):
        route = f"VertexRoute {plan.route_name!r}"
        return Injection(reason="; ".join(problems),
                         warnings=[f"{route} selects this pod but did not inject its sidecar: {p}"
                                   for p in problems])

    patch: JsonPatch = []
    if annotations is None:
        patch.append({"op": "add", "path": "/metadata/annotations",
                      "value": {ROUTE_ANNOTATION: plan.route_name}})
    else:
        patch.append({"op": "add", "path": _pointer("metadata", "annotations", ROUTE_ANNOTATION),
                      "value": plan.route_name})
    own_sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    # A key file does not depend on the pod's identity: a pod's own account is kept then.
    keep_own = plan.credential_mode == "secretRef" and own_sa != "default"
    switched = None
    if own_sa != plan.service_account_name and not keep_own:
        switched = plan.service_account_name
        patch.append({"op": "add", "path": "/spec/serviceAccountName", "value": plan.service_account_name})
        if "serviceAccount" in spec:  # the deprecated alias must agree or the API refuses the pod
            patch.append({"op": "replace", "path": "/spec/serviceAccount", "value": plan.service_account_name})
        patch += pull_secret_ops(spec, pull_secrets)
    _append(patch, ("spec", "volumes"), spec.get("volumes"), sidecar_volumes(plan))

    # Env and mounts first, while the container indexes are still the original ones.
    for i, container in enumerate(spec.get("containers") or []):
        _app_container_ops(patch, ("spec", "containers", i), container, plan)
    init_containers = spec.get("initContainers")
    if plan.native:
        # Init containers after a native sidecar run with it, so they get the env too.
        for i, container in enumerate(init_containers or []):
            _app_container_ops(patch, ("spec", "initContainers", i), container, plan)

    sidecar = sidecar_container(plan)
    sidecar["env"] = sidecar.get("env", []) + showback.sidecar_env(pod, team)  # who spends (metrics, access log)
    if plan.tracing is not None:  # the pod's k8s.* resource attributes (after showback: its namespace env is reused)
        sidecar["env"] = [*sidecar["env"], *tracing_env(pod, CONTAINER_NAME, sidecar["env"])]
    if plan.native:
        # First, so that it is up before the other init containers and the app start.
        if init_containers is None:
            patch.append({"op": "add", "path": "/spec/initContainers", "value": [sidecar]})
        else:
            patch.append({"op": "add", "path": "/spec/initContainers/0", "value": sidecar})
    else:
        # First, so that the app containers start after it (see sidecar_container); the
        # default-container annotation keeps `kubectl logs`/`exec` on the app.
        containers = spec.get("containers") or []
        if containers and DEFAULT_CONTAINER_ANNOTATION not in (annotations or {}):
            patch.append({"op": "add", "path": _pointer("metadata", "annotations", DEFAULT_CONTAINER_ANNOTATION),
                          "value": containers[0].get("name", "")})
        patch.append({"op": "add", "path": "/spec/containers/0", "value": sidecar})
    return Injection(patch=patch, service_account=switched, warnings=[
        f"VertexRoute {plan.route_name!r}: {w}" for w in interception_warnings(spec, plan)])
