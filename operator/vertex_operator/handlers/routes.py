"""VertexRoute lifecycle, and the events elsewhere that change what a route must do.

Every trigger ends in the same level-based `Controller.sync(namespace)`, serialized per
namespace, which writes only what differs. Route handlers raise on API errors, so kopf
retries them (with a growing delay); event handlers for credentials and workloads cannot
be retried by kopf, which is what the periodic resync daemon is for.
"""

from __future__ import annotations

from typing import Any

import kopf

from vertex_operator.controller import (
    RETRY_BACKOFF, Controller, Indexes, SyncError, describe_error, retry_delay,
)
from vertex_operator.crd import (
    CONFIG_HASH_ANNOTATION, CREDENTIAL_PLURAL, GROUP, ROUTE_PLURAL, VERSION,
)
from vertex_operator.selection import workload_from_body

WORKLOAD_KINDS = {"deployments": "Deployment", "statefulsets": "StatefulSet", "daemonsets": "DaemonSet"}


@kopf.on.resume(GROUP, VERSION, ROUTE_PLURAL, backoff=RETRY_BACKOFF)
@kopf.on.create(GROUP, VERSION, ROUTE_PLURAL, backoff=RETRY_BACKOFF)
@kopf.on.update(GROUP, VERSION, ROUTE_PLURAL, backoff=RETRY_BACKOFF)
async def route_changed(namespace: str | None, retry: int, memo: Any, **kwargs: Any) -> None:
    controller: Controller = memo.controller
    try:
        await controller.sync(namespace or "", Indexes(kwargs), trigger="route")
    except Exception as exc:
        raise kopf.TemporaryError(f"Syncing namespace {namespace} failed: {describe_error(exc)}",
                                  delay=retry_delay(retry)) from exc


@kopf.on.delete(GROUP, VERSION, ROUTE_PLURAL, backoff=RETRY_BACKOFF)
async def route_deleted(namespace: str | None, uid: str, retry: int, memo: Any, logger: kopf.Logger,
                        **kwargs: Any) -> None:
    # The index already holds the route with its deletionTimestamp, so this sync no longer
    # counts it: its workloads go to the next route in line or roll back to no sidecar.
    # The ConfigMap is garbage-collected through its owner reference.
    controller: Controller = memo.controller
    try:
        await controller.sync(namespace or "", Indexes(kwargs), trigger="route-deleted")
    except SyncError as exc:
        if not exc.permanent:
            raise kopf.TemporaryError(f"Syncing namespace {namespace} failed: {describe_error(exc)}",
                                      delay=retry_delay(retry)) from exc
        # Refused for good (RBAC, an admission policy, validation): retrying would hold the
        # route's finalizer forever. Let the deletion finish and say what was left behind.
        logger.warning("Deleting the route left writes undone that the API server refused: %s. Workloads it "
                       "served may keep the pod-template annotation %s; remove it by hand if they should "
                       "roll back to no sidecar.", exc, CONFIG_HASH_ANNOTATION)
    except Exception as exc:
        raise kopf.TemporaryError(f"Syncing namespace {namespace} failed: {describe_error(exc)}",
                                  delay=retry_delay(retry)) from exc
    controller.forget(uid)


@kopf.daemon(GROUP, VERSION, ROUTE_PLURAL, cancellation_timeout=1.0)
async def route_resync(stopped: kopf.DaemonStopped, namespace: str | None, uid: str, memo: Any,
                       logger: kopf.Logger, **kwargs: Any) -> None:
    """Re-converge now and then: repairs ConfigMaps edited by hand and missed events."""
    controller: Controller = memo.controller
    while not stopped:
        await stopped.wait(controller.options.resync_seconds)
        if stopped:
            break
        controller.forget(uid)
        try:
            await controller.sync(namespace or "", Indexes(kwargs), trigger="resync")
        except Exception as exc:  # the next round retries; kopf would stop the daemon
            logger.warning("Periodic resync of namespace %s failed: %s", namespace, exc)


@kopf.on.event(GROUP, VERSION, CREDENTIAL_PLURAL)
async def credential_changed(name: str, namespace: str | None, memo: Any, logger: kopf.Logger,
                             **kwargs: Any) -> None:
    """A credential appeared, changed, became Ready or went away: re-sync its routes."""
    controller: Controller = memo.controller
    indexes = Indexes(kwargs)
    ns = namespace or ""
    if any(r.route is not None and r.route.credential_name == name for r in indexes.routes(ns)):
        try:
            await controller.sync(ns, indexes, trigger="credential")
        except Exception as exc:
            logger.warning("Re-syncing the routes of namespace %s failed: %s", namespace, exc)


@kopf.on.event("apps", "v1", "deployments", id="workload_changed")
@kopf.on.event("apps", "v1", "statefulsets", id="workload_changed")
@kopf.on.event("apps", "v1", "daemonsets", id="workload_changed")
async def workload_changed(body: kopf.Body, type: str, namespace: str | None, resource: kopf.Resource,
                           memo: Any, logger: kopf.Logger, **kwargs: Any) -> None:
    """Labels, annotations or injectability of a workload changed: re-sync its namespace."""
    controller: Controller = memo.controller
    workload = workload_from_body(WORKLOAD_KINDS[resource.plural], body)
    if not controller.workload_changed(workload, deleted=type == "DELETED"):
        return  # a status-only update (replica counts during rollouts): nothing to do
    indexes = Indexes(kwargs)
    ns = namespace or ""
    if not indexes.routes(ns) and CONFIG_HASH_ANNOTATION not in workload.template_annotations:
        return
    try:
        await controller.sync(ns, indexes, trigger="workload")
    except Exception as exc:
        logger.warning("Re-syncing namespace %s after a %s change failed: %s", namespace, workload.ref, exc)


@kopf.daemon(GROUP, VERSION, ROUTE_PLURAL, cancellation_timeout=1.0)
async def route_repair(stopped: kopf.DaemonStopped, namespace: str | None, memo: Any, logger: kopf.Logger,
                       **kwargs: Any) -> None:
    """Now and then: running pods the route selects without the (current) sidecar are reported,
    and with spec.rollout.repair their workloads restarted (see vertex_operator.repair)."""
    controller: Controller = memo.controller
    while not stopped:
        await stopped.wait(controller.options.repair_seconds)
        if stopped:
            break
        indexes = Indexes(kwargs)
        try:
            if await controller.scan_pods(namespace or "", indexes):
                await controller.sync(namespace or "", indexes, trigger="repair")
        except Exception as exc:  # the next round retries; kopf would stop the daemon
            logger.warning("Checking the pods of namespace %s failed: %s", namespace, describe_error(exc))
