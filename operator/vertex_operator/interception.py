"""Zero-code-change mode on a pod: the environment that sends an app's HTTPS through the
sidecar's forward proxy (`spec.sidecar.interception: true`). Pure.

Every common runtime honours these without a code change:
- ``HTTPS_PROXY``/``https_proxy``: Python (httpx, requests, aiohttp with trust_env,
  websockets), Go, curl, Java via its wrappers, Node.js ≥ 24 with ``NODE_USE_ENV_PROXY=1``.
- ``NO_PROXY``/``no_proxy``: the container's own list is kept and extended with localhost
  and the cluster's own domains, so in-cluster calls stay direct.
- The CA bundle the proxy's certificates chain to: the same variables as with the TLS
  listener (`inject.CA_BUNDLE_ENV`, `inject.CA_EXTRA_ENV`: ``SSL_CERT_FILE``,
  ``REQUESTS_CA_BUNDLE``, ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``, ``NODE_EXTRA_CA_CERTS``).

A value the container sets itself wins (a developer can point one container elsewhere);
`overrides` lists them, for an admission warning and the route's status.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

PROXY_VARS = ("HTTPS_PROXY", "https_proxy")
NO_PROXY_VARS = ("NO_PROXY", "no_proxy")
CA_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
# In-cluster names and loopback never go through the proxy (the sidecar's own base URL included),
# nor the GKE metadata server: some clients (Node's gaxios) send even plain-http requests
# through HTTPS_PROXY, and the proxy refuses plain HTTP, so the app's own ADC would break.
NO_PROXY_DEFAULTS = ("localhost", "127.0.0.1", "::1", ".svc", ".svc.cluster.local", ".cluster.local",
                     "169.254.169.254", "metadata.google.internal")
ALL_VARS = frozenset((*PROXY_VARS, *NO_PROXY_VARS, "NODE_USE_ENV_PROXY", *CA_VARS))


def proxy_env(proxy_port: int) -> list[dict[str, str]]:
    """The proxy variables set when the container has none of its own (NO_PROXY: see
    `no_proxy_ops` for a container that has one)."""
    url = f"http://127.0.0.1:{proxy_port}"
    env = [{"name": name, "value": url} for name in PROXY_VARS]
    env += [{"name": name, "value": ",".join(NO_PROXY_DEFAULTS)} for name in NO_PROXY_VARS]
    env.append({"name": "NODE_USE_ENV_PROXY", "value": "1"})
    return env


def merged_no_proxy(value: str) -> str:
    """The container's NO_PROXY with our entries appended (each once, order kept)."""
    entries = [e.strip() for e in value.split(",") if e.strip()]
    return ",".join(dict.fromkeys([*entries, *NO_PROXY_DEFAULTS]))


def overrides(container: Mapping[str, Any], ours: Mapping[str, str]) -> list[str]:
    """The interception variables (`ours`: name → the value the webhook sets) this container
    sets to something else itself."""
    found = []
    for entry in container.get("env") or []:
        name = entry.get("name")
        if name in ours and name not in NO_PROXY_VARS and entry.get("value") != ours[name]:
            found.append(name)
        elif name in NO_PROXY_VARS and "value" not in entry:
            found.append(name)  # from a ConfigMap/Secret/field: cannot be extended
    return found


def no_proxy_ops(env: Sequence[Mapping[str, Any]] | None, path: str) -> list[dict[str, Any]]:
    """JSON-patch operations extending the NO_PROXY values the container has itself."""
    ops = []
    for index, entry in enumerate(env or []):
        if entry.get("name") in NO_PROXY_VARS and isinstance(entry.get("value"), str):
            merged = merged_no_proxy(entry["value"])
            if merged != entry["value"]:
                ops.append({"op": "replace", "path": f"{path}/{index}/value", "value": merged})
    return ops


def warning(container_name: str, names: Sequence[str]) -> str:
    return (f"container {container_name!r} sets {', '.join(names)} itself: its value wins, so its HTTPS calls may "
            "not go through the sidecar's proxy (or may not trust its CA)")
