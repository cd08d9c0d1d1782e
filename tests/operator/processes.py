"""Real operator processes (`python -m vertex_operator.cli`) against the emulated API server.

Used where a thread will not do: SIGKILL, several replicas electing a leader, the webhook
of every replica. Each process gets its own ports, identity and log file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import signal
import socket
import ssl
import subprocess
import sys
import uuid
from typing import Any

import aiohttp

from vertex_operator.handlers.pods import WEBHOOK_ID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class OperatorProcess:
    identity: str
    proc: subprocess.Popen[bytes]
    webhook_port: int
    readiness_port: int
    metrics_port: int
    log: pathlib.Path

    @property
    def webhook_url(self) -> str:
        return f"https://127.0.0.1:{self.webhook_port}/{WEBHOOK_ID}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    async def _get(self, path: str) -> tuple[int, dict[str, Any]]:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
                async with session.get(f"http://127.0.0.1:{self.readiness_port}{path}") as response:
                    return response.status, await response.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return 0, {}

    async def ready(self) -> bool:
        return (await self._get("/readyz"))[0] == 200

    async def leading(self) -> bool:
        status, body = await self._get("/leader")
        return status == 200 and bool(body.get("leading"))

    async def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        from prometheus_client.parser import text_string_to_metric_families

        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
                async with session.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as response:
                    text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and (labels or {}).items() <= sample.labels.items():
                    return float(sample.value)
        return None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float = 30) -> int:
        # In a thread: the API server these processes talk to runs on the caller's loop.
        return await asyncio.to_thread(self.proc.wait, timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def start_process(kubeconfig: pathlib.Path, tls: dict[str, pathlib.Path], folder: pathlib.Path, identity: str,
                  *, lease: tuple[float, float, float] = (2.0, 1.5, 0.2), extra: tuple[str, ...] = (),
                  env: dict[str, str] | None = None) -> OperatorProcess:
    ports = free_port(), free_port(), free_port()
    log = folder / f"{identity}.log"
    args = [
        sys.executable, "-m", "vertex_operator.cli", "--all-namespaces", "--verbose",
        "--operator-namespace", "vertex-system", "--identity", identity,
        "--lease-duration", str(lease[0]), "--renew-deadline", str(lease[1]), "--retry-period", str(lease[2]),
        "--webhook-addr", "127.0.0.1", "--webhook-port", str(ports[0]), "--webhook-host", "127.0.0.1",
        "--webhook-cert", str(tls["cert"]), "--webhook-key", str(tls["key"]),
        "--readiness-addr", "127.0.0.1", "--readiness-port", str(ports[1]),
        "--metrics-addr", "127.0.0.1", "--metrics-port", str(ports[2]),
        "--sidecar-image", "registry.test/vertex-sidecar:test", "--resync-interval", "3600",
        *extra,
    ]
    environment = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1", **(env or {})}
    environment.pop("KUBERNETES_SERVICE_HOST", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=environment)
    return OperatorProcess(identity, proc, ports[0], ports[1], ports[2], log)


def pod_review(namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()), "operation": "CREATE", "namespace": namespace,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"generateName": "chat-", "namespace": namespace, "labels": labels},
                       "spec": {"containers": [{"name": "app", "image": "app:1"}]}},
        },
    }


async def admit(session: aiohttp.ClientSession, url: str, ca: ssl.SSLContext, review: dict[str, Any]) -> bool:
    """Whether the webhook at `url` injected the sidecar into the pod of `review`."""
    try:
        async with session.post(url, json=review, ssl=ca) as response:
            if response.status != 200:
                return False
            answer = json.loads(await response.text()).get("response") or {}
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return False
    return bool(answer.get("allowed")) and answer.get("uid") == review["request"]["uid"] and "patch" in answer
