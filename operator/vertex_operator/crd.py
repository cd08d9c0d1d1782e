"""The custom resources: API names, and their specs parsed into dataclasses; pure.

The CRD schemas in ``crds/`` already refuse most bad specs at the API server. Parsing
here is still defensive (an older CRD, a schema gap, a test server that validates
nothing) and raises `SpecError` naming the field, e.g. ``spec.defaults.location: ...``.
Defaults that the schema cannot express (they depend on other fields or on the
operator's own flags) are applied here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping

from vertex_operator.identity import provider_name
from vertex_operator.isolation import COOPERATIVE, SIDECAR_ONLY, SidecarPool
from vertex_operator.selection import LabelSelector, SelectorError, parse_selector

GROUP = "vertex.passthrough.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
ROUTE_KIND = "VertexRoute"
ROUTE_PLURAL = "vertexroutes"
CREDENTIAL_KIND = "VertexCredential"
CREDENTIAL_PLURAL = "vertexcredentials"
CREDENTIAL_LABEL = f"{GROUP}/credential"

PREFIX = GROUP  # labels/annotations prefix
CONFIG_HASH_ANNOTATION = f"{PREFIX}/config-hash"
ROUTE_ANNOTATION = f"{PREFIX}/route"
INJECT_ANNOTATION = f"{PREFIX}/inject"  # "false" opts a pod out of injection
FINALIZER = f"{PREFIX}/finalizer"
ROUTE_LABEL = f"{PREFIX}/route"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "vertex-operator"
REMOVED_HASH = "none"  # config-hash value of a workload rolled back to no sidecar

PROJECT_RE = re.compile(r"^(?:[a-z][a-z0-9-]{4,28}[a-z0-9]|[0-9]{1,20})$")
PROJECT_ID_RE = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
LOCATION_RE = re.compile(r"^(?:global|us|eu|[a-z]+(?:-[a-z]+)+[0-9]+)$")
DNS_LABEL_RE = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?$")

DEFAULT_PORT = 4000
DEFAULT_ADMIN_PORT = 9464
DEFAULT_TLS_PORT = 4443
PROXY_PORT = 4080  # the forward proxy of `spec.sidecar.interception` (zero-code-change mode)
# From the bench: ~41 MB idle, ~43 MB at 64 concurrent, ~63 MB with 1,000 open streams;
# no CPU while idle. No CPU limit: throttling would add latency to every call.
DEFAULT_RESOURCES: Mapping[str, Mapping[str, str]] = {
    "requests": {"cpu": "50m", "memory": "64Mi"},
    "limits": {"memory": "256Mi"},
}

NativeSidecar = Literal["auto", "true", "false"]
RolloutStrategy = Literal["Workload", "None"]
CredentialMode = Literal["workloadIdentity", "federation", "secretRef"]
SidecarCredentialType = Literal["adc", "external_account_file", "service_account_file"]


class SpecError(ValueError):
    """A custom resource's spec is invalid; the message names the field."""


# ------------------------------------------------------------------------ reading


class _Fields:
    """Typed, path-aware reads from one mapping of a resource body."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise SpecError(f"{path}: expected an object, got {type(data).__name__}")
        self.data = data
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def sub(self, key: str) -> "_Fields":
        return _Fields(self.data.get(key), self.at(key))

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def string(self, key: str, default: str | None = None, *, pattern: re.Pattern[str] | None = None,
               hint: str = "", required: bool = False) -> str | None:
        value = self.data.get(key)
        if value is None or value == "":
            if required:
                raise SpecError(f"{self.at(key)}: required{hint}")
            return default
        if not isinstance(value, str):
            raise SpecError(f"{self.at(key)}: expected a string, got {value!r}")
        if pattern is not None and not pattern.match(value):
            raise SpecError(f"{self.at(key)}: {value!r} is not valid{hint}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(key, default)
        assert value is not None
        if value not in choices:
            raise SpecError(f"{self.at(key)}: {value!r} is not one of {', '.join(choices)}")
        return value

    def integer(self, key: str, default: int | None = None, *, low: int = 1,
                high: int = 2**53) -> int | None:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise SpecError(f"{self.at(key)}: expected an integer between {low} and {high}, got {value!r}")
        return value

    def number(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SpecError(f"{self.at(key)}: expected a positive number of seconds, got {value!r}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise SpecError(f"{self.at(key)}: expected true or false, got {value!r}")
        return value

    def strings(self, key: str, *, pattern: re.Pattern[str] | None = None,
                hint: str = "") -> tuple[str, ...] | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise SpecError(f"{self.at(key)}: expected a list of non-empty strings")
        if not value:
            raise SpecError(f"{self.at(key)}: must not be empty (omit it to use the default)")
        for item in value:
            if pattern is not None and not pattern.match(item):
                raise SpecError(f"{self.at(key)}: {item!r} is not valid{hint}")
        return tuple(value)

    def string_map(self, key: str) -> dict[str, str] | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in value.items()
        ):
            raise SpecError(f"{self.at(key)}: expected a mapping of strings to strings")
        return dict(value)


_LOCATION_HINT = " (a location such as us-central1, europe-west4, global, us or eu)"
_PROJECT_HINT = " (a Google Cloud project id such as my-project, or a project number)"


# -------------------------------------------------------------------------- route


LimitScope = Literal["pod", "fleet"]
StoreErrorPolicy = Literal["allow", "deny"]
BudgetAction = Literal["deny", "warn"]  # the sidecar's `budget.action` values


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_body_bytes: int | None = None
    scope: LimitScope | None = None  # None: inherit; the sidecar's default is "pod"
    on_store_error: StoreErrorPolicy | None = None  # None: inherit; the sidecar's default is "allow"

    def over(self, base: "Limits") -> "Limits":
        return Limits(
            self.requests_per_minute or base.requests_per_minute,
            self.tokens_per_minute or base.tokens_per_minute,
            self.max_body_bytes or base.max_body_bytes,
            self.scope or base.scope,
            self.on_store_error or base.on_store_error,
        )


@dataclass(frozen=True)
class Budget:
    """Spend in USD per UTC day and/or month, counted fleet-wide with a store (else per pod)."""

    usd_per_day: float | None = None
    usd_per_month: float | None = None
    action: BudgetAction = "deny"


@dataclass(frozen=True)
class Timeouts:
    connect_seconds: float | None = None
    first_byte_seconds: float | None = None
    total_seconds: float | None = None

    def over(self, base: "Timeouts") -> "Timeouts":
        return Timeouts(
            self.connect_seconds or base.connect_seconds,
            self.first_byte_seconds or base.first_byte_seconds,
            self.total_seconds or base.total_seconds,
        )


@dataclass(frozen=True)
class Rule:
    """One policy rule; unset fields (None) inherit the route-level value."""

    name: str
    projects: tuple[str, ...] | None = None
    locations: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    location: str | None = None  # default location for requests this rule serves
    aliases: Mapping[str, str] | None = None
    fallback_locations: tuple[str, ...] | None = None
    quota_project: str | None = None
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    budget: Budget | None = None  # never inherited: each rule's budget is counted on its own

    def over(self, base: "Rule") -> "Rule":
        return Rule(
            name=self.name,
            projects=self.projects if self.projects is not None else base.projects,
            locations=self.locations if self.locations is not None else base.locations,
            models=self.models if self.models is not None else base.models,
            location=self.location or base.location,
            aliases=self.aliases if self.aliases is not None else base.aliases,
            fallback_locations=(self.fallback_locations if self.fallback_locations is not None
                                else base.fallback_locations),
            quota_project=self.quota_project or base.quota_project,
            limits=self.limits.over(base.limits),
            timeouts=self.timeouts.over(base.timeouts),
            budget=self.budget,
        )


@dataclass(frozen=True)
class Defaults:
    project: str
    location: str
    api_version: str = "v1"


@dataclass(frozen=True)
class TrustBundle:
    """A ConfigMap key with the organisation's root CAs (PEM), added to the apps' CA bundle."""

    config_map_name: str
    key: str = "ca.crt"


@dataclass(frozen=True)
class Tls:
    enabled: bool = False
    port: int = DEFAULT_TLS_PORT
    trust_bundle: TrustBundle | None = None


@dataclass(frozen=True)
class Tracing:
    """`spec.sidecar.tracing`; None fields take the operator's defaults (chart sidecar.tracing.*)."""

    enabled: bool | None = None
    endpoint: str | None = None
    sample_ratio: float | None = None
    baggage_keys: tuple[str, ...] = ()


_TRACING_ENDPOINT = re.compile(r"^https?://[^/\s]+")
_BAGGAGE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _tracing(f: _Fields) -> Tracing:
    enabled = f.data.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise SpecError(f"{f.at('enabled')}: expected true or false, got {enabled!r}")
    ratio = f.data.get("sampleRatio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1):
        raise SpecError(f"{f.at('sampleRatio')}: expected a number from 0 to 1, got {ratio!r}")
    return Tracing(
        enabled=enabled,
        endpoint=f.string("endpoint", pattern=_TRACING_ENDPOINT, hint=" (an http(s) URL of an OTLP/HTTP collector)"),
        sample_ratio=None if ratio is None else float(ratio),
        baggage_keys=f.strings("baggageKeys", pattern=_BAGGAGE_KEY, hint=" (a baggage key)") or (),
    )


@dataclass(frozen=True)
class SidecarSettings:
    image: str | None = None  # None: the operator's --sidecar-image
    image_pull_policy: str | None = None
    port: int = DEFAULT_PORT
    admin_port: int = DEFAULT_ADMIN_PORT
    tls: Tls = field(default_factory=Tls)
    resources: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: DEFAULT_RESOURCES)
    native_sidecar: NativeSidecar = "auto"
    rollout_strategy: RolloutStrategy = "Workload"
    tracing: Tracing = field(default_factory=Tracing)
    interception: bool = False  # the HTTPS forward proxy; apps get HTTPS_PROXY and the CA bundle
    proxy_other_hosts: str = "tunnel"  # with interception: other HTTPS hosts tunnelled, or "deny" (403)


@dataclass(frozen=True)
class Route:
    namespace: str
    name: str
    uid: str
    generation: int
    created: str  # metadata.creationTimestamp, RFC 3339 (sorts chronologically)
    deleting: bool
    selector: LabelSelector
    credential_name: str
    defaults: Defaults
    base: Rule  # the route-level policy; also the only rule when spec.rules is empty
    rules: tuple[Rule, ...]
    sidecar: SidecarSettings
    upstreams: Mapping[str, str] = field(default_factory=dict)
    # spec.rollout.repair: restart the owners of running pods that lack the (current) sidecar.
    repair: bool = False

    @property
    def config_map_name(self) -> str:
        return config_map_name(self.name)

    def effective_rules(self) -> tuple[Rule, ...]:
        """The rules in order with route-level values filled in (first match wins)."""
        base = replace(
            self.base,
            projects=self.base.projects or (self.defaults.project,),
            locations=self.base.locations or ("*",),
            models=self.base.models or ("*",),
        )
        if not self.rules:
            return (base,)
        return tuple(rule.over(base) for rule in self.rules)


def config_map_name(route_name: str) -> str:
    return f"vertex-sidecar-{route_name}"


UPSTREAM_KEYS = {
    "aiplatform": "aiplatform",
    "aiplatformGlobal": "aiplatform_global",
    "aiplatformMultiregion": "aiplatform_multiregion",
    "discovery": "discovery",
    "discoveryMultiregion": "discovery_multiregion",
}
_URL_RE = re.compile(r"^https?://[^/\s]+")
_GLOB_RE = re.compile(r"^[A-Za-z0-9*?\[\]._@/:-]+$")
_RULE_NAME_RE = DNS_LABEL_RE


def _limits(f: _Fields) -> Limits:
    return Limits(
        requests_per_minute=f.integer("requestsPerMinute", high=10_000_000),
        tokens_per_minute=f.integer("tokensPerMinute", high=10_000_000_000),
        max_body_bytes=f.integer("maxBodyBytes", high=1 << 30),
        scope=_optional_choice(f, "scope", ("pod", "fleet")),  # type: ignore[arg-type]
        on_store_error=_optional_choice(f, "onStoreError", ("allow", "deny")),  # type: ignore[arg-type]
    )


def _optional_choice(f: _Fields, key: str, choices: tuple[str, ...]) -> str | None:
    """One of `choices`, or None when unset (a rule then inherits the route's)."""
    return f.choice(key, choices, choices[0]) if f.has(key) else None


MAX_BUDGET_USD = 1e9


def _budget(f: _Fields) -> Budget | None:
    if not f.data:
        return None

    def usd(key: str) -> float | None:
        value = f.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_BUDGET_USD:
            raise SpecError(f"{f.at(key)}: expected an amount in USD above 0 (at most {MAX_BUDGET_USD:.0f}), "
                            f"got {value!r}")
        return float(value)

    budget = Budget(usd_per_day=usd("usdPerDay"), usd_per_month=usd("usdPerMonth"),
                    action=f.choice("action", ("deny", "warn"), "deny"))  # type: ignore[arg-type]
    if budget.usd_per_day is None and budget.usd_per_month is None:
        raise SpecError(f"{f.path}: set usdPerDay and/or usdPerMonth")
    return budget


def _timeouts(f: _Fields) -> Timeouts:
    return Timeouts(
        connect_seconds=f.number("connectSeconds"),
        first_byte_seconds=f.number("firstByteSeconds"),
        total_seconds=f.number("totalSeconds"),
    )


def _rule(f: _Fields, name: str) -> Rule:
    match = f.sub("match")
    return Rule(
        name=name,
        projects=match.strings("projects", pattern=_GLOB_RE, hint=" (a project id or glob)"),
        locations=match.strings("locations", pattern=_GLOB_RE, hint=" (a location or glob)"),
        models=match.strings("models", pattern=_GLOB_RE, hint=" (a model name or glob)"),
        location=f.string("location", pattern=LOCATION_RE, hint=_LOCATION_HINT),
        aliases=f.string_map("aliases"),
        fallback_locations=f.strings("fallbackLocations", pattern=LOCATION_RE, hint=_LOCATION_HINT),
        quota_project=f.string("quotaProject", pattern=PROJECT_RE, hint=_PROJECT_HINT),
        limits=_limits(f.sub("limits")),
        timeouts=_timeouts(f.sub("timeouts")),
        budget=_budget(f.sub("budget")),
    )


def _resources(f: _Fields) -> Mapping[str, Mapping[str, str]]:
    if not f.data:
        return DEFAULT_RESOURCES
    result: dict[str, dict[str, str]] = {}
    for section in ("requests", "limits"):
        values = f.sub(section).data
        if values:
            result[section] = {str(k): str(v) for k, v in values.items()}
    return result


def _trust_bundle(f: _Fields) -> TrustBundle | None:
    if not f.data:
        return None
    return TrustBundle(
        config_map_name=f.string("configMapName", required=True, pattern=DNS_SUBDOMAIN_RE) or "",
        key=f.string("key", "ca.crt", pattern=re.compile(r"^[-._a-zA-Z0-9]+$")) or "ca.crt",
    )


def _sidecar(f: _Fields) -> SidecarSettings:
    tls = f.sub("tls")
    settings = SidecarSettings(
        image=f.string("image"),
        image_pull_policy=f.string("imagePullPolicy"),
        port=f.integer("port", DEFAULT_PORT, low=1024, high=65535) or DEFAULT_PORT,
        admin_port=f.integer("adminPort", DEFAULT_ADMIN_PORT, low=1024, high=65535) or DEFAULT_ADMIN_PORT,
        tls=Tls(
            enabled=tls.boolean("enabled", False),
            port=tls.integer("port", DEFAULT_TLS_PORT, low=1024, high=65535) or DEFAULT_TLS_PORT,
            trust_bundle=_trust_bundle(tls.sub("trustBundle")),
        ),
        resources=_resources(f.sub("resources")),
        native_sidecar=f.choice("nativeSidecar", ("auto", "true", "false"), "auto"),  # type: ignore[arg-type]
        rollout_strategy=f.choice("rolloutStrategy", ("Workload", "None"), "Workload"),  # type: ignore[arg-type]
        tracing=_tracing(f.sub("tracing")),
        interception=f.boolean("interception", False),
        proxy_other_hosts=f.choice("proxyOtherHosts", ("tunnel", "deny"), "tunnel"),
    )
    if settings.image_pull_policy not in (None, "Always", "IfNotPresent", "Never"):
        raise SpecError(f"{f.at('imagePullPolicy')}: must be Always, IfNotPresent or Never")
    ports = [settings.port, settings.admin_port] + ([settings.tls.port] if settings.tls.enabled else [])
    ports += [PROXY_PORT] if settings.interception else []
    if len(set(ports)) != len(ports):
        raise SpecError(f"{f.path}: port, adminPort and tls.port must all differ"
                        f"{f' (and from {PROXY_PORT}, the interception proxy)' if settings.interception else ''} "
                        f"(got {ports})")
    return settings


def _meta(body: Mapping[str, Any]) -> tuple[str, str, str, int, str, bool]:
    meta = body.get("metadata") or {}
    return (
        meta.get("namespace") or "",
        meta.get("name") or "",
        meta.get("uid") or "",
        int(meta.get("generation") or 0),
        meta.get("creationTimestamp") or "",
        bool(meta.get("deletionTimestamp")),
    )


def parse_route(body: Mapping[str, Any]) -> Route:
    """Parse a VertexRoute object (as the API returns it); raises `SpecError`."""
    namespace, name, uid, generation, created, deleting = _meta(body)
    spec = _Fields(body.get("spec"), "spec")
    try:
        selector = parse_selector(spec.data.get("workloadSelector"), "spec.workloadSelector")
    except SelectorError as exc:
        raise SpecError(str(exc)) from None
    if not spec.has("workloadSelector") or selector.empty:
        raise SpecError("spec.workloadSelector: required, with matchLabels or matchExpressions "
                        "(an empty selector would select every pod in the namespace)")
    credential = spec.sub("credentialRef").string(
        "name", required=True, pattern=DNS_SUBDOMAIN_RE, hint=" (the name of a VertexCredential in this namespace)")
    assert credential is not None
    d = spec.sub("defaults")
    defaults = Defaults(
        project=d.string("project", required=True, pattern=PROJECT_RE, hint=_PROJECT_HINT) or "",
        location=d.string("location", required=True, pattern=LOCATION_RE, hint=_LOCATION_HINT) or "",
        api_version=d.choice("apiVersion", ("v1", "v1beta1"), "v1"),
    )
    rules_raw = spec.data.get("rules") or []
    if not isinstance(rules_raw, list):
        raise SpecError("spec.rules: expected a list of rules")
    rules: list[Rule] = []
    for i, item in enumerate(rules_raw):
        rf = _Fields(item, f"spec.rules[{i}]")
        rule_name = rf.string("name", required=True, pattern=_RULE_NAME_RE,
                              hint=" (lowercase letters, digits and '-', at most 63)")
        assert rule_name is not None
        rules.append(_rule(rf, rule_name))
    names = [r.name for r in rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"spec.rules: duplicate rule name(s) {', '.join(duplicates)}")
    if rules and spec.has("budget"):
        raise SpecError("spec.budget: a route with rules sets its budgets per rule (spec.rules[].budget); "
                        "a route-level budget would be counted once per rule")
    upstreams_f = spec.sub("upstreams")
    upstreams: dict[str, str] = {}
    for key in UPSTREAM_KEYS:
        url = upstreams_f.string(key, pattern=_URL_RE, hint=" (an http(s) URL)")
        if url:
            upstreams[key] = url
    unknown = sorted(set(upstreams_f.data) - set(UPSTREAM_KEYS))
    if unknown:
        raise SpecError(f"spec.upstreams: unknown key(s) {', '.join(unknown)}")
    return Route(
        namespace=namespace,
        name=name,
        uid=uid,
        generation=generation,
        created=created,
        deleting=deleting,
        selector=selector,
        credential_name=credential,
        defaults=defaults,
        base=_rule(spec, name),
        rules=tuple(rules),
        sidecar=_sidecar(spec.sub("sidecar")),
        upstreams=upstreams,
        repair=spec.sub("rollout").boolean("repair", False),
    )


# --------------------------------------------------------------------- credential


@dataclass(frozen=True)
class WorkloadIdentity:
    project_id: str
    project_number: str | None = None
    gcp_service_account: str | None = None


@dataclass(frozen=True)
class Federation:
    audience: str
    config_map_name: str
    config_map_key: str = "credential-configuration.json"
    token_expiration_seconds: int = 3600
    rendered: bool = False  # no credentialConfig in the spec: the operator writes the ConfigMap


def federation_config_map_name(credential_name: str) -> str:
    """The ConfigMap the operator renders for a federation credential without credentialConfig."""
    return f"vertex-federation-{credential_name}"


@dataclass(frozen=True)
class SecretKey:
    secret_name: str
    key: str = "key.json"


@dataclass(frozen=True)
class Credential:
    """What a route needs of a VertexCredential: identity, how to mount it, readiness."""

    namespace: str
    name: str
    generation: int
    service_account_name: str
    mode: CredentialMode
    workload_identity: WorkloadIdentity | None = None
    federation: Federation | None = None
    secret: SecretKey | None = None
    binding_backend: str = "manual"
    binding_roles: tuple[str, ...] | None = None  # None: not set in the spec
    binding_projects: tuple[str, ...] | None = None
    uid: str = ""
    deleting: bool = False
    ready: bool = False
    ready_reason: str = ""
    ready_message: str = ""
    isolation: str = COOPERATIVE  # or SIDECAR_ONLY (see `isolation`)
    sidecar_pool: SidecarPool | None = None  # sidecarOnly: the dedicated pool/provider

    @property
    def sidecar_type(self) -> SidecarCredentialType:
        """The sidecar credential type this mode maps to."""
        if self.mode == "federation" or self.isolation == SIDECAR_ONLY:
            return "external_account_file"
        if self.mode == "secretRef":
            return "service_account_file"
        return "adc"  # Workload Identity: the GKE metadata server serves the token


_GSA_RE = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]@[a-z0-9.-]+\.gserviceaccount\.com$")
_CM_KEY_RE = re.compile(r"^[-._a-zA-Z0-9]+$")
_ROLE_RE = re.compile(r"^(?:roles/[A-Za-z0-9_.]+|projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/roles/[A-Za-z0-9_.]+"
                      r"|organizations/[0-9]+/roles/[A-Za-z0-9_.]+)$")


def _readiness(body: Mapping[str, Any], generation: int) -> tuple[bool, str, str]:
    status = body.get("status") or {}
    conditions = status.get("conditions") or []
    ready = next((c for c in conditions if isinstance(c, Mapping) and c.get("type") == "Ready"), None)
    if ready is None:
        return False, "NoStatusYet", "has no status yet (its controller has not processed it)"
    observed = ready.get("observedGeneration") or status.get("observedGeneration")
    if observed is not None and generation and int(observed) < generation:
        return False, "StatusOutdated", "was changed and is not reconciled yet"
    if ready.get("status") == "True":
        return True, ready.get("reason") or "Ready", ready.get("message") or ""
    reason = ready.get("reason") or "NotReady"
    message = ready.get("message") or "is not Ready"
    return False, reason, f"is not Ready ({reason}): {message}"


def parse_credential(body: Mapping[str, Any]) -> Credential:
    """Parse a VertexCredential object; raises `SpecError`."""
    namespace, name, uid, generation, _created, deleting = _meta(body)
    spec = _Fields(body.get("spec"), "spec")
    modes = [m for m in ("workloadIdentity", "federation", "secretRef") if spec.has(m)]
    if len(modes) != 1:
        raise SpecError("spec: set exactly one of workloadIdentity, federation, secretRef "
                        f"(found {', '.join(modes) or 'none'})")
    mode: CredentialMode = modes[0]  # type: ignore[assignment]
    ksa = spec.string("serviceAccountName", name, pattern=DNS_SUBDOMAIN_RE,
                      hint=" (a Kubernetes service account name)")
    assert ksa is not None
    wi = fed = secret = None
    if mode == "workloadIdentity":
        f = spec.sub("workloadIdentity")
        wi = WorkloadIdentity(
            project_id=f.string("projectId", required=True, pattern=PROJECT_RE, hint=_PROJECT_HINT) or "",
            project_number=f.string("projectNumber", pattern=re.compile(r"^[0-9]{1,20}$"),
                                    hint=" (digits only)"),
            gcp_service_account=f.string("gcpServiceAccount", pattern=_GSA_RE,
                                         hint=" (a Google service account email)"),
        )
    elif mode == "federation":
        f = spec.sub("federation")
        audience = f.string("audience", required=True) or ""
        rendered = not f.has("credentialConfig")
        if rendered and provider_name(audience) is None:
            raise SpecError("spec.federation.audience: without credentialConfig it must name the pool "
                            "provider (https://iam.googleapis.com/projects/NUMBER/locations/global/"
                            "workloadIdentityPools/POOL/providers/PROVIDER), from which the operator "
                            "renders the credential configuration")
        cc = f.sub("credentialConfig")
        fed = Federation(
            audience=audience,
            config_map_name=(federation_config_map_name(name) if rendered else
                             cc.string("configMapName", required=True, pattern=DNS_SUBDOMAIN_RE) or ""),
            config_map_key=("credential-configuration.json" if rendered else
                            cc.string("key", "credential-configuration.json", pattern=_CM_KEY_RE) or ""),
            token_expiration_seconds=f.integer("tokenExpirationSeconds", 3600, low=600, high=86400) or 3600,
            rendered=rendered,
        )
    else:
        f = spec.sub("secretRef")
        secret = SecretKey(
            secret_name=f.string("name", required=True, pattern=DNS_SUBDOMAIN_RE) or "",
            key=f.string("key", "key.json", pattern=_CM_KEY_RE) or "key.json",
        )
    binding = spec.sub("binding")
    backend = binding.choice("backend", ("iamApi", "configConnector", "manual"), "manual")
    roles = binding.strings("roles", pattern=_ROLE_RE, hint=" (a role such as roles/aiplatform.user)")
    projects = binding.strings("projects", pattern=PROJECT_ID_RE, hint=" (a Google Cloud project id)")
    if mode == "secretRef" and binding.data:
        raise SpecError("spec.binding: does not apply to secretRef (the key's Google service account "
                        "already holds its roles)")
    if (wi is not None and not wi.gcp_service_account and not wi.project_number and backend != "iamApi"
            and spec.data.get("isolation") != SIDECAR_ONLY):  # sidecarOnly binds the pool's principal
        raise SpecError("spec.workloadIdentity.projectNumber: direct Workload Identity needs it (it is part "
                        "of the principal:// member); or set gcpServiceAccount, or binding.backend iamApi "
                        "(the operator looks the number up)")
    isolation = spec.choice("isolation", (COOPERATIVE, SIDECAR_ONLY), COOPERATIVE)
    pool = None
    if isolation == SIDECAR_ONLY:
        pool, fed = _sidecar_only(spec, mode, name, wi, fed)
    elif spec.has("sidecarPool"):
        raise SpecError("spec.sidecarPool: only used with spec.isolation: sidecarOnly")
    ready, reason, message = _readiness(body, generation)
    return Credential(
        isolation=isolation, sidecar_pool=pool,
        namespace=namespace, name=name, generation=generation, service_account_name=ksa, mode=mode,
        workload_identity=wi, federation=fed, secret=secret, binding_backend=backend,
        binding_roles=roles, binding_projects=projects, uid=uid, deleting=deleting,
        ready=ready, ready_reason=reason, ready_message=message,
    )


_POOL_ID_RE = re.compile(r"^[a-z0-9][-a-z0-9]{2,30}[a-z0-9]$")


def _sidecar_only(spec: _Fields, mode: str, name: str, wi: WorkloadIdentity | None,
                  fed: Federation | None) -> tuple[SidecarPool, Federation]:
    """The dedicated pool of sidecarOnly, and the federation volume the sidecar mounts for it."""
    if mode == "secretRef":
        raise SpecError("spec.isolation: sidecarOnly needs workloadIdentity or federation (a key file is "
                        "no identity the operator can keep away from other containers)")
    f = spec.sub("sidecarPool")
    if fed is not None and not f.has("poolId"):
        # federation already names a dedicated provider: its pool is the sidecar's.
        found = _PROVIDER_POOL_RE.match(fed.audience)
        if found is None:
            raise SpecError("spec.federation.audience: sidecarOnly needs it to name the pool provider "
                            "(https://iam.googleapis.com/projects/NUMBER/locations/global/workloadIdentityPools/"
                            "POOL/providers/PROVIDER), or set spec.sidecarPool")
        pool = SidecarPool(found["number"], found["pool"], found["provider"], issuer=f.string("issuer"),
                           token_expiration_seconds=fed.token_expiration_seconds)
        return pool, fed
    number = f.string("projectNumber", pattern=re.compile(r"^[0-9]{1,20}$"), hint=" (digits only)") or (
        wi.project_number if wi is not None else None)
    if not number:
        raise SpecError("spec.sidecarPool.projectNumber: required (the number of the project that holds the pool; "
                        "or set spec.workloadIdentity.projectNumber)")
    pool = SidecarPool(
        project_number=number,
        pool_id=f.string("poolId", required=True, pattern=_POOL_ID_RE, hint=" (4-32 of a-z, 0-9, -)") or "",
        provider_id=f.string("providerId", required=True, pattern=_POOL_ID_RE, hint=" (4-32 of a-z, 0-9, -)") or "",
        issuer=f.string("issuer", pattern=re.compile(r"^https://\S+$"), hint=" (an https:// issuer URL)"),
        token_expiration_seconds=f.integer("tokenExpirationSeconds", 3600, low=600, high=86400) or 3600,
    )
    if fed is not None and provider_name(fed.audience) != provider_name(pool.audience):
        raise SpecError("spec.sidecarPool: names another provider than spec.federation.audience; drop one")
    if fed is None:
        fed = Federation(audience=pool.audience, config_map_name=federation_config_map_name(name),
                         token_expiration_seconds=pool.token_expiration_seconds, rendered=True)
    return pool, fed


_PROVIDER_POOL_RE = re.compile(
    r"^(?:https:)?//iam\.googleapis\.com/projects/(?P<number>[0-9]+)/locations/global/"
    r"workloadIdentityPools/(?P<pool>[-a-z0-9]+)/providers/(?P<provider>[-a-z0-9]+)$")
