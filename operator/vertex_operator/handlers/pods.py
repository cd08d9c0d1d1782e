"""The Pod CREATE mutating webhook: injects the sidecar of the route that selects the pod."""

from __future__ import annotations

from typing import Any

import jsonpatch
import kopf

from vertex_operator import metrics
from vertex_operator.controller import Controller, Indexes

WEBHOOK_ID = "inject-vertex-sidecar"  # also the URL path: POST /inject-vertex-sidecar


@kopf.on.mutate("", "v1", "pods", id=WEBHOOK_ID, operations=["CREATE"],
                # Unreachable operator: pods are created without the sidecar rather than
                # blocking every pod in the cluster (for kopf-managed configurations).
                ignore_failures=True, side_effects=False)
async def inject_sidecar(body: kopf.Body, patch: kopf.Patch, warnings: list[str], memo: Any,
                         logger: kopf.Logger, **kwargs: Any) -> None:
    controller: Controller = memo.controller
    pod = dict(body)
    namespace = body.metadata.namespace or ""
    indexes = Indexes(kwargs)
    try:
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
        metrics.ERRORS.labels("admission").inc()
        metrics.ADMISSIONS.labels("error").inc()
        raise
    warnings.extend(result.warnings)
    if result.injected:
        ops = result.patch
        # kopf diffs the transformed pod against the original to build its response patch.
        patch.fns.append(lambda raw: jsonpatch.apply_patch(raw, ops, in_place=True))
        metrics.ADMISSIONS.labels("injected").inc()
        logger.debug("Injecting the Vertex sidecar into a pod in %s.", namespace)
    else:
        metrics.ADMISSIONS.labels("warned" if result.warnings else "skipped").inc()
