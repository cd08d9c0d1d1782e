"""The test-side API server: the kmock 0.8 gaps it fills behave as the API server does."""

from __future__ import annotations

import asyncio
import json

import kubernetes.client

from tests.operator import objects as o
from tests.operator.conftest import Cluster
from tests.operator.harness import KubeEmulator, selector_matches


async def test_metadata_and_generation(cluster: Cluster) -> None:
    await cluster.create(o.namespace())
    created = await cluster.create(o.route())
    meta = created["metadata"]
    assert meta["namespace"] == o.NS and meta["uid"] and meta["generation"] == 1
    assert meta["creationTimestamp"].endswith("Z") and int(meta["resourceVersion"]) > 0
    labelled = await cluster.patch("VertexRoute", o.NS, "gemini", {"metadata": {"labels": {"a": "b"}}})
    assert labelled["metadata"]["generation"] == 1
    assert int(labelled["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    changed = await cluster.patch("VertexRoute", o.NS, "gemini", {"spec": {"match": {"models": ["x"]}}})
    assert changed["metadata"]["generation"] == 2
    same = await cluster.patch("VertexRoute", o.NS, "gemini", {"spec": {"match": {"models": ["x"]}}})
    assert same["metadata"]["resourceVersion"] == changed["metadata"]["resourceVersion"]


async def test_status_subresource(cluster: Cluster) -> None:
    await cluster.create(o.namespace())
    body = o.route()
    body["status"] = {"selectedWorkloads": 9}
    assert "status" not in await cluster.create(body)
    main = await cluster.patch("VertexRoute", o.NS, "gemini", {"status": {"selectedWorkloads": 1}})
    assert "status" not in main
    status = await cluster.patch("VertexRoute", o.NS, "gemini",
                                 {"status": {"selectedWorkloads": 2}, "spec": {"credentialRef": {"name": "x"}}},
                                 status=True)
    assert status["status"] == {"selectedWorkloads": 2}
    assert status["spec"]["credentialRef"] == {"name": "vertex"}
    assert status["metadata"]["generation"] == 1


async def test_patch_types_follow_the_content_type(kube: KubeEmulator, cluster: Cluster) -> None:
    await cluster.create(o.namespace())
    await cluster.create(o.deployment())
    url = "/apis/apps/v1/namespaces/team-a/deployments/chat"
    async with kube.patch(url, data=json.dumps({"metadata": {}}),
                          headers={"Content-Type": "application/json-patch+json"}) as response:
        assert response.status == 400  # an object is not a JSON patch
    async with kube.patch(url, data=json.dumps({"spec": {"replicas": 3}}),
                          headers={"Content-Type": "application/apply-patch+yaml"}) as response:
        assert response.status == 415
    patched = await cluster._call(cluster.apps.patch_namespaced_deployment, "chat", o.NS,
                                  [{"op": "add", "path": "/metadata/labels", "value": {"x": "y"}}])
    assert patched["metadata"]["labels"] == {"x": "y"}
    merged = await cluster.patch("Deployment", o.NS, "chat", {"metadata": {"labels": {"z": "1", "x": None}}})
    assert merged["metadata"]["labels"] == {"z": "1"}


async def test_namespaces_paths(cluster: Cluster) -> None:
    await cluster.create(o.namespace("one"))
    await cluster.create(o.namespace("two"))
    listed = await cluster._call(cluster.core.list_namespace)
    assert sorted(n["metadata"]["name"] for n in listed["items"]) == ["one", "two"]
    assert (await cluster._call(cluster.core.read_namespace, "one"))["metadata"]["name"] == "one"


async def test_finalizers_and_garbage_collection(cluster: Cluster) -> None:
    await cluster.create(o.namespace())
    body = o.route()
    body["metadata"]["finalizers"] = ["test/finalizer"]
    owner = await cluster.create(body)
    await cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "owned", "namespace": o.NS,
        "ownerReferences": [{"apiVersion": "v", "kind": "VertexRoute", "name": "gemini",
                             "uid": owner["metadata"]["uid"]}]}})
    await cluster.delete("VertexRoute", o.NS, "gemini")
    deleting = await cluster.get("VertexRoute", o.NS, "gemini")
    assert deleting is not None and deleting["metadata"]["deletionTimestamp"]
    assert await cluster.get("ConfigMap", o.NS, "owned") is not None
    await cluster.patch("VertexRoute", o.NS, "gemini", {"metadata": {"finalizers": None}})
    assert await cluster.get("VertexRoute", o.NS, "gemini") is None
    assert await cluster.get("ConfigMap", o.NS, "owned") is None


async def test_watch_sees_writes_with_resource_versions(kube: KubeEmulator, cluster: Cluster) -> None:
    await cluster.create(o.namespace())
    events: list[dict[str, object]] = []

    async def watch() -> None:
        async with kube.get("/apis/apps/v1/namespaces/team-a/deployments?watch=true") as response:
            async for line in response.content:
                if line.strip():
                    events.append(json.loads(line))

    task = asyncio.create_task(watch())
    await asyncio.sleep(0.1)
    await cluster.create(o.deployment())
    await cluster.patch("Deployment", o.NS, "chat", {"spec": {"replicas": 2}})
    for _ in range(100):
        if len(events) >= 2:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED"]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]  # type: ignore[index]
    assert versions[0] < versions[1]


def test_label_selector_syntax() -> None:
    labels = {"app": "a", "tier": "x"}
    assert selector_matches("app=a,tier==x", labels)
    assert selector_matches("app,!missing,tier!=y", labels)
    assert not selector_matches("app=b", labels) and not selector_matches("!app", labels)


async def test_watch_from_a_list_skips_what_the_list_had(kube: KubeEmulator, cluster: Cluster) -> None:
    await cluster.create(o.namespace())
    await cluster.create(o.deployment("old"))
    listed = await cluster._call(cluster.apps.list_namespaced_deployment, o.NS)
    since = listed["metadata"]["resourceVersion"]
    events: list[dict[str, object]] = []

    async def watch() -> None:
        url = f"/apis/apps/v1/namespaces/team-a/deployments?watch=true&resourceVersion={since}"
        async with kube.get(url) as response:
            async for line in response.content:
                if line.strip():
                    events.append(json.loads(line))

    task = asyncio.create_task(watch())
    await asyncio.sleep(0.1)
    await cluster.create(o.deployment("new"))
    await cluster.delete("Deployment", o.NS, "old")
    for _ in range(100):
        if len(events) >= 2:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    # kmock alone would replay "old" as ADDED; the deletion is newer than the list, so it shows.
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [  # type: ignore[index]
        ("ADDED", "new"), ("DELETED", "old")]


async def test_undeclared_resources_do_not_exist(kube: KubeEmulator, cluster: Cluster) -> None:
    member = {"apiVersion": "iam.cnrm.cloud.google.com/v1beta1", "kind": "IAMPolicyMember",
              "metadata": {"name": "m", "namespace": o.NS}, "spec": {}}
    await cluster.create(o.namespace())
    try:
        await cluster.create(member)
    except kubernetes.client.ApiException as exc:
        assert exc.status == 404
    else:
        raise AssertionError("created an object of a resource type nobody installed")
    kube.declare("iam.cnrm.cloud.google.com", "v1beta1", "iampolicymembers", "IAMPolicyMember")
    await cluster.create(member)
    assert [m["metadata"]["name"] for m in kube.objects_of("iam.cnrm.cloud.google.com", "iampolicymembers")] == ["m"]
