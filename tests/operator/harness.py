"""A Kubernetes API for the operator tests: kmock 0.8 plus what it lacks for real kopf.

kmock's `KubernetesEmulator` serves discovery, list, watch and fetch well. Its writes are
plain dict merges, so this subclass takes over create/patch/replace/delete to behave as
the API server does where kopf and the operator depend on it:

* `metadata.resourceVersion` on every write (kopf's JSON patches `test` it, and kopf
  waits for its own writes to come back through the watch), `uid`, `generation`
  (bumped on spec changes only), `creationTimestamp`, `generateName`;
* `metadata.namespace` taken from the URL of namespaced creations;
* the `status` subresource: `/status` writes change only the status, main writes never;
* JSON patch vs merge patch chosen by the Content-Type (a JSON-patch content type with
  an object body is refused, as the API server does);
* finalizers and `deletionTimestamp`; garbage collection of owned objects (ownerReferences);
* label selectors on list and watch;
* `/api/v1/namespaces[/NAME]`, which kmock 0.8 misparses;
* resources declared from our CRD files (kmock does not learn them from a posted CRD), and
  404 for resource types nobody declared (kmock would store anything).

Everything else (routing, discovery, watch streams, the request log) is kmock's.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import pathlib
import random
import re
import string
import uuid
from collections.abc import AsyncIterator
from typing import Any, Mapping

import aiohttp.web
import jsonpatch
import kmock
import yaml
from kmock._internal import parsing, rendering  # kmock 0.8 internals, pinned

assert kmock.__version__.startswith("0.8"), "the harness relies on kmock 0.8 internals"

CRD_DIR = pathlib.Path(__file__).resolve().parents[2] / "crds"


# ---------------------------------------------------------------- kmock path fix

_original_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """`/api/v1/namespaces[/NAME[/status|/finalize]]` are the namespaces themselves."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"]:
        if len(parts) == 3:
            return parsing.ParsedPath(group="", version="v1", plural="namespaces")
        if len(parts) == 4 or (len(parts) == 5 and parts[4] in ("status", "finalize")):
            sub = parts[4] if len(parts) == 5 else None
            return parsing.ParsedPath(group="", version="v1", plural="namespaces", name=parts[3],
                                      subresource=sub)
    return _original_parse_path(path)


parsing.parse_path = _parse_path  # type: ignore[assignment]


# ---------------------------------------------------------------- helpers


def now() -> str:
    return datetime.datetime.now(tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Equality-based label selectors: `a=b`, `a==b`, `a!=b`, `a`, `!a` (comma = and)."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def crd_resources(crd_dir: pathlib.Path = CRD_DIR) -> dict[str, kmock.ResourceInfo]:
    """Discovery entries for every CRD in `crds/`."""
    result: dict[str, kmock.ResourceInfo] = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec, names = doc["spec"], doc["spec"]["names"]
            for version in spec["versions"]:
                result[f"{spec['group']}/{version['name']}/{names['plural']}"] = kmock.ResourceInfo(
                    kind=names["kind"], singular=names.get("singular"),
                    namespaced=spec["scope"] == "Namespaced",
                    shortnames=names.get("shortNames", []), categories=names.get("categories", []),
                    verbs=["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
                    subresources=list((version.get("subresources") or {}).keys()),
                )
    return result


# ---------------------------------------------------------------- the emulator


class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with API-server write semantics (see the module docstring)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = itertools.count(1000)
        self._faults: list[list[Any]] = []
        self._delays: list[tuple[str, re.Pattern[str], float, str]] = []
        self.resources.load_bundled()
        for key, info in crd_resources().items():
            self.resources[key] = info
        # Report a version with native sidecars; tests can change it.
        self.server_version = {"major": "1", "minor": "31", "gitVersion": "v1.31.0"}
        self["get", re.compile(r"^/version/?$")] << (lambda: self.server_version)

    def declare(self, group: str, version: str, plural: str, kind: str, *, namespaced: bool = True,
                subresources: tuple[str, ...] = ("status",)) -> None:
        """Serve another resource type, as if its CRD were installed (e.g. Config Connector's)."""
        self.resources[f"{group}/{version}/{plural}"] = kmock.ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=namespaced, shortnames=[], categories=[],
            verbs=["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            subresources=list(subresources))

    def fail(self, method: str, path: str, status: int = 500, times: int = 1) -> None:
        """Fault injection: answer the next `times` matching requests with `status`."""
        self._faults.append([method, re.compile(path), status, times])

    def slow(self, method: str, path: str, seconds: float, user_agent: str = "") -> None:
        """Answer every matching request (of clients whose User-Agent starts with `user_agent`)
        `seconds` late; a write still happens, after the wait."""
        self._delays.append((method, re.compile(path), seconds, user_agent))

    # -- plumbing

    def _info(self, resource: Any) -> kmock.ResourceInfo:
        return self.resources[resource]

    def _has_status(self, resource: Any) -> bool:
        return "status" in self._info(resource).subresources

    def _next_rv(self) -> str:
        return str(next(self._rv))

    async def _emit(self, resource: Any, type_: str, obj: Mapping[str, Any]) -> None:
        await self._buses[resource].put({"type": type_, "object": copy.deepcopy(dict(obj))})

    def _stored(self, key: tuple[Any, str | None, str]) -> dict[str, Any] | None:
        if key not in self._objects or self._objects[key].deleted:
            return None
        return copy.deepcopy(self._objects[key].raw)

    def _store(self, key: tuple[Any, str | None, str], obj: Mapping[str, Any]) -> None:
        if key not in self._objects:
            self._objects[key] = dict(obj)
        else:
            self._objects[key].history.append(dict(obj))

    @staticmethod
    def _respond(obj: Any, status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.json_response(obj, status=status)

    # -- dispatch

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        for method, path, seconds, agent in self._delays:
            if (request.method.value == method and path.search(request.url.path)
                    and request.headers.get("User-Agent", "").startswith(agent)):
                await asyncio.sleep(seconds)
        for fault in self._faults:
            method, path, status, times = fault
            if times > 0 and request.method.value == method and path.search(request.url.path):
                fault[3] -= 1
                raise kmock.KubernetesError(status=status, reason="InjectedFault", message="injected by the test")
        if request.resource is not None and request.resource.plural:
            if not self._info(request.resource).kind:
                # Not installed (e.g. Config Connector's CRDs): the API server has no such path.
                raise kmock.KubernetesError(status=404, reason="NotFound",
                                            message="the server could not find the requested resource")
            if request.method == "POST" and request.name is None:
                return await self._create(request)
            if request.method == "PATCH" and request.name is not None:
                return await self._patch(request)
            if request.method == "PUT" and request.name is not None:
                return await self._replace(request)
            if request.method == "DELETE" and request.name is not None:
                return await self._delete(request)
        return await super()._handle(request)

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        result: dict[str, Any] = await super()._serve_list(request)  # type: ignore[assignment]
        if selector := request.params.get("labelSelector"):
            result["items"] = [o for o in result["items"]
                               if selector_matches(selector, (o.get("metadata") or {}).get("labels") or {})]
        result["metadata"] = {"resourceVersion": str(max(1000, next(self._rv) - 1))}
        return result

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        selector = request.params.get("labelSelector")
        since = request.params.get("resourceVersion")
        async for event in super()._serve_watch(request):
            if since and since.isdigit() and isinstance(event, dict):
                # As the API server does: only changes after the list's resourceVersion. kmock
                # replays every object as ADDED, which re-delivers versions kopf already
                # patched past (its resourceVersion-tested JSON patch then fails, and nothing
                # new arrives to retry on).
                seen = str(((event.get("object") or {}).get("metadata") or {}).get("resourceVersion") or "")
                if seen.isdigit() and int(seen) <= int(since):
                    continue
            if selector and isinstance(event, dict):
                labels = ((event.get("object") or {}).get("metadata") or {}).get("labels") or {}
                if not selector_matches(selector, labels):
                    continue
            yield event

    # -- writes

    async def _create(self, request: rendering.Request) -> aiohttp.web.Response:
        body = request.data
        if not isinstance(body, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="the body must be an object")
        info = self._info(request.resource)
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if info.namespaced:
            if request.namespace and meta.get("namespace") not in (None, request.namespace):
                raise kmock.KubernetesError(status=400, reason="BadRequest",
                                            message="the namespace of the object does not match the URL")
            meta["namespace"] = request.namespace or meta.get("namespace")
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise kmock.KubernetesError(status=422, reason="Invalid", message="metadata.name: Required value")
            meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        res = request.resource
        apiver = res.version if res.group == "" else f"{res.group}/{res.version}"
        obj.setdefault("apiVersion", apiver)
        obj.setdefault("kind", info.kind)
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_rv(), generation=1, creationTimestamp=now())
        meta.pop("deletionTimestamp", None)
        if self._has_status(res):
            obj.pop("status", None)  # the status subresource ignores statuses on creation
        key = (res, meta.get("namespace") if info.namespaced else None, meta["name"])
        async with self._lock:
            if self._stored(key) is not None:
                raise kmock.KubernetesError(status=409, reason="AlreadyExists",
                                            message=f"{res.plural} {meta['name']!r} already exists")
            self._store(key, obj)
            await self._emit(res, "ADDED", obj)
        return self._respond(obj, 201)

    def _key(self, request: rendering.Request) -> tuple[Any, str | None, str]:
        info = self._info(request.resource)
        return (request.resource, request.namespace if info.namespaced else None, request.name or "")

    def _not_found(self, request: rendering.Request) -> kmock.KubernetesError:
        return kmock.KubernetesError(status=404, reason="NotFound",
                                     message=f"{request.resource.plural} {request.name!r} not found")

    async def _write(self, request: rendering.Request, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        """Finish an update: subresource rules, generation, resourceVersion, finalizers, events."""
        res = request.resource
        if self._has_status(res):
            if request.subresource == "status":
                new = {**old, "status": new.get("status")} if new.get("status") is not None else \
                      {k: v for k, v in old.items() if k != "status"}
            elif "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
        meta = new.setdefault("metadata", {})
        for field in ("uid", "creationTimestamp", "namespace", "name"):
            if field in old.get("metadata", {}):
                meta[field] = old["metadata"][field]
        if old.get("metadata", {}).get("deletionTimestamp"):
            meta["deletionTimestamp"] = old["metadata"]["deletionTimestamp"]
        spec_old = {k: v for k, v in old.items() if k not in ("metadata", "status")}
        spec_new = {k: v for k, v in new.items() if k not in ("metadata", "status")}
        generation = int(old.get("metadata", {}).get("generation") or 1)
        meta["generation"] = generation + 1 if spec_old != spec_new else generation
        if new == {**old, "metadata": {**old.get("metadata", {}), "generation": meta["generation"]}}:
            return old  # a no-op write changes nothing, not even the resourceVersion
        meta["resourceVersion"] = self._next_rv()
        key = self._key(request)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._objects[key].history.append(new)
            self._objects[key].delete()
            await self._emit(res, "DELETED", new)
            await self._collect_garbage(meta.get("uid"))
        else:
            self._store(key, new)
            await self._emit(res, "MODIFIED", new)
        return new

    async def _patch(self, request: rendering.Request) -> aiohttp.web.Response:
        ctype = (request.headers.get("Content-Type") or "").split(";")[0].strip()
        async with self._lock:
            old = self._stored(self._key(request))
            if old is None:
                raise self._not_found(request)
            if ctype == "application/json-patch+json":
                if not isinstance(request.data, list):
                    raise kmock.KubernetesError(status=400, reason="BadRequest",
                                                message="a JSON patch must be a list of operations")
                try:
                    new = jsonpatch.apply_patch(old, request.data, in_place=False)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                    raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None
            elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                if not isinstance(request.data, dict):
                    raise kmock.KubernetesError(status=400, reason="BadRequest", message="a merge patch must be an object")
                new = merge_patch(old, request.data)
            else:
                raise kmock.KubernetesError(status=415, reason="UnsupportedMediaType",
                                            message=f"unsupported patch content type {ctype!r}")
            result = await self._write(request, old, new)
        return self._respond(result)

    async def _replace(self, request: rendering.Request) -> aiohttp.web.Response:
        async with self._lock:
            old = self._stored(self._key(request))
            if old is None:
                raise self._not_found(request)
            new = copy.deepcopy(request.data)
            wanted = (new.get("metadata") or {}).get("resourceVersion")
            if wanted and wanted != old["metadata"]["resourceVersion"]:
                raise kmock.KubernetesError(status=409, reason="Conflict", message="the object has been modified")
            result = await self._write(request, old, new)
        return self._respond(result)

    async def _delete(self, request: rendering.Request) -> aiohttp.web.Response:
        async with self._lock:
            key = self._key(request)
            old = self._stored(key)
            if old is None:
                raise self._not_found(request)
            meta = old["metadata"]
            if meta.get("finalizers"):
                if not meta.get("deletionTimestamp"):
                    meta["deletionTimestamp"] = now()
                    meta["resourceVersion"] = self._next_rv()
                    self._store(key, old)
                    await self._emit(request.resource, "MODIFIED", old)
                return self._respond(old)
            meta["resourceVersion"] = self._next_rv()  # a deletion is a change, as watches see it
            self._objects[key].delete()
            await self._emit(request.resource, "DELETED", old)
            await self._collect_garbage(meta.get("uid"))
        return self._respond(old)

    async def _collect_garbage(self, owner_uid: str | None) -> None:
        """Delete (cascading) what the deleted object owned, as the garbage collector does."""
        if not owner_uid:
            return
        for key, stored in list(self._objects.items()):
            if stored.deleted:
                continue
            obj = stored.raw
            refs = (obj.get("metadata") or {}).get("ownerReferences") or []
            if any(ref.get("uid") == owner_uid for ref in refs):
                if (obj.get("metadata") or {}).get("finalizers"):
                    continue  # a real GC would wait; none of ours have finalizers
                obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": self._next_rv()}}
                stored.delete()
                await self._emit(key[0], "DELETED", obj)
                await self._collect_garbage((obj.get("metadata") or {}).get("uid"))

    # -- assertions

    def objects_of(self, group: str, plural: str) -> list[dict[str, Any]]:
        """The stored (not deleted) objects of a resource type."""
        return [copy.deepcopy(stored.raw) for key, stored in list(self._objects.items())
                if key[0].group == group and key[0].plural == plural and not stored.deleted]

    def api_requests(self, user_agent_prefixes: tuple[str, ...]) -> list[tuple[str, str, str]]:
        """(apiGroup, resource[/subresource], verb) of requests made by the given clients."""
        triples: list[tuple[str, str, str]] = []
        for request in self._requests:
            agent = request.headers.get("User-Agent", "")
            if not agent.startswith(user_agent_prefixes) or request.resource is None or not request.resource.plural:
                continue
            res = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
            if request.method == "GET":
                verb = "watch" if request.params.get("watch") in ("true", "1") else "get" if request.name else "list"
            else:
                method = str(request.method.value)
                verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
                    method, method.lower())
            triples.append((request.resource.group or "", res, verb))
        return triples

