"""VertexRoute + VertexCredential → the sidecar's config file; pure.

The result is always checked with the sidecar's own `parse_config` before it is written
anywhere, so a route can never hand its pods a config that the sidecar would refuse.
This module also fixes the in-pod file layout that the config refers to; `inject`
mounts the volumes at exactly these paths.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from vertex_sidecar.config import NAME_RE, ConfigError, parse_config

from vertex_operator import fleet
from vertex_operator.crd import PROXY_PORT, UPSTREAM_KEYS, Credential, Route, Rule
from vertex_operator.tracing import EffectiveTracing

CONFIG_DIR = "/etc/vertex-sidecar"
CONFIG_FILE = "config.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
KEY_DIR = "/var/run/secrets/vertex/key"
KEY_FILE = "key.json"
FEDERATION_DIR = "/var/run/secrets/vertex/federation"
FEDERATION_CONFIG_FILE = "credential-configuration.json"
FEDERATION_TOKEN_FILE = "token"
TLS_DIR = "/var/run/vertex-sidecar/tls"
TLS_CA_FILE = "ca.crt"
TLS_CA_PATH = f"{TLS_DIR}/{TLS_CA_FILE}"  # the bundle: public roots + trust bundle + pod CA
TLS_POD_CA_PATH = f"{TLS_DIR}/pod-ca.crt"  # the pod-local CA alone (NODE_EXTRA_CA_CERTS)
TRUST_DIR = "/etc/vertex-sidecar/trust"  # the route's trustBundle ConfigMap, in the sidecar only
TRUST_FILE = "roots.pem"


class RenderError(ValueError):
    """The route cannot be turned into a valid sidecar config; the message says why."""


@dataclass(frozen=True)
class Rendered:
    config: dict[str, Any]
    text: str  # the YAML written into the ConfigMap
    hash: str  # short content hash, stored on the ConfigMap for cheap comparisons
    files: dict[str, str] = field(default_factory=dict)  # other ConfigMap keys (files beside the config)


def credential_entry(credential: Credential) -> dict[str, Any]:
    """The sidecar `credentials.<name>` entry for a VertexCredential's mode."""
    kind = credential.sidecar_type
    if kind == "external_account_file":
        return {"type": kind, "path": f"{FEDERATION_DIR}/{FEDERATION_CONFIG_FILE}"}
    if kind == "service_account_file":
        return {"type": kind, "path": f"{KEY_DIR}/{KEY_FILE}"}
    return {"type": "adc"}


def credential_key(credential: Credential) -> str:
    """The credential's name inside the sidecar config (shows up in its metrics)."""
    return credential.name if NAME_RE.match(credential.name) else "default"


def tls_settings(route: Route) -> dict[str, Any]:
    """The TLS listener and where the sidecar writes the CA bundle that apps trust.

    `tls.ca_bundle_path` is the contract with the sidecar for the Live API's `wss://`:
    the sidecar writes its pod-local CA there and `inject` points `SSL_CERT_FILE` at it.
    Kept in one function so that the key can follow the sidecar's schema.
    """
    settings: dict[str, Any] = {}
    if route.sidecar.tls.enabled:
        settings["tls_listen"] = f"127.0.0.1:{route.sidecar.tls.port}"
    if route.sidecar.interception:  # the forward proxy's leaves come from the same pod-local CA
        settings["proxy_listen"] = f"127.0.0.1:{PROXY_PORT}"
        settings["proxy"] = {"other_hosts": route.sidecar.proxy_other_hosts}  # policy: hot-reloaded
    if not settings:
        return {}
    tls: dict[str, Any] = {"ca_bundle_path": TLS_CA_PATH, "ca_cert_path": TLS_POD_CA_PATH}
    if route.sidecar.tls.trust_bundle is not None:
        tls["extra_roots_file"] = f"{TRUST_DIR}/{TRUST_FILE}"
    settings["tls"] = tls
    return settings


def _limits(rule: Rule) -> dict[str, int | str]:
    limits = {
        "requests_per_minute": rule.limits.requests_per_minute,
        "tokens_per_minute": rule.limits.tokens_per_minute,
        "max_body_bytes": rule.limits.max_body_bytes,
        "scope": rule.limits.scope,
        "on_store_error": rule.limits.on_store_error,
    }
    return {k: v for k, v in limits.items() if v is not None}


def _budget(rule: Rule) -> dict[str, float | str]:
    if rule.budget is None:
        return {}
    budget = {"usd_per_day": rule.budget.usd_per_day, "usd_per_month": rule.budget.usd_per_month,
              "action": rule.budget.action}
    return {k: v for k, v in budget.items() if v is not None}


def _timeouts(rule: Rule) -> dict[str, float]:
    timeouts = {
        "connect": rule.timeouts.connect_seconds,
        "first_byte": rule.timeouts.first_byte_seconds,
        "total": rule.timeouts.total_seconds,
    }
    return {k: v for k, v in timeouts.items() if v is not None}


def _route_entry(rule: Rule, credential_name: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": rule.name,
        "match": {
            "projects": list(rule.projects or ("*",)),
            "locations": list(rule.locations or ("*",)),
            "models": list(rule.models or ("*",)),
        },
        "credential": credential_name,
    }
    if rule.location:
        entry["defaults"] = {"location": rule.location}
    if rule.aliases:
        entry["aliases"] = dict(sorted(rule.aliases.items()))
    if rule.fallback_locations:
        entry["fallback_locations"] = list(rule.fallback_locations)
    if rule.quota_project:
        entry["quota_project"] = rule.quota_project
    if limits := _limits(rule):
        entry["limits"] = limits
    if timeouts := _timeouts(rule):
        entry["timeouts"] = timeouts
    if budget := _budget(rule):
        entry["budget"] = budget
    return entry


def render_config(route: Route, credential: Credential, tracing: EffectiveTracing | None = None, *,
                  store: fleet.StoreSettings | None = None) -> dict[str, Any]:
    """The sidecar config document (not yet validated)."""
    name = credential_key(credential)
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{route.sidecar.port}",
        # The injected container's VERTEX_SIDECAR_ADMIN_HOST (the pod IP) replaces the host.
        "admin_listen": f"127.0.0.1:{route.sidecar.admin_port}",
    }
    config.update(tls_settings(route))
    if route.upstreams:
        config["upstreams"] = {UPSTREAM_KEYS[k]: v for k, v in sorted(route.upstreams.items())}
    config["defaults"] = {
        "project": route.defaults.project,
        "location": route.defaults.location,
        "api_version": route.defaults.api_version,
    }
    config["credentials"] = {name: credential_entry(credential)}
    config["routes"] = [_route_entry(rule, name) for rule in route.effective_rules()]
    if tracing is not None:
        config["tracing"] = tracing.config_section()
    config.update(fleet.store_block(route, store, CONFIG_DIR))
    return config


def render(route: Route, credential: Credential, tracing: EffectiveTracing | None = None, *,
           store: fleet.StoreSettings | None = None) -> Rendered:
    """Render and validate with the sidecar's own schema; raises `RenderError`."""
    config = render_config(route, credential, tracing, store=store)
    try:
        parse_config(config, source=f"VertexRoute {route.namespace}/{route.name}")
    except ConfigError as exc:
        raise RenderError(f"the rendered sidecar config is invalid: {exc}") from None
    header = (f"# Rendered by vertex-operator from VertexRoute {route.namespace}/{route.name}"
              f" and VertexCredential {credential.name}. Do not edit: changes are overwritten.\n")
    text = header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    files = fleet.config_files(route, store)
    digest = content_hash(text + "".join(f"\0{k}\0{v}" for k, v in sorted(files.items()))) if files \
        else content_hash(text)
    return Rendered(config=config, text=text, hash=digest, files=files)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def stable_hash(data: Any) -> str:
    """A short hash of JSON-able data, independent of key order."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
