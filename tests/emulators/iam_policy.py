"""IAM policies of projects (Resource Manager v1) and Google service accounts (IAM v1).

One app serves both APIs (point both of the operator's endpoints at it):

    GET  /v1/projects/{project}                          Resource Manager projects.get
    POST /v1/projects/{project}:getIamPolicy             {"options": {"requestedPolicyVersion": 3}}
    POST /v1/projects/{project}:setIamPolicy             {"policy": {...}}
    POST /v1/projects/{p}/serviceAccounts/{email}:getIamPolicy?options.requestedPolicyVersion=3
    POST /v1/projects/{p}/serviceAccounts/{email}:setIamPolicy   {"policy": {...}}

Behaviour kept from the real services:
- a bearer token from the shared TokenRegistry (401 UNAUTHENTICATED otherwise);
- the etag is an opaque hash of the stored policy; setIamPolicy with another etag than the
  stored one → 409 ABORTED ("concurrent policy changes"); without an etag it overwrites
  blindly (which is how version-1 writers lose conditions);
- policy version 3: conditional bindings are returned only to readers that request version
  3; older readers get them as `ROLE_withcond_HASH` roles without the condition, and
  writing those back, or writing a condition without `version: 3`, is 400 INVALID_ARGUMENT;
- missing permissions (`PolicyStore.deny`) → 403 PERMISSION_DENIED naming the permission
  (message and ErrorInfo, as IAM writes them); an unknown project is also 403 (Resource
  Manager does not reveal which projects exist); an unknown service account → 404;
- members are stored exactly as written (no de-duplication), so tests can see duplicates.

Test hooks on `app.state.store`: `after_get(resource, fn)` runs `fn(store)` once, right
after the next getIamPolicy of `resource` was answered — a foreign writer between our read
and our write; `fail_next(method, resource, code)`; `calls` logs (method, resource, status).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import threading
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import google_errors
from .google_json import json_response
from .tokens import TokenRegistry

__all__ = ["PolicyStore", "create_iam_policy_app", "project_resource", "service_account_resource"]

CRM = "cloudresourcemanager.googleapis.com"
IAM = "iam.googleapis.com"
_ACCEPTED_SCOPES = frozenset({
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/cloudplatformprojects",
    "https://www.googleapis.com/auth/iam",
})
_PROJECT = re.compile(r"^projects/(?P<project>[^/:]+)(?::(?P<method>getIamPolicy|setIamPolicy))?$")
_SERVICE_ACCOUNT = re.compile(
    r"^projects/(?P<project>[^/:]+)/serviceAccounts/(?P<email>[^/:]+):(?P<method>getIamPolicy|setIamPolicy)$")
_CONCURRENT = ("There were concurrent policy changes. Please retry the whole read-modify-write "
               "with exponential backoff.")
# Whole-string: `allUsers` and `allAuthenticatedUsers` exactly; deleted members keep their
# kind, e.g. deleted:serviceAccount:EMAIL?uid=N, as IAM returns (and accepts back) them.
_MEMBER = re.compile(r"^(?:(?:user|serviceAccount|group|domain|principal|principalSet|deleted:[A-Za-z]+):.+"
                     r"|allUsers|allAuthenticatedUsers)$")


def project_resource(project_id: str) -> str:
    return f"projects/{project_id}"


def service_account_resource(email: str) -> str:
    return f"serviceAccounts/{email}"


def _etag(policy: dict[str, Any]) -> str:
    essence = {k: policy.get(k) for k in ("version", "bindings", "auditConfigs")}
    digest = hashlib.sha256(json.dumps(essence, sort_keys=True).encode()).digest()
    return base64.b64encode(digest[:8]).decode()


def _has_conditions(policy: dict[str, Any]) -> bool:
    return any(b.get("condition") for b in policy.get("bindings") or [])


class PolicyStore:
    """Projects, service accounts and their policies; thread-safe (tests edit it directly)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.projects: dict[str, str] = {}  # id → number
        self.policies: dict[str, dict[str, Any]] = {}  # resource → policy (without etag)
        self.denied: set[tuple[str, str]] = set()  # (permission, resource)
        self.calls: list[tuple[str, str, int]] = []
        self._after_get: dict[str, list[Callable[[PolicyStore], None]]] = {}
        self._failures: list[list[Any]] = []

    # -- arranging

    def add_project(self, project_id: str, number: str, bindings: list[dict[str, Any]] | None = None,
                    version: int = 1) -> None:
        with self.lock:
            self.projects[project_id] = number
            self.policies[project_resource(project_id)] = {"version": version, "bindings": bindings or []}

    def add_service_account(self, email: str, bindings: list[dict[str, Any]] | None = None) -> None:
        with self.lock:
            self.policies[service_account_resource(email)] = {"version": 1, "bindings": bindings or []}

    def deny(self, permission: str, resource: str) -> None:
        with self.lock:
            self.denied.add((permission, resource))

    def allow(self, permission: str, resource: str) -> None:
        with self.lock:
            self.denied.discard((permission, resource))

    def after_get(self, resource: str, fn: Callable[["PolicyStore"], None]) -> None:
        with self.lock:
            self._after_get.setdefault(resource, []).append(fn)

    def fail_next(self, method: str, resource: str, code: int, times: int = 1) -> None:
        with self.lock:
            self._failures.append([method, resource, code, times])

    def clear_failures(self) -> None:
        with self.lock:
            self._failures.clear()

    # -- reading and foreign edits

    def policy(self, resource: str) -> dict[str, Any]:
        with self.lock:
            stored = copy.deepcopy(self.policies[resource])
        return {**stored, "etag": _etag(stored)}

    def members(self, resource: str, role: str, *, conditional: bool = False) -> list[str]:
        """Members of the role's unconditional binding(s) (or of its conditional ones)."""
        with self.lock:
            bindings = self.policies[resource].get("bindings") or []
            return [m for b in bindings if b.get("role") == role and bool(b.get("condition")) == conditional
                    for m in b.get("members") or []]

    def edit(self, resource: str, fn: Callable[[dict[str, Any]], None]) -> None:
        """A foreign writer: mutate the stored policy (its etag changes with it)."""
        with self.lock:
            fn(self.policies[resource])

    def add_member(self, resource: str, role: str, member: str) -> None:
        def add(policy: dict[str, Any]) -> None:
            for binding in policy.setdefault("bindings", []):
                if binding.get("role") == role and not binding.get("condition"):
                    binding["members"].append(member)
                    return
            policy["bindings"].append({"role": role, "members": [member]})
        self.edit(resource, add)

    # -- serving helpers

    def _take_failure(self, method: str, resource: str) -> int | None:
        with self.lock:
            for failure in self._failures:
                if failure[0] == method and failure[1] == resource and failure[3] > 0:
                    failure[3] -= 1
                    return int(failure[2])
        return None

    def _run_after_get(self, resource: str) -> None:
        with self.lock:
            hooks = self._after_get.pop(resource, [])
        for hook in hooks:
            hook(self)


# ---------------------------------------------------------------- request handling


def _error(request: Request, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return json_response(request, body, status_code=body["error"]["code"], headers=headers)


def _authorized(request: Request, method: str, service: str) -> Response | None:
    registry: TokenRegistry | None = request.app.state.registry
    if registry is None:
        return None
    rpc = f"google.iam.v1.IAMPolicy.{method}"
    authorization = request.headers.get("authorization")
    if authorization is None:
        return _error(request, google_errors.missing_credentials(rpc, service),
                      {"www-authenticate": 'Bearer realm="https://accounts.google.com/"'})
    scheme, _, token = authorization.partition(" ")
    record = registry.lookup(token.strip()) if scheme.lower() == "bearer" else None
    if record is None or record.expires_at <= registry.now():
        expired = record is not None
        return _error(request, google_errors.invalid_credentials(rpc, service, expired=expired))
    if record.scopes and not _ACCEPTED_SCOPES.intersection(record.scopes):
        return _error(request, google_errors.insufficient_scopes(rpc, service))
    return None


def _withcond(binding: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(binding.get("condition"), sort_keys=True).encode()).hexdigest()[:16]
    return f"{binding['role']}_withcond_{digest}"


def _render(policy: dict[str, Any], requested: int) -> dict[str, Any]:
    """The policy as a reader of `requested` version sees it."""
    result = copy.deepcopy(policy)
    if _has_conditions(policy) and requested >= 3:
        result["version"] = 3
        return result
    result["version"] = 1
    result["bindings"] = [
        {"role": _withcond(b), "members": b["members"]} if b.get("condition") else b
        for b in result.get("bindings") or []
    ]
    if not result["bindings"]:
        del result["bindings"]
    return result


def _invalid_policy(policy: Any) -> str | None:
    if not isinstance(policy, dict):
        return "Invalid JSON payload received. 'policy' must be an object."
    version = policy.get("version", 1)
    for binding in policy.get("bindings") or []:
        role, members = binding.get("role"), binding.get("members")
        if not isinstance(role, str) or "_withcond_" in role:
            return f"Role {role} is not a valid role: conditional role bindings must be written with version 3."
        if not isinstance(members, list) or not members:
            return f"Binding for {role} has no members."
        for member in members:
            if not isinstance(member, str) or not _MEMBER.match(member):
                return f"Invalid member: {member}."
        condition = binding.get("condition")
        if condition is not None:
            if version != 3:
                return ("Policy with conditions must specify version 3. Requested version: "
                        f"{version}.")
            if not isinstance(condition, dict) or not condition.get("expression") or not condition.get("title"):
                return "Condition needs an expression and a title."
    return None


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


async def _dispatch(request: Request) -> Response:
    path = request.path_params["path"]
    store: PolicyStore = request.app.state.store
    if (found := _SERVICE_ACCOUNT.match(path)) is not None:
        service, method, email = IAM, found["method"], found["email"]
        resource = service_account_resource(email)
        full = f"projects/{found['project']}/serviceAccounts/{email}"
        permission = f"iam.serviceAccounts.{method}"
        project_ok = found["project"] == "-" or email.endswith(f"@{found['project']}.iam.gserviceaccount.com")
        exists = resource in store.policies and project_ok
    elif (found := _PROJECT.match(path)) is not None:
        service, method = CRM, found["method"] or "get"
        resource = full = project_resource(found["project"])
        permission = f"resourcemanager.projects.{method}"
        exists = found["project"] in store.projects
    else:
        return _error(request, google_errors.not_found(f"Method not found: {request.method} /v1/{path}"))
    if (method == "get") != (request.method == "GET"):
        return _error(request, google_errors.not_found(f"Method not found: {request.method} /v1/{path}"))

    def answer(response: Response) -> Response:
        with store.lock:
            store.calls.append((method, resource, response.status_code))
        return response

    if (problem := _authorized(request, method, service)) is not None:
        return answer(problem)
    if (code := store._take_failure(method, resource)) is not None:
        message = _CONCURRENT if code == 409 else f"Emulated error {code}."
        return answer(_error(request, google_errors.error_body(code, message)))
    denied = (permission, resource) in store.denied
    if denied or (service == CRM and not exists):
        # Resource Manager answers 403 for projects that do not exist too.
        return answer(_error(request, google_errors.permission_denied(permission, full, service)))
    if not exists:
        return answer(_error(request, google_errors.error_body(
            404, f"Service account {full} does not exist.")))

    if method == "get":
        number = store.projects[found["project"]]
        return answer(json_response(request, {
            "projectNumber": number, "projectId": found["project"], "lifecycleState": "ACTIVE",
            "name": found["project"], "createTime": "2024-01-01T00:00:00.000Z",
            "parent": {"type": "organization", "id": "123456789"}}))

    body = await _body(request)
    if method == "getIamPolicy":
        if service == CRM:
            requested = int(((body.get("options") or {}).get("requestedPolicyVersion")) or 0)
        else:
            requested = int(request.query_params.get("options.requestedPolicyVersion") or 0)
        if requested not in (0, 1, 3):
            return answer(_error(request, google_errors.bad_request(
                f"Invalid requested policy version: {requested}.", "options.requested_policy_version")))
        with store.lock:
            policy = store.policy(resource)
        response = json_response(request, _render(policy, requested))
        store._run_after_get(resource)
        return answer(response)

    written_policy = body.get("policy")
    if (problem_text := _invalid_policy(written_policy)) is not None:
        return answer(_error(request, google_errors.bad_request(problem_text, "policy")))
    assert isinstance(written_policy, dict)
    policy = written_policy
    with store.lock:
        current = store.policy(resource)
        if policy.get("etag") and policy["etag"] != current["etag"]:
            return answer(_error(request, google_errors.error_body(409, _CONCURRENT)))
        stored = {k: copy.deepcopy(v) for k, v in policy.items() if k in ("version", "bindings", "auditConfigs")}
        stored.setdefault("version", 1)
        stored.setdefault("bindings", [])
        store.policies[resource] = stored
        written = store.policy(resource)
    return answer(json_response(request, _render(written, 3)))


def create_iam_policy_app(registry: TokenRegistry | None = None, store: PolicyStore | None = None) -> Starlette:
    """state: `store` (PolicyStore), `registry` (None: no authentication)."""
    app = Starlette(routes=[Route("/v1/{path:path}", _dispatch, methods=["GET", "POST"])])
    app.state.registry = registry
    app.state.store = store if store is not None else PolicyStore()
    return app
