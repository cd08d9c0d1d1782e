"""The operator's own writes to the cluster, through the official `kubernetes` client.

kopf does the watching; this module does the few reads and writes that are not a
handler's own patch: ConfigMaps, service accounts, pod-template annotations of workloads,
route and credential status, Config Connector objects.
The client is synchronous, so every call runs in a worker thread. Objects go in and
come out as plain dicts (no generated models), and patches are sent explicitly as
JSON merge patches.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from typing import Any, Callable, Mapping

import kubernetes.client
import kubernetes.config
from kubernetes.client.exceptions import ApiException

from vertex_operator import __version__
from vertex_operator.crd import CREDENTIAL_PLURAL, GROUP, ROUTE_PLURAL, VERSION

logger = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
USER_AGENT = f"vertex-operator/{__version__}"

WORKLOAD_PATCHERS = {
    "Deployment": "patch_namespaced_deployment",
    "StatefulSet": "patch_namespaced_stateful_set",
    "DaemonSet": "patch_namespaced_daemon_set",
}


# Client methods that write (the leader fence applies to them; Lease writes use `_lease_call`).
WRITE_PREFIXES = ("create_", "patch_", "replace_", "delete_")


def load_configuration() -> kubernetes.client.Configuration:
    """In-cluster service account first, then KUBECONFIG / ~/.kube/config."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        # The client reads KUBECONFIG when it is imported; read it now, at startup.
        path = os.environ.get("KUBECONFIG")
        single = path if path and os.pathsep not in path else None
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=single, client_configuration=configuration)
    return configuration


class Kube:
    def __init__(self, configuration: kubernetes.client.Configuration | None = None) -> None:
        self.api_client = kubernetes.client.ApiClient(configuration or load_configuration())
        # A distinct user agent keeps the operator's requests apart in audit logs (and tests).
        self.api_client.user_agent = USER_AGENT
        self.core = kubernetes.client.CoreV1Api(self.api_client)
        self.apps = kubernetes.client.AppsV1Api(self.api_client)
        self.custom = kubernetes.client.CustomObjectsApi(self.api_client)
        self.version = kubernetes.client.VersionApi(self.api_client)
        self.coordination = kubernetes.client.CoordinationV1Api(self.api_client)
        # The leader-election fence: called before every reconciling write (raises to refuse).
        self.write_guard: Callable[[], None] | None = None
        self.lease_timeout = 5.0  # seconds; a hung Lease request must not outlast the renew deadline

    def close(self) -> None:
        self.api_client.close()  # type: ignore[no-untyped-call]

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.write_guard is not None and fn.__name__.startswith(WRITE_PREFIXES):
            self.write_guard()
        # Raw JSON instead of generated models: what we read, we compare and patch as dicts.
        response = await asyncio.to_thread(fn, *args, _preload_content=False, **kwargs)
        data = response.data
        return json.loads(data) if data else None

    async def _get(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any] | None:
        """A read that answers None for 404."""
        try:
            found: dict[str, Any] = await self._call(fn, *args)
            return found
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def _delete(self, fn: Callable[..., Any], *args: Any) -> bool:
        """A delete that answers False when the object is already gone."""
        try:
            await self._call(fn, *args)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    async def server_version(self) -> tuple[int, int] | None:
        try:
            info = await self._call(self.version.get_code)
            return int(info["major"]), int(re.sub(r"\D.*$", "", str(info["minor"])))
        except (ApiException, KeyError, ValueError, TypeError) as exc:
            logger.warning("Cannot read the Kubernetes version (%s); nativeSidecar: auto means off.", exc)
            return None

    # ------------------------------------------------------------------ leases (leader election)

    async def _lease_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # Never fenced: this is how a replica becomes the leader.
        response = await asyncio.to_thread(fn, *args, _preload_content=False,
                                           _request_timeout=self.lease_timeout, **kwargs)
        return json.loads(response.data) if response.data else None

    async def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = await self._lease_call(self.coordination.read_namespaced_lease, name, namespace)
            return found
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def create_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = await self._lease_call(self.coordination.create_namespaced_lease, namespace,
                                                         dict(body))
        return created

    async def replace_lease(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        replaced: dict[str, Any] = await self._lease_call(self.coordination.replace_namespaced_lease, name,
                                                          namespace, dict(body))
        return replaced

    # ------------------------------------------------------------------ configmaps

    async def read_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(self.core.read_namespaced_config_map, name, namespace)

    async def create_config_map(self, namespace: str, body: Mapping[str, Any]) -> None:
        await self._call(self.core.create_namespaced_config_map, namespace, dict(body))

    async def patch_config_map(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        await self._call(self.core.patch_namespaced_config_map, name, namespace, dict(patch),
                         _content_type=MERGE_PATCH)

    # ------------------------------------------------------------------ namespaces

    async def read_namespace(self, name: str) -> dict[str, Any] | None:
        return await self._get(self.core.read_namespace, name)

    # ------------------------------------------------------------------ service accounts

    async def read_namespace(self, name: str) -> dict[str, Any] | None:
        return await self._get(self.core.read_namespace, name)

    async def read_service_account(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(self.core.read_namespaced_service_account, name, namespace)

    async def create_service_account(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = await self._call(self.core.create_namespaced_service_account, namespace, dict(body))
        return created

    async def patch_service_account(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        await self._call(self.core.patch_namespaced_service_account, name, namespace, dict(patch),
                         _content_type=MERGE_PATCH)

    async def delete_service_account(self, namespace: str, name: str) -> bool:
        return await self._delete(self.core.delete_namespaced_service_account, name, namespace)

    # ------------------------------------------------------------------ workloads

    async def patch_template_annotations(self, kind: str, namespace: str, name: str,
                                         annotations: Mapping[str, str | None]) -> bool:
        """Merge-patch the pod template's annotations; False if the workload is gone."""
        patch = {"spec": {"template": {"metadata": {"annotations": dict(annotations)}}}}
        fn = getattr(self.apps, WORKLOAD_PATCHERS[kind])
        try:
            await self._call(fn, name, namespace, patch, _content_type=MERGE_PATCH)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    # ------------------------------------------------------------------ custom resources

    async def _patch_status(self, plural: str, namespace: str, name: str, status: Mapping[str, Any]) -> bool:
        try:
            await self._call(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace,
                             plural, name, {"status": dict(status)}, _content_type=MERGE_PATCH)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    async def patch_route_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> bool:
        return await self._patch_status(ROUTE_PLURAL, namespace, name, status)

    async def patch_credential_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> bool:
        return await self._patch_status(CREDENTIAL_PLURAL, namespace, name, status)

    # Other operators' custom resources (Config Connector's IAMPolicyMember).

    async def read_custom(self, group: str, version: str, plural: str, namespace: str,
                          name: str) -> dict[str, Any] | None:
        return await self._get(self.custom.get_namespaced_custom_object, group, version, namespace, plural, name)

    async def create_custom(self, group: str, version: str, plural: str, namespace: str,
                            body: Mapping[str, Any]) -> dict[str, Any]:
        """Raises ApiException 404 when the resource type is not installed."""
        created: dict[str, Any] = await self._call(self.custom.create_namespaced_custom_object, group, version,
                                                   namespace, plural, dict(body))
        return created

    async def delete_custom(self, group: str, version: str, plural: str, namespace: str, name: str) -> bool:
        return await self._delete(self.custom.delete_namespaced_custom_object, group, version, namespace,
                                  plural, name)

    async def list_custom_keys(self, plural: str, kind: str, namespaces: tuple[str, ...] = ()) -> set[tuple[str, str, str]]:
        """(kind, namespace, name) of our custom resources: in `namespaces`, or everywhere."""
        pages = ([await self._call(self.custom.list_namespaced_custom_object, GROUP, VERSION, ns, plural)
                  for ns in namespaces] if namespaces
                 else [await self._call(self.custom.list_cluster_custom_object, GROUP, VERSION, plural)])
        return {(kind, (item.get("metadata") or {}).get("namespace") or "", (item.get("metadata") or {}).get("name") or "")
                for page in pages for item in (page or {}).get("items") or []}

    async def list_pods(self, namespace: str) -> list[dict[str, Any]]:
        found = await self._call(self.core.list_namespaced_pod, namespace)
        return list((found or {}).get("items") or [])

    async def create_event(self, namespace: str, body: Mapping[str, Any]) -> None:
        await self._call(self.core.create_namespaced_event, namespace, dict(body))
