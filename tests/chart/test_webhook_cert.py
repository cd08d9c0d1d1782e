"""The chart-generated webhook certificate across upgrades, with helm's `lookup` answered by
an API server: `helm template --dry-run=server` against the operator tests' emulator.

First render: no Secret, so a CA and certificate are generated. After "installing" that
Secret, upgrades reuse it (same caBundle, same pod-template checksum: no operator restart),
until it is close to expiry or was issued for another Service name.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import kmock
import pytest
import pytest_asyncio
import yaml

from tests.chart.tools import NAMESPACE, helm_path, one, render_args
from tests.operator.harness import KubeEmulator

# kmock 0.8 loads its bundled discovery data with a deprecated importlib call.
pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

NOT_AFTER = "vertex.passthrough.dev/not-after"
ISSUED_FOR = "vertex.passthrough.dev/issued-for"


class Api:
    def __init__(self, url: str, kubeconfig: Path) -> None:
        self.url = url
        self.kubeconfig = kubeconfig

    async def render(self, *sets: str) -> list[dict[str, Any]]:
        process = await asyncio.create_subprocess_exec(
            helm_path(), *render_args(sets=sets), "--dry-run=server",
            env={"KUBECONFIG": str(self.kubeconfig), "HOME": str(self.kubeconfig.parent), "PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode == 0, err.decode()
        return [d for d in yaml.safe_load_all(out) if d]

    async def put_secret(self, secret: dict[str, Any]) -> None:
        """Store the rendered Secret as `helm install` would (replacing an earlier one)."""
        base = f"{self.url}/api/v1/namespaces/{NAMESPACE}/secrets"
        async with aiohttp.ClientSession() as session:
            await session.delete(f"{base}/{secret['metadata']['name']}")
            async with session.post(base, json=secret) as response:
                assert response.status == 201, await response.text()


@pytest_asyncio.fixture()
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    helm_path()  # skip (or fail in CI) before starting anything
    async with KubeEmulator() as emulator, kmock.Server(emulator):
        url = str(emulator.url).rstrip("/")
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }))
        yield Api(url, kubeconfig)


def parts(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], str, str]:
    """(Secret, the webhook's caBundle, the operator pod's certificate checksum)."""
    secret = one(docs, "Secret")
    (hook,) = one(docs, "MutatingWebhookConfiguration")["webhooks"]
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    return secret, hook["clientConfig"]["caBundle"], annotations["checksum/webhook-cert"]


async def test_first_install_generates_then_upgrades_reuse(api: Api) -> None:
    secret, ca_bundle, _ = parts(await api.render())
    assert ca_bundle == secret["data"]["ca.crt"]
    await api.put_secret(secret)
    for _ in range(2):
        again, bundle, checksum = parts(await api.render())
        assert again["data"] == secret["data"] and bundle == ca_bundle
        assert again["metadata"]["annotations"] == secret["metadata"]["annotations"]
        # Unchanged certificate, unchanged pod template: an upgrade does not restart the operator.
        assert checksum == hashlib.sha256(secret["data"]["tls.crt"].encode()).hexdigest()


@pytest.mark.parametrize("change", ["expiring", "other-service", "incomplete"])
async def test_renewed_when_it_no_longer_fits(api: Api, change: str) -> None:
    secret, _, _ = parts(await api.render())
    stale = copy.deepcopy(secret)
    if change == "expiring":  # fewer than 30 days left
        stale["metadata"]["annotations"][NOT_AFTER] = str(int(time.time()) + 10 * 86400)
    elif change == "other-service":  # e.g. a fullnameOverride changed the Service name
        stale["metadata"]["annotations"][ISSUED_FOR] = f"old-webhook.{NAMESPACE}.svc"
    else:
        del stale["data"]["ca.crt"]
    await api.put_secret(stale)
    renewed, bundle, checksum = parts(await api.render())
    assert renewed["data"]["tls.crt"] != stale["data"]["tls.crt"]
    assert bundle == renewed["data"]["ca.crt"]
    assert checksum != hashlib.sha256(stale["data"]["tls.crt"].encode()).hexdigest()
    assert int(renewed["metadata"]["annotations"][NOT_AFTER]) > time.time() + 365 * 86400
    assert base64.b64decode(renewed["data"]["tls.key"]).startswith(b"-----BEGIN")


async def test_cert_manager_mode_looks_nothing_up(api: Api) -> None:
    docs = await api.render("webhook.certManager.enabled=true")
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert "checksum/webhook-cert" not in (one(docs, "Deployment")["spec"]["template"]["metadata"]
                                           .get("annotations") or {})
