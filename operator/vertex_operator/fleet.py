"""Fleet-wide limits and budgets, the operator's part; pure.

The sidecars share counters through a store (Redis) that the operator is told about
(chart values `store.redis.*` → `--store-redis-*` flags). For a route whose rules ask for
`limits.scope: fleet` or carry a budget, the operator

* renders the sidecar's `store:` block (`store_block`), with a key prefix of the route's
  namespace and name, so that two routes of the same name in different namespaces never
  share counters;
* ships the store's CA certificate (not a secret) inside the route's ConfigMap, which the
  sidecar already mounts (`config_files`), so that no CA object is needed per namespace;
* has the webhook mount the password Secret, which must exist under the same name in the
  workload's namespace (the operator reads and copies no Secrets: least privilege);
* reports in the route's status where its limits and budgets are counted (`route_status`).
"""

from __future__ import annotations

import hashlib
import pathlib
from dataclasses import dataclass, replace
from typing import Any

from vertex_operator.crd import Route, Rule, SecretKey

STORE_CA_FILE = "redis-ca.crt"  # a key of the route's ConfigMap, so a file next to config.yaml
STORE_PASSWORD_DIR = "/var/run/secrets/vertex/redis"
STORE_PASSWORD_FILE = "password"
KEY_PREFIX = "vxp"


@dataclass(frozen=True)
class StoreSettings:
    """The store the operator hands to sidecars (from its command line)."""

    url: str  # redis:// or rediss://, no password in it
    password_secret: SecretKey | None = None  # a Secret of this name/key in each workload namespace
    tls_ca_pem: str | None = None  # the CA that signed the store's certificate (rediss://)
    timeout_ms: int | None = None  # None: the sidecar's default
    tls_ca_file: str | None = None  # where the operator reads `tls_ca_pem` from, at start

    @property
    def fingerprint(self) -> list[Any]:
        """What needs new pods when it changes (the sidecar reads its store once, at start)."""
        ca = hashlib.sha256(self.tls_ca_pem.encode()).hexdigest()[:16] if self.tls_ca_pem else None
        secret = [self.password_secret.secret_name, self.password_secret.key] if self.password_secret else None
        return [self.url, secret, ca, self.timeout_ms]


def load_ca(store: StoreSettings | None) -> StoreSettings | None:
    """The settings with the CA certificate read from `tls_ca_file`; raises ValueError."""
    if store is None or not store.tls_ca_file:
        return store
    try:
        pem = pathlib.Path(store.tls_ca_file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the store's CA certificate {store.tls_ca_file}: {exc.strerror}") from None
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError(f"{store.tls_ca_file} holds no PEM certificate (the store's CA)")
    return replace(store, tls_ca_pem=pem)


def shared_rules(route: Route) -> list[Rule]:
    """The effective rules that count through the store: fleet-scoped limits or a budget."""
    return [rule for rule in route.effective_rules() if rule.limits.scope == "fleet" or rule.budget is not None]


def uses_store(route: Route, store: StoreSettings | None) -> bool:
    return store is not None and bool(shared_rules(route))


def key_prefix(route: Route) -> str:
    # Namespaces hold no dots, so "vxp.NS.NAME" never collides across namespaces.
    return f"{KEY_PREFIX}.{route.namespace}.{route.name}"


def store_block(route: Route, store: StoreSettings | None, config_dir: str) -> dict[str, Any]:
    """The sidecar config's `store:` section, or {} when the route does not use one."""
    if store is None or not uses_store(route, store):
        return {}
    redis: dict[str, Any] = {"url": store.url}
    if store.password_secret is not None:
        redis["password_file"] = f"{STORE_PASSWORD_DIR}/{STORE_PASSWORD_FILE}"
    if store.tls_ca_pem:
        redis["tls_ca_file"] = f"{config_dir}/{STORE_CA_FILE}"
    if store.timeout_ms is not None:
        redis["timeout_ms"] = store.timeout_ms
    redis["key_prefix"] = key_prefix(route)
    return {"store": {"redis": redis}}


def config_files(route: Route, store: StoreSettings | None) -> dict[str, str]:
    """Extra files of the route's ConfigMap (beside config.yaml)."""
    if store is not None and store.tls_ca_pem and uses_store(route, store):
        return {STORE_CA_FILE: store.tls_ca_pem}
    return {}


def password_secret(route: Route, store: StoreSettings | None) -> SecretKey | None:
    """The Secret the sidecar mounts for the store's password, when the route uses the store."""
    return store.password_secret if store is not None and uses_store(route, store) else None


def _names(rules: list[Rule]) -> str:
    return ", ".join(rule.name for rule in rules)


def route_status(route: Route, store: StoreSettings | None) -> dict[str, Any]:
    """`status.limits` and (when budgets exist) `status.budget`."""
    rules = route.effective_rules()
    fleet = [r for r in rules if r.limits.scope == "fleet"]
    limited = [r for r in rules if r.limits.requests_per_minute or r.limits.tokens_per_minute]
    if fleet and store is not None:
        pod_only = [r for r in limited if r.limits.scope != "fleet"]
        message = (f"Requests and tokens per minute of {_names(fleet)} are shared by every sidecar of the route "
                   "(all pods, all replicas) through the store.")
        if pod_only:
            message += f" Those of {_names(pod_only)} are counted per pod."
        if store.password_secret is not None:
            message += (f" Sidecars mount the store's password from Secret {store.password_secret.secret_name!r}, "
                        "which must exist in this namespace.")
        limits = {"scope": "fleet", "message": message}
    elif fleet:
        limits = {"scope": "pod", "message": (
            f"limits.scope is fleet for {_names(fleet)}, but the operator has no store configured (chart value "
            "store.redis.url): the limits are counted per pod, each sidecar on its own, so N replicas admit N "
            "times the limit.")}
    elif limited:
        limits = {"scope": "pod", "message": (
            "Limits are counted per pod: each sidecar on its own, so N replicas admit N times the limit "
            "(set limits.scope: fleet to share them).")}
    else:
        limits = {"scope": "pod", "message": "No rate limits are set."}
    status: dict[str, Any] = {"limits": limits}
    budgeted = [r for r in rules if r.budget is not None]
    if budgeted:
        entries = []
        for rule in budgeted:
            assert rule.budget is not None
            amounts = [f"${amount:g}/{period}" for period, amount in
                       (("day", rule.budget.usd_per_day), ("month", rule.budget.usd_per_month)) if amount]
            entries.append(f"{rule.name}: {', '.join(amounts)} ({rule.budget.action})")
        if store is not None:
            budget = {"scope": "fleet", "budgets": entries, "message": (
                "Spend is counted once for every sidecar of the route through the store.")}
        else:
            budget = {"scope": "pod", "budgets": entries, "message": (
                "No store is configured (chart value store.redis.url): each sidecar counts only its own spend "
                "against the budget, per pod.")}
        status["budget"] = budget
    return status
