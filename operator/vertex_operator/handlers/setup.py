"""Operator-wide settings and startup/cleanup."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from vertex_operator.controller import Controller
from vertex_operator.crd import FINALIZER, PREFIX


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: Any, logger: kopf.Logger,
                    **_: Any) -> None:
    controller: Controller = memo.controller
    options = controller.options
    # Our own prefix everywhere kopf persists something, and only on our own resources:
    # workloads are watched through indexes/events, which never write to them.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration")
    # Handler warnings and errors also become Kubernetes Events of the route
    # (`kubectl describe vxr`); routine messages stay in the operator's log.
    settings.posting.loggers = True
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "vertex-operator"
    # CRDs come with the chart before the operator starts; no need to watch for new ones.
    settings.scanning.disabled = True
    # The webhook is served by the serving half (handlers.serving), in every replica.
    logger.info("vertex-operator ready (Kubernetes %s, default sidecar image %s).",
                ".".join(map(str, controller.server_version or ())) or "version unknown",
                options.sidecar_image)

