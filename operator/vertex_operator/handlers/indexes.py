"""In-memory indexes, all keyed by namespace; kopf keeps them current from watch events.

Index handlers never write to the objects, which is why workloads are only indexed
(and watched with `on.event` in `routes`), never given create/update handlers.
"""

from __future__ import annotations

from typing import Any

import kopf

from vertex_operator.crd import CREDENTIAL_PLURAL, GROUP, ROUTE_PLURAL, VERSION
from vertex_operator.reconcile import CredentialRecord, RouteRecord, credential_record, route_record
from vertex_operator.selection import Workload, workload_from_body


@kopf.index(GROUP, VERSION, ROUTE_PLURAL)
def vertexroute_index(body: kopf.Body, namespace: str | None, **_: Any) -> dict[str, RouteRecord]:
    return {namespace or "": route_record(body)}


@kopf.index(GROUP, VERSION, CREDENTIAL_PLURAL)
def vertexcredential_index(body: kopf.Body, namespace: str | None, **_: Any) -> dict[str, CredentialRecord]:
    return {namespace or "": credential_record(body)}


@kopf.index("apps", "v1", "deployments")
def deployment_index(body: kopf.Body, namespace: str | None, **_: Any) -> dict[str, Workload]:
    return {namespace or "": workload_from_body("Deployment", body)}


@kopf.index("apps", "v1", "statefulsets")
def statefulset_index(body: kopf.Body, namespace: str | None, **_: Any) -> dict[str, Workload]:
    return {namespace or "": workload_from_body("StatefulSet", body)}


@kopf.index("apps", "v1", "daemonsets")
def daemonset_index(body: kopf.Body, namespace: str | None, **_: Any) -> dict[str, Workload]:
    return {namespace or "": workload_from_body("DaemonSet", body)}
