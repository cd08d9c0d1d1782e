"""The sidecar's configuration: schema, loading and validation.

The file is YAML (design §3). Every key is checked: unknown keys and wrong types are
refused with a `ConfigError` whose message names the offending field, e.g.
``routes[1].limits.requests_per_minute: expected a positive integer, got 'ten'``.

This module depends only on PyYAML and the standard library, because the operator
imports it to render and validate the config it writes into ConfigMaps.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

CONFIG_ENV_VAR = "VERTEX_SIDECAR_CONFIG"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
API_VERSIONS = ("v1", "v1beta1")
CREDENTIAL_TYPES = ("adc", "service_account_file", "external_account_file", "impersonate", "client")

CredentialType = Literal["adc", "service_account_file", "external_account_file", "impersonate", "client"]

# A Google Cloud project id (6-30 chars) or a numeric project number.
PROJECT_RE = re.compile(r"^(?:[a-z][a-z0-9-]{4,28}[a-z0-9]|[0-9]{1,20})$")
LOCATION_TOKEN_RE = re.compile(r"^(?:global|us|eu|[a-z]+(?:-[a-z]+)+[0-9]+)$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9-]+$")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field and what is wrong."""


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Upstreams:
    """URL templates of Google's endpoints; `{location}` is substituted.

    Overridable for Private Service Connect, restricted VIPs and tests.
    """

    aiplatform: str = "https://{location}-aiplatform.googleapis.com"
    aiplatform_global: str = "https://aiplatform.googleapis.com"
    aiplatform_multiregion: str = "https://aiplatform.{location}.rep.googleapis.com"
    discovery: str = "https://discoveryengine.googleapis.com"
    discovery_multiregion: str = "https://{location}-discoveryengine.googleapis.com"


@dataclass(frozen=True)
class Defaults:
    """Completes SDK "collection" paths that carry no project or location."""

    project: str | None = None
    location: str | None = None
    api_version: str | None = None

    def over(self, base: "Defaults") -> "Defaults":
        """These defaults, falling back field by field to `base`."""
        return Defaults(
            project=self.project or base.project,
            location=self.location or base.location,
            api_version=self.api_version or base.api_version,
        )


@dataclass(frozen=True)
class CredentialSpec:
    name: str
    type: CredentialType = "adc"
    path: str | None = None  # key / credential-config file for the *_file types
    source: str | None = None  # impersonate: name of the credential that signs (default: adc)
    target_principal: str | None = None  # impersonate: the Google service account email
    delegates: tuple[str, ...] = ()
    lifetime_seconds: int = 3600
    scopes: tuple[str, ...] = (CLOUD_PLATFORM_SCOPE,)
    # impersonate: base URL of the IAM Credentials API (PSC, tests); None = Google's
    iam_endpoint: str | None = None


@dataclass(frozen=True)
class Match:
    """Globs a request must match; `*` everywhere matches everything."""

    projects: tuple[str, ...] = ("*",)
    locations: tuple[str, ...] = ("*",)
    models: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_body_bytes: int | None = None
    # Where requests/tokens per minute are counted (issue 11): "pod" = in each sidecar,
    # "fleet" = shared by every sidecar of the route through the `store` (per pod without one).
    scope: str = "pod"
    on_store_error: str = "allow"  # store unreachable: "allow" = per-pod limits, "deny" = 503


LIMIT_SCOPES = ("pod", "fleet")
STORE_ERROR_POLICIES = ("allow", "deny")
BUDGET_ACTIONS = ("deny", "warn")


@dataclass(frozen=True)
class Budget:
    """`budget:` of a route: spend in USD (the access log's cost_usd) per UTC day / month."""

    usd_per_day: float | None = None
    usd_per_month: float | None = None
    action: str = "deny"  # "warn": log and count only


@dataclass(frozen=True)
class RedisStore:
    """`store.redis`: the shared counters of fleet-scoped limits and budgets."""

    url: str
    password_file: str | None = None
    tls_ca_file: str | None = None
    timeout_ms: int = 50  # every store call; a slow store never holds a request longer
    sync_interval_ms: int = 250  # background refresh of leases and fleet spend
    key_prefix: str = "vxp"


@dataclass(frozen=True)
class Timeouts:
    """Upstream timeouts in seconds; `total_s` None means unbounded (long streams)."""

    connect_s: float = 10.0
    first_byte_s: float = 300.0
    total_s: float | None = None


@dataclass(frozen=True)
class LiveLimits:
    """Live API (WebSocket) sessions of a route; None means unlimited."""

    max_sessions: int | None = None  # concurrent sessions on the route
    idle_timeout_s: float | None = 600.0  # no frame either way for this long → closed
    max_duration_s: float | None = None


@dataclass(frozen=True)
class TlsSettings:
    """`tls:` — the certificate of the TLS listener (`tls_listen`).

    Without cert_file/key_file the sidecar keeps a pod-local CA in `state_dir` (an emptyDir:
    the root FS is read-only) and issues itself a certificate for localhost; either way it
    writes `ca_bundle_path` (system roots + the CA) for app containers' SSL_CERT_FILE.
    """

    cert_file: str | None = None  # mounted certificate (PEM, may hold the chain)
    key_file: str | None = None
    ca_file: str | None = None  # the CA that issued a mounted cert, added to the bundle
    state_dir: str | None = None  # default: $TMPDIR/vertex-sidecar-tls
    ca_bundle_path: str | None = None  # default: <state_dir>/ca-bundle.pem
    system_ca_file: str | None = None  # default: the system's bundle (OpenSSL default paths)
    # More roots for the bundle, after the system ones: the organisation's CAs (corporate
    # proxies, internal services), which the sidecar image does not have.
    extra_roots_file: str | None = None
    # The CA alone (pod-local, or ca_file), for runtimes that add it to their own roots
    # (Node's NODE_EXTRA_CA_CERTS) instead of replacing them.
    ca_cert_path: str | None = None


@dataclass(frozen=True)
class ProxySettings:
    """`proxy:` — the forward-proxy listener (`proxy_listen`, forward_proxy.py).

    `other_hosts`: what a CONNECT to a host other than Google's Vertex AI / Discovery Engine
    endpoints gets: a blind TCP tunnel, or 403. `resolve` pins host:port → ip:port for such
    tunnels (tests, split-horizon DNS); it is the operator's choice, so the address checks
    that keep callers off loopback and link-local do not apply to it.
    """

    other_hosts: Literal["tunnel", "deny"] = "tunnel"
    tunnel_ports: tuple[int, ...] = (443,)
    resolve: Mapping[str, str] = field(default_factory=dict)
    extra_locations: tuple[str, ...] = ()  # Vertex regions newer than the built-in list


@dataclass(frozen=True)
class Route:
    name: str
    match: Match = field(default_factory=Match)
    credential: str = "default"
    defaults: Defaults = field(default_factory=Defaults)
    aliases: Mapping[str, str] = field(default_factory=dict)
    fallback_locations: tuple[str, ...] = ()
    quota_project: str | None = None
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    live: LiveLimits = field(default_factory=LiveLimits)
    budget: Budget | None = None


# Metric labels the config may add from request headers (telemetry, issue 5).
METRIC_LABEL_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
RESERVED_METRIC_LABELS = frozenset({
    "route", "model", "operation", "code", "reason", "credential", "result", "le", "quantile",
    "job", "instance", "version",
})
# Header values that are secrets never become labels.
SECRET_HEADERS = frozenset({
    "authorization", "proxy-authorization", "x-goog-api-key", "x-api-key", "api-key", "cookie", "set-cookie",
    "x-vertex-sidecar-key",
})
MAX_HEADER_LABELS = 4


@dataclass(frozen=True)
class MetricsConfig:
    """`metrics:`; header_labels maps a lower-case request header to a metric label name."""

    header_labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TracingConfig:
    """`tracing:` (off by default); the exporter's other settings are the standard OTEL_* variables."""

    enabled: bool = False
    endpoint: str | None = None  # OTLP/HTTP base URL (/v1/traces is appended); default OTEL_EXPORTER_OTLP_ENDPOINT
    sample_ratio: float | None = None  # requests without a caller's traceparent; default OTEL_TRACES_SAMPLER(_ARG)
    baggage_keys: tuple[str, ...] = ()  # caller baggage entries recorded as span attributes


@dataclass(frozen=True)
class CallerKeys:
    """Optional shared-secret check on callers (off by default: the sidecar is on localhost).

    `file` lists SHA-256 hashes of the accepted keys, one per line (`sha256:<hex>`, an
    optional `name:` in front, `#` comments), so the plain keys never sit in a ConfigMap.
    """

    file: str
    header: str = "x-vertex-sidecar-key"


@dataclass(frozen=True)
class Config:
    listen: ListenAddress = ListenAddress("127.0.0.1", 4000)
    # Loopback unless told otherwise: in a pod the webhook sets VERTEX_SIDECAR_ADMIN_HOST to
    # the pod IP (kubelet probes and Prometheus connect there), see cli.admin_listen_from_env.
    admin_listen: ListenAddress = ListenAddress("127.0.0.1", 9464)
    tls_listen: ListenAddress | None = None
    proxy_listen: ListenAddress | None = None  # the HTTPS forward proxy (zero-code-change mode)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    upstreams: Upstreams = field(default_factory=Upstreams)
    defaults: Defaults = field(default_factory=lambda: Defaults(api_version="v1"))
    credentials: Mapping[str, CredentialSpec] = field(
        default_factory=lambda: {"default": CredentialSpec(name="default")}
    )
    routes: tuple[Route, ...] = ()
    limits: Limits = field(default_factory=lambda: Limits(max_body_bytes=32 * 1024 * 1024))
    timeouts: Timeouts = field(default_factory=Timeouts)
    drain_seconds: float = 30.0
    pricing: Mapping[str, Any] | None = None  # overrides merged over the packaged pricing table
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    live: LiveLimits = field(default_factory=LiveLimits)  # base of every route's `live:`
    tls: TlsSettings = field(default_factory=TlsSettings)
    caller_keys: CallerKeys | None = None
    reload_interval_seconds: float = 2.0
    store: RedisStore | None = None
    tracing: TracingConfig = field(default_factory=TracingConfig)
    source: str = "<built-in defaults>"

    @property
    def allow_all(self) -> bool:
        """No routes configured: every request is allowed with the default credential."""
        return not self.routes

    @cached_property
    def default_route(self) -> "Route":
        """The route that serves everything when no routes are configured."""
        return Route(name="default", limits=self.limits, timeouts=self.timeouts, live=self.live)


# --------------------------------------------------------------------------- reading


class _Section:
    """Typed, path-aware access to one mapping of the YAML document.

    Remembers which keys were read so that `finish()` can refuse unknown (misspelt) keys.
    """

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path or '<top level>'}: expected a mapping, got {_describe(data)}")
        self._data: dict[str, Any] = data
        self._path = path
        self._seen: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def raw(self, key: str) -> Any:
        self._seen.add(key)
        return self._data.get(key)

    def has(self, key: str) -> bool:
        return self._data.get(key) is not None

    def section(self, key: str) -> "_Section":
        return _Section(self.raw(key), self.where(key))

    def string(self, key: str, default: str | None = None, pattern: re.Pattern[str] | None = None,
               hint: str = "") -> str | None:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.where(key)}: expected a non-empty string, got {_describe(value)}")
        if pattern is not None and not pattern.match(value):
            raise ConfigError(f"{self.where(key)}: {value!r} is not valid{hint}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(key, default)
        assert value is not None
        if value not in choices:
            raise ConfigError(f"{self.where(key)}: {value!r} is not one of {', '.join(choices)}")
        return value

    def positive_int(self, key: str, default: int | None = None) -> int | None:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{self.where(key)}: expected a positive integer, got {_describe(value)}")
        return value

    def positive_float(self, key: str, default: float | None = None) -> float | None:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{self.where(key)}: expected a positive number of seconds, got {_describe(value)}")
        return float(value)

    def strings(self, key: str, default: tuple[str, ...] = (), pattern: re.Pattern[str] | None = None,
                hint: str = "") -> tuple[str, ...]:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self.where(key)}: expected a list of strings, got {_describe(value)}")
        if pattern is not None:
            for item in value:
                if not pattern.match(item):
                    raise ConfigError(f"{self.where(key)}: {item!r} is not valid{hint}")
        return tuple(value)

    def string_map(self, key: str) -> dict[str, str]:
        value = self.raw(key)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in value.items()
        ):
            raise ConfigError(f"{self.where(key)}: expected a mapping of strings to strings")
        return dict(value)

    def items(self) -> list[tuple[str, Any]]:
        self._seen.update(self._data)
        return list(self._data.items())

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            known = ", ".join(sorted(self._seen)) or "none"
            raise ConfigError(
                f"{self._path or '<top level>'}: unknown key(s) {', '.join(map(repr, unknown))} "
                f"(known keys here: {known})"
            )


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_listen(text: str, where: str) -> ListenAddress:
    """Parse ``host:port`` / ``[v6]:port``; port 0 asks the OS for a free port."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", text)
    if not match:
        raise ConfigError(f"{where}: {text!r} is not a host:port address (e.g. 127.0.0.1:4000)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ConfigError(f"{where}: port {port} is out of range")
    return ListenAddress(host, port)


def _listen(section: _Section, key: str, default: ListenAddress | None) -> ListenAddress | None:
    text = section.string(key)
    return default if text is None else parse_listen(text, section.where(key))


def _upstream_url(section: _Section, key: str, default: str) -> str:
    value = section.string(key, default)
    assert value is not None
    if not re.match(r"^(https?)://[^/\s]+", value):
        raise ConfigError(f"{section.where(key)}: {value!r} must be an http(s) URL")
    return value.rstrip("/")


def _upstreams(section: _Section) -> Upstreams:
    base = Upstreams()
    result = Upstreams(**{
        name: _upstream_url(section, name, getattr(base, name))
        for name in ("aiplatform", "aiplatform_global", "aiplatform_multiregion",
                     "discovery", "discovery_multiregion")
    })
    section.finish()
    return result


def _defaults(section: _Section) -> Defaults:
    result = Defaults(
        project=section.string("project", pattern=PROJECT_RE, hint=" (a Google Cloud project id)"),
        location=section.string("location", pattern=LOCATION_TOKEN_RE,
                                hint=" (a location such as us-central1, europe-west4, global, us, eu)"),
        api_version=section.string("api_version"),
    )
    if result.api_version is not None and result.api_version not in API_VERSIONS:
        raise ConfigError(f"{section.where('api_version')}: {result.api_version!r} is not one of "
                          f"{', '.join(API_VERSIONS)}")
    section.finish()
    return result


def _credential(name: str, section: _Section) -> CredentialSpec:
    if not NAME_RE.match(name):
        raise ConfigError(f"credentials: name {name!r} is not valid (letters, digits, - _ .)")
    kind = section.choice("type", CREDENTIAL_TYPES, "adc")
    path = section.string("path")
    if kind in ("service_account_file", "external_account_file") and not path:
        raise ConfigError(f"{section.where('path')}: required for a credential of type {kind}")
    if kind not in ("service_account_file", "external_account_file") and path:
        raise ConfigError(f"{section.where('path')}: only used by service_account_file / external_account_file")
    target = section.string("target_principal")
    if kind == "impersonate" and not target:
        raise ConfigError(f"{section.where('target_principal')}: required for type impersonate "
                          "(the email of the Google service account to act as)")
    spec = CredentialSpec(
        name=name,
        type=kind,  # type: ignore[arg-type]
        path=path,
        source=section.string("source"),
        target_principal=target,
        delegates=section.strings("delegates"),
        lifetime_seconds=section.positive_int("lifetime_seconds", 3600) or 3600,
        scopes=section.strings("scopes", (CLOUD_PLATFORM_SCOPE,)),
        iam_endpoint=_upstream_url(section, "iam_endpoint", "") if section.string("iam_endpoint") else None,
    )
    if spec.iam_endpoint is not None and kind != "impersonate":
        raise ConfigError(f"{section.where('iam_endpoint')}: only used by type impersonate")
    section.finish()
    return spec


def _credentials(section: _Section) -> dict[str, CredentialSpec]:
    result = {name: _credential(name, _Section(value, section.where(name))) for name, value in section.items()}
    result.setdefault("default", CredentialSpec(name="default"))
    for spec in result.values():
        if spec.source is not None and spec.source not in result:
            raise ConfigError(f"credentials.{spec.name}.source: no credential named {spec.source!r}")
        if spec.source == spec.name:
            raise ConfigError(f"credentials.{spec.name}.source: a credential cannot be its own source")
        if spec.source is not None and result[spec.source].type == "client":
            raise ConfigError(f"credentials.{spec.name}.source: {spec.source!r} is of type client and mints "
                              "no tokens; use adc, service_account_file or external_account_file")
        chain, current = [spec.name], spec.source
        while current in result:  # impersonation chains must end at a token-minting credential
            if current in chain:
                raise ConfigError(f"credentials.{spec.name}.source: circular sources "
                                  f"({' -> '.join([*chain, current])})")
            chain.append(current)
            current = result[current].source
    return result


def _limits(section: _Section, base: Limits) -> Limits:
    result = Limits(
        requests_per_minute=section.positive_int("requests_per_minute", base.requests_per_minute),
        tokens_per_minute=section.positive_int("tokens_per_minute", base.tokens_per_minute),
        max_body_bytes=section.positive_int("max_body_bytes", base.max_body_bytes),
        scope=section.choice("scope", LIMIT_SCOPES, base.scope),
        on_store_error=section.choice("on_store_error", STORE_ERROR_POLICIES, base.on_store_error),
    )
    section.finish()
    return result


def _budget(section: _Section) -> Budget:
    def usd(key: str) -> float | None:
        value = section.raw(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{section.where(key)}: expected a positive amount in USD, got {_describe(value)}")
        return float(value)

    result = Budget(usd_per_day=usd("usd_per_day"), usd_per_month=usd("usd_per_month"),
                    action=section.choice("action", BUDGET_ACTIONS, "deny"))
    if result.usd_per_day is None and result.usd_per_month is None:
        raise ConfigError(f"{section.where('usd_per_day')}: a budget needs usd_per_day and/or usd_per_month")
    section.finish()
    return result


def _store(section: _Section) -> RedisStore:
    redis = section.section("redis")
    url = redis.string("url")
    if url is None or not re.match(r"^rediss?://[^/\s]+", url):
        raise ConfigError(f"{redis.where('url')}: required, a redis:// or rediss:// URL (e.g. redis://10.0.0.3:6379/0)")
    if re.match(r"^rediss?://[^/@]*:[^/@]*@", url):
        raise ConfigError(f"{redis.where('url')}: put the password in password_file, not in the URL")
    result = RedisStore(
        url=url,
        password_file=redis.string("password_file"),
        tls_ca_file=redis.string("tls_ca_file"),
        timeout_ms=redis.positive_int("timeout_ms", 50) or 50,
        sync_interval_ms=redis.positive_int("sync_interval_ms", 250) or 250,
        key_prefix=redis.string("key_prefix", "vxp", pattern=NAME_RE, hint=" (letters, digits, - _ .)") or "vxp",
    )
    if result.timeout_ms > 1000:
        raise ConfigError(f"{redis.where('timeout_ms')}: at most 1000 ms (a slow store must not hold requests)")
    redis.finish()
    section.finish()
    return result


def _timeouts(section: _Section, base: Timeouts) -> Timeouts:
    result = Timeouts(
        connect_s=section.positive_float("connect", base.connect_s) or base.connect_s,
        first_byte_s=section.positive_float("first_byte", base.first_byte_s) or base.first_byte_s,
        total_s=section.positive_float("total", base.total_s),
    )
    section.finish()
    return result


def _live(section: _Section, base: LiveLimits) -> LiveLimits:
    result = LiveLimits(
        max_sessions=section.positive_int("max_sessions", base.max_sessions),
        idle_timeout_s=section.positive_float("idle_timeout", base.idle_timeout_s),
        max_duration_s=section.positive_float("max_duration", base.max_duration_s),
    )
    section.finish()
    return result


def _tls(section: _Section) -> TlsSettings:
    result = TlsSettings(**{name: section.string(name) for name in (
        "cert_file", "key_file", "ca_file", "state_dir", "ca_bundle_path", "system_ca_file",
        "extra_roots_file", "ca_cert_path")})
    if (result.cert_file is None) != (result.key_file is None):
        raise ConfigError(f"{section.where('cert_file')}: cert_file and key_file go together "
                          "(or leave both out and the sidecar issues its own from a pod-local CA)")
    if result.ca_file is not None and result.cert_file is None:
        raise ConfigError(f"{section.where('ca_file')}: only used with a mounted cert_file/key_file")
    section.finish()
    return result


def _proxy(section: _Section) -> ProxySettings:
    other_hosts = section.choice("other_hosts", ("tunnel", "deny"), "tunnel")
    ports = section.raw("tunnel_ports")
    if ports is None:
        tunnel_ports: tuple[int, ...] = ProxySettings.tunnel_ports
    elif not isinstance(ports, list) or not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536
                                                  for p in ports):
        raise ConfigError(f"{section.where('tunnel_ports')}: expected a list of ports (1-65535), got {_describe(ports)}")
    else:
        tunnel_ports = tuple(ports)
    resolve = section.string_map("resolve")
    for key, value in resolve.items():
        for text, wants_ip in ((key, False), (value, True)):
            try:
                address = parse_listen(text, section.where("resolve"))
                if wants_ip:
                    ipaddress.ip_address(address.host)
            except (ConfigError, ValueError):
                raise ConfigError(f"{section.where('resolve')}: {text!r} is not {'ip' if wants_ip else 'host'}:port "
                                  "(the map is host:port -> ip:port)") from None
    extra = section.strings("extra_locations", pattern=LOCATION_TOKEN_RE)
    section.finish()
    return ProxySettings(other_hosts=other_hosts, tunnel_ports=tunnel_ports,  # type: ignore[arg-type]
                         resolve={k.lower(): v for k, v in resolve.items()}, extra_locations=extra)


_LOCATION_HINT = " (a location such as us-central1, europe-west4, global, us, eu)"


def _route(index: int, section: _Section, credentials: Mapping[str, CredentialSpec],
           limits: Limits, timeouts: Timeouts, live: LiveLimits = LiveLimits()) -> Route:
    name = section.string("name", f"route-{index}", pattern=NAME_RE, hint=" (letters, digits, - _ .)")
    assert name is not None
    match_section = section.section("match")
    match = Match(
        projects=match_section.strings("projects", ("*",)),
        locations=match_section.strings("locations", ("*",)),
        models=match_section.strings("models", ("*",)),
    )
    match_section.finish()
    credential = section.string("credential", "default")
    assert credential is not None
    if credential not in credentials:
        raise ConfigError(f"{section.where('credential')}: no credential named {credential!r} "
                          f"(defined: {', '.join(sorted(credentials))})")
    fallback_locations = section.strings("fallback_locations", pattern=LOCATION_TOKEN_RE, hint=_LOCATION_HINT)
    for location in fallback_locations:
        # A fallback is never a silent rewrite to a place the route does not allow.
        if not any(fnmatchcase(location, pattern) for pattern in match.locations):
            raise ConfigError(f"{section.where('fallback_locations')}: {location!r} is not allowed by "
                              f"match.locations {list(match.locations)}")
    route = Route(
        name=name,
        match=match,
        credential=credential,
        defaults=_defaults(section.section("defaults")),
        aliases=section.string_map("aliases"),
        fallback_locations=fallback_locations,
        quota_project=section.string("quota_project", pattern=PROJECT_RE, hint=" (a Google Cloud project id)"),
        limits=_limits(section.section("limits"), limits),
        timeouts=_timeouts(section.section("timeouts"), timeouts),
        live=_live(section.section("live"), live),
        budget=_budget(section.section("budget")) if section.has("budget") else None,
    )
    section.finish()
    return route


def _metrics(section: _Section) -> MetricsConfig:
    where = section.where("header_labels")
    raw = section.string_map("header_labels")
    if len(raw) > MAX_HEADER_LABELS:
        raise ConfigError(f"{where}: at most {MAX_HEADER_LABELS} header labels (each multiplies the metric series)")
    labels: dict[str, str] = {}
    for header, label in raw.items():
        name = header.lower()
        if not HEADER_NAME_RE.match(name):
            raise ConfigError(f"{where}: {header!r} is not an HTTP header name")
        if name in SECRET_HEADERS:
            raise ConfigError(f"{where}: {header!r} carries credentials and can never become a metric label")
        if not METRIC_LABEL_RE.match(label) or label.startswith(("__", "gen_ai_")) or label in RESERVED_METRIC_LABELS:
            raise ConfigError(f"{where}.{header}: {label!r} is not a usable label name (lower-case letters, digits "
                              "and _, not starting with __ or gen_ai_, and not one the sidecar sets itself)")
        if label in labels.values():
            raise ConfigError(f"{where}: label {label!r} is used twice")
        labels[name] = label
    section.finish()
    return MetricsConfig(header_labels=labels)


def _pricing(top: _Section) -> Mapping[str, Any] | None:
    overrides = top.raw("pricing")
    if overrides is None:
        return None
    from .pricing import PricingError, PricingTable  # only the sidecar needs the table itself

    try:
        PricingTable.load(overrides)  # validated now, so a bad reload keeps the old config
    except PricingError as exc:
        raise ConfigError(str(exc)) from None
    return dict(overrides)


BAGGAGE_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _tracing(section: _Section) -> TracingConfig:
    enabled = section.raw("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise ConfigError(f"{section.where('enabled')}: expected true or false, got {_describe(enabled)}")
    endpoint = section.string("endpoint")
    if endpoint is not None and not re.match(r"^https?://[^/\s]+", endpoint):
        raise ConfigError(f"{section.where('endpoint')}: {endpoint!r} must be an http(s) URL of an OTLP/HTTP "
                          "collector (e.g. http://otel-collector.observability:4318)")
    ratio = section.raw("sample_ratio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1):
        raise ConfigError(f"{section.where('sample_ratio')}: expected a number from 0 to 1, got {_describe(ratio)}")
    result = TracingConfig(
        enabled=bool(enabled), endpoint=endpoint, sample_ratio=None if ratio is None else float(ratio),
        baggage_keys=section.strings("baggage_keys", pattern=BAGGAGE_KEY_RE, hint=" (a baggage key)"),
    )
    if len(result.baggage_keys) > 16:
        raise ConfigError(f"{section.where('baggage_keys')}: at most 16 keys")
    section.finish()
    return result


def _caller_keys(section: _Section) -> CallerKeys:
    file = section.string("file")
    if file is None:
        raise ConfigError(f"{section.where('file')}: required (the file of accepted key hashes)")
    header = section.string("header", "x-vertex-sidecar-key", pattern=HEADER_NAME_RE, hint=" (a header name)")
    assert header is not None
    section.finish()
    return CallerKeys(file=file, header=header.lower())


def parse_config(data: Any, source: str = "<memory>") -> Config:
    """Validate a parsed YAML document and build the `Config`; raises `ConfigError`."""
    top = _Section(data, "")
    credentials = _credentials(top.section("credentials"))
    limits = _limits(top.section("limits"), Config().limits)
    timeouts = _timeouts(top.section("timeouts"), Timeouts())
    live = _live(top.section("live"), LiveLimits())
    routes_raw = top.raw("routes") or []
    if not isinstance(routes_raw, list):
        raise ConfigError(f"routes: expected a list of routes, got {_describe(routes_raw)}")
    routes = tuple(
        _route(i, _Section(item, f"routes[{i}]"), credentials, limits, timeouts, live)
        for i, item in enumerate(routes_raw)
    )
    names = [r.name for r in routes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"routes: duplicate route name(s) {', '.join(duplicates)}")
    defaults = _defaults(top.section("defaults"))
    config = Config(
        listen=_listen(top, "listen", Config.listen) or Config.listen,
        admin_listen=_listen(top, "admin_listen", Config.admin_listen) or Config.admin_listen,
        tls_listen=_listen(top, "tls_listen", None),
        proxy_listen=_listen(top, "proxy_listen", None),
        proxy=_proxy(top.section("proxy")),
        upstreams=_upstreams(top.section("upstreams")),
        defaults=defaults.over(Defaults(api_version="v1")),
        credentials=credentials,
        routes=routes,
        limits=limits,
        timeouts=timeouts,
        drain_seconds=top.positive_float("drain_seconds", 30.0) or 30.0,
        pricing=_pricing(top),
        metrics=_metrics(top.section("metrics")),
        live=live,
        tls=_tls(top.section("tls")),
        caller_keys=_caller_keys(top.section("caller_keys")) if top.has("caller_keys") else None,
        reload_interval_seconds=top.positive_float("reload_interval_seconds", 2.0) or 2.0,
        store=_store(top.section("store")) if top.has("store") else None,
        tracing=_tracing(top.section("tracing")),
        source=source,
    )
    top.finish()
    if config.proxy_listen is not None and config.tls.cert_file is not None:
        raise ConfigError("proxy_listen: the forward proxy issues its certificates from the pod-local CA; leave out "
                          "tls.cert_file/key_file (or the proxy)")
    if config.caller_keys is not None and config.caller_keys.header in config.metrics.header_labels:
        raise ConfigError(f"metrics.header_labels: {config.caller_keys.header!r} is the caller-key header "
                          "(caller_keys.header) and can never become a metric label")
    return config


def parse_config_text(text: str, source: str = "<memory>") -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    return parse_config(data, source)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load the file at `path`; None means the built-in allow-all defaults."""
    if path is None:
        return Config()
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config file: {exc.strerror}") from None
    return parse_config_text(text, str(file))
