"""The admission webhook server: kopf's HTTPS server with two additions.

* The API server may leave `metadata.namespace` empty in the object of a Pod CREATE
  review (pods of ReplicaSets are named and placed only later); the review's own
  `request.namespace` is authoritative, so it is copied into the object first.
* The URL actually served is recorded (and signalled across threads), so that tests and
  logs know the port when it was chosen by the OS.
"""

from __future__ import annotations

import threading
from typing import Any, AsyncIterator

import kopf
from kopf._cogs.structs.reviews import (  # kopf's own protocol types (not re-exported)
    Request, Response, WebhookClientConfig, WebhookFn,
)

from vertex_operator.options import Options


def fill_namespace(review: dict[str, Any]) -> None:
    """Copy `request.namespace` into the reviewed object when the object has none."""
    request = review.get("request")
    if not isinstance(request, dict):
        return
    namespace = request.get("namespace")
    obj = request.get("object")
    if namespace and isinstance(obj, dict):
        meta = obj.setdefault("metadata", {})
        if isinstance(meta, dict) and not meta.get("namespace"):
            meta["namespace"] = namespace


class AdmissionServer(kopf.WebhookServer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url: str | None = None
        self.ready = threading.Event()

    async def __call__(self, fn: WebhookFn) -> AsyncIterator[WebhookClientConfig]:
        async def with_namespace(request: Request, *, webhook: str | None = None,
                                 headers: dict[str, str] | None = None,
                                 sslpeer: dict[str, Any] | None = None) -> Response:
            fill_namespace(request)  # type: ignore[arg-type]
            return await fn(request, webhook=webhook, headers=headers, sslpeer=sslpeer)

        async for client_config in super().__call__(with_namespace):
            self.url = client_config.get("url")
            self.ready.set()
            yield client_config


def build_server(options: Options) -> AdmissionServer | None:
    if not options.webhook:
        return None
    return AdmissionServer(
        addr=options.webhook_addr,
        port=options.webhook_port,
        host=options.webhook_host,
        certfile=options.webhook_cert,
        pkeyfile=options.webhook_key,
        cafile=options.webhook_ca,
    )
