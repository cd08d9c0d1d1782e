"""`GET /readyz`: ready means "this replica answers AdmissionReviews correctly, now".

The check is a real AdmissionReview (a probe pod) sent over HTTPS to the replica's own
webhook server, which answers it like any other: 200 only when the TLS listener is up, the
event loop responds and the indexes are complete (the webhook refuses until they are,
see `index_sync`). The Service, and so the API server, only call ready replicas.
`GET /healthz` is plain liveness of this server; `GET /leader` says who reconciles.
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.parse
import uuid
from typing import Any, Callable

import aiohttp
import aiohttp.web

logger = logging.getLogger(__name__)

PROBE_NAMESPACE = "vertex-readiness-probe"  # no route lives there: the answer is never a patch


def probe_review(uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid, "operation": "CREATE", "namespace": PROBE_NAMESPACE,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "userInfo": {"username": "system:vertex-operator:readiness-probe"},
            "object": {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "readiness-probe", "namespace": PROBE_NAMESPACE},
                       "spec": {"containers": [{"name": "probe", "image": "probe"}]}},
            "dryRun": True,
        },
    }


def local_url(served_url: str, path: str) -> str:
    """The webhook's own URL on loopback (the served URL names the Service or 0.0.0.0)."""
    port = urllib.parse.urlsplit(served_url).port or 443
    return f"https://127.0.0.1:{port}/{path.lstrip('/')}"


async def ask_webhook(url: str, header: str, timeout: float = 2.0) -> str | None:
    """None when the webhook answered the probe review correctly, else why not."""
    uid = str(uuid.uuid4())
    context = ssl.create_default_context()
    context.check_hostname = False  # our own listener: its name is the Service's, not 127.0.0.1
    context.verify_mode = ssl.CERT_NONE
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.post(url, json=probe_review(uid), headers={header: "1"}, ssl=context) as response:
                text = await response.text()
                if response.status != 200:
                    return f"the webhook answered HTTP {response.status}: {text[:200]}"
                answer = json.loads(text).get("response") or {}
    except Exception as exc:
        return f"the webhook did not answer: {exc!r}"
    if answer.get("uid") != uid:
        return "the webhook answered another review"
    if not answer.get("allowed"):
        return f"the webhook refused: {(answer.get('status') or {}).get('message', '')}"
    return None


class ReadinessServer:
    def __init__(self, addr: str, port: int, *, webhook_url: Callable[[], str | None] | None,
                 serving: Callable[[], bool], leader: Callable[[], dict[str, Any]]) -> None:
        self.addr, self.requested_port = addr, port
        self.port: int | None = None
        self._webhook_url = webhook_url
        self._serving = serving
        self._leader = leader
        self._runner: aiohttp.web.AppRunner | None = None

    async def check(self) -> str | None:
        """None when ready, else why not."""
        if not self._serving():
            return "the operator is starting"
        if self._webhook_url is None:
            return None  # --no-webhook: nothing to answer
        from vertex_operator.handlers.pods import PROBE_HEADER, WEBHOOK_ID

        served = self._webhook_url()
        if not served:
            return "the webhook server is not listening yet"
        return await ask_webhook(local_url(served, WEBHOOK_ID), PROBE_HEADER)

    async def _readyz(self, _: aiohttp.web.Request) -> aiohttp.web.Response:
        problem = await self.check()
        if problem is not None:
            return aiohttp.web.json_response({"ready": False, "reason": problem}, status=503)
        return aiohttp.web.json_response({"ready": True})

    async def _healthz(self, _: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"alive": True})

    async def _leaderz(self, _: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response(self._leader())

    async def start(self) -> int:
        app = aiohttp.web.Application()
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/leader", self._leaderz)
        self._runner = aiohttp.web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, self.addr, self.requested_port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
