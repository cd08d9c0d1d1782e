"""The Pod CREATE mutating webhook: injects the sidecar of the route that selects the pod."""

from __future__ import annotations

import time
from typing import Any

import jsonpatch
import kopf

from vertex_operator import metrics
from vertex_operator.controller import Controller, Indexes
from vertex_operator.handlers.serving import SERVING

WEBHOOK_ID = "inject-vertex-sidecar"  # also the URL path: POST /inject-vertex-sidecar
# The operator's own readiness probe sends real AdmissionReviews with this header; they
# are answered like any other but not counted in the metrics.
PROBE_HEADER = "X-Vertex-Readiness-Probe"


@kopf.on.mutate("", "v1", "pods", id=WEBHOOK_ID, operations=["CREATE"],
                # Unreachable operator: pods are created without the sidecar rather than
                # blocking every pod in the cluster (for kopf-managed configurations).
                ignore_failures=True, side_effects=False, registry=SERVING)
async def inject_sidecar(body: kopf.Body, patch: kopf.Patch, warnings: list[str], memo: Any,
                         logger: kopf.Logger, headers: kopf.Headers, **kwargs: Any) -> None:
    controller: Controller = memo.controller
    probe = any(k.lower() == PROBE_HEADER.lower() for k in headers)
    started = time.perf_counter()
    indexes = Indexes(kwargs)
    pod = dict(body)
    namespace = body.metadata.namespace or ""
    try:
        if not await controller.index_sync.check(indexes.admission_keys):
            # Refused rather than guessed: with failurePolicy Fail the pod is retried by its
            # controller (and lands on a replica that is in sync); see index_sync.
            raise kopf.AdmissionError(
                f"vertex-operator is still loading VertexRoutes and VertexCredentials "
                f"({len(controller.index_sync.missing)} not yet indexed); retry shortly", code=503)
        team = await controller.namespace_team(namespace) if controller.selects(pod, namespace, indexes) else None
        result = controller.admit(pod, namespace, indexes, team=team)
        if result.service_account:
            # Switched to the credential's account: it brings its own imagePullSecrets.
            secrets, problem = await controller.pull_secrets(namespace, result.service_account)
            if secrets:
                result = controller.admit(pod, namespace, indexes, pull_secrets=secrets, team=team)
            if problem:
                result.warnings.append(problem)
    except Exception:
        if not probe:
            metrics.ERRORS.labels("admission").inc()
            metrics.ADMISSIONS.labels("error").inc()
            metrics.ADMISSION_DURATION.observe(time.perf_counter() - started)
        raise
    warnings.extend(result.warnings)
    if result.injected:
        ops = result.patch
        # kopf diffs the transformed pod against the original to build its response patch.
        patch.fns.append(lambda raw: jsonpatch.apply_patch(raw, ops, in_place=True))
        logger.debug("Injecting the Vertex sidecar into a pod in %s.", namespace)
    if probe:
        return
    metrics.ADMISSION_DURATION.observe(time.perf_counter() - started)
    if result.injected:
        metrics.ADMISSIONS.labels("injected").inc()
        metrics.ADMISSION_PATCHES.inc(len(result.patch))
    else:
        metrics.ADMISSIONS.labels("warned" if result.warnings else "skipped").inc()
