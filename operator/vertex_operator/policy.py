"""The platform team's bounds on what custom resources may make the operator do; pure.

A VertexCredential's author picks roles, projects, a Google service account and a
workload identity pool, and with `binding.backend: iamApi` or `configConnector` the
operator grants them with *its own* IAM rights. Without bounds that is a confused deputy:
any namespace could take `roles/iam.workloadIdentityUser` on another team's Google service
account, or any role on any project the operator administers. The bounds live here, in a
file only the platform team writes (the chart renders it from the `policy` values into a
ConfigMap in the operator's namespace and mounts it; `--policy-file`). A file, not a
cluster-scoped custom resource: no extra CRD, watch or RBAC, and changing it takes a
`helm upgrade`, which restarts the operator with it.

    allowedRoles: [roles/aiplatform.user]        # roles a credential may have granted on projects
    workloadIdentity:                            # the cluster's GKE pool, PROJECT.svc.id.goog
      projectId: my-gke
      projectNumber: "123456789012"              # optional; pins the principal:// number too
    federationPools:                             # pools of federation / isolation: sidecarOnly
      - projects/123456789012/locations/global/workloadIdentityPools/vertex-sidecar
    namespaces:                                  # per namespace: projects and Google SAs (globs)
      - namespaces: [team-a, "ml-*"]
        projects: [team-a-vertex]
        serviceAccounts: ["*@team-a-vertex.iam.gserviceaccount.com"]

Everything not allowed is refused: with the defaults (no file) only
`roles/aiplatform.user` is allowed, and no project, Google service account, pool or
Workload Identity project, so an automatic backend grants nothing until the platform team
says where. `binding.backend: manual` grants nothing itself (a person runs the printed
commands with their own rights), so only the namespace check applies to it.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import yaml

from vertex_operator.identity import DEFAULT_ROLE, WORKLOAD_IDENTITY_USER, Grant, workload_pool

AUTOMATIC_BACKENDS = ("iamApi", "configConnector")
VALUES_HINT = "the platform team's bounds, chart values policy.*"

_POOL_RE = re.compile(r"^projects/[0-9]+/locations/global/workloadIdentityPools/[-a-z0-9.]+$")
_PRINCIPAL_RE = re.compile(
    r"^principal://iam\.googleapis\.com/(?P<pool>projects/(?P<number>[0-9]+)/locations/global/"
    r"workloadIdentityPools/(?P<id>[-a-z0-9.]+))/subject/.+$")
_GKE_MEMBER_RE = re.compile(r"^serviceAccount:(?P<pool>[^\[\]]+)\[[^\]]+\]$")
_HOST_GLOB_RE = re.compile(r"^[a-z0-9*?.-]+$")
# What an upstream override may look like at all: scheme, host (with the sidecar's
# {location} placeholder), optional port and path; no user info, spaces or backslashes.
_UPSTREAM_RE = re.compile(r"^(?P<scheme>https?)://(?P<host>[A-Za-z0-9.{}-]+|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?"
                          r"(?:/[^\s\\?#@]*)?$")
GOOGLE_SUFFIX = ".googleapis.com"


class PolicyError(ValueError):
    """The policy file is invalid; the message names the key."""


@dataclass(frozen=True)
class NamespaceAllowance:
    """What the credentials of some namespaces may be granted (names and values are globs)."""

    namespaces: tuple[str, ...]
    projects: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()

    def covers(self, namespace: str) -> bool:
        return _matches(namespace, self.namespaces)


@dataclass(frozen=True)
class RouteBounds:
    """Where a VertexRoute may send its credential's tokens, and which images may carry them."""

    upstream_hosts: tuple[str, ...] = ()  # https hosts (globs) besides *.googleapis.com: PSC endpoints
    allow_loopback: bool = False  # http(s) to 127.0.0.1/localhost/[::1]: development only
    sidecar_images: tuple[str, ...] = ()  # image prefixes; empty: the default image's repository


@dataclass(frozen=True)
class Policy:
    allowed_roles: tuple[str, ...] = (DEFAULT_ROLE,)
    workload_identity_project: str | None = None
    workload_identity_number: str | None = None
    federation_pools: tuple[str, ...] = ()
    namespaces: tuple[NamespaceAllowance, ...] = ()
    routes: RouteBounds = field(default_factory=RouteBounds)

    def projects_for(self, namespace: str) -> tuple[str, ...]:
        return tuple(p for a in self.namespaces if a.covers(namespace) for p in a.projects)

    def service_accounts_for(self, namespace: str) -> tuple[str, ...]:
        return tuple(s for a in self.namespaces if a.covers(namespace) for s in a.service_accounts)


def _matches(value: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


# ------------------------------------------------------------------ loading


def _strings(data: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{path}{key}: expected a list of non-empty strings")
    return tuple(value)


def parse_policy(data: Any) -> Policy:
    """A policy from the file's YAML document (None or {}: the defaults); raises `PolicyError`."""
    if data is None:
        return Policy()
    if not isinstance(data, Mapping):
        raise PolicyError("the policy must be a mapping")
    unknown = sorted(set(data) - {"allowedRoles", "workloadIdentity", "federationPools", "namespaces", "routes"})
    if unknown:
        raise PolicyError(f"unknown key(s) {', '.join(unknown)}")
    roles = _strings(data, "allowedRoles", "") if data.get("allowedRoles") is not None else (DEFAULT_ROLE,)
    wi = data.get("workloadIdentity") or {}
    if not isinstance(wi, Mapping) or set(wi) - {"projectId", "projectNumber"}:
        raise PolicyError("workloadIdentity: expected a mapping with projectId and projectNumber")
    project = str(wi.get("projectId") or "") or None
    number = str(wi.get("projectNumber") or "") or None
    if number is not None and not number.isdigit():
        raise PolicyError(f"workloadIdentity.projectNumber: {number!r} is not a project number")
    pools = _strings(data, "federationPools", "")
    for pool in pools:
        if not _POOL_RE.match(pool):
            raise PolicyError(f"federationPools: {pool!r} is not a pool name "
                              "(projects/NUMBER/locations/global/workloadIdentityPools/POOL)")
    allowances = []
    raw = data.get("namespaces") or []
    if not isinstance(raw, list):
        raise PolicyError("namespaces: expected a list")
    for i, item in enumerate(raw):
        path = f"namespaces[{i}]."
        if not isinstance(item, Mapping) or set(item) - {"namespaces", "projects", "serviceAccounts"}:
            raise PolicyError(f"namespaces[{i}]: expected a mapping with namespaces, projects, serviceAccounts")
        names = _strings(item, "namespaces", path)
        if not names:
            raise PolicyError(f"{path}namespaces: required (the namespaces this entry is for)")
        allowances.append(NamespaceAllowance(names, _strings(item, "projects", path),
                                             _strings(item, "serviceAccounts", path)))
    return Policy(allowed_roles=roles, workload_identity_project=project, workload_identity_number=number,
                  federation_pools=pools, namespaces=tuple(allowances), routes=_route_bounds(data.get("routes")))


def _route_bounds(data: Any) -> RouteBounds:
    if data is None:
        return RouteBounds()
    if not isinstance(data, Mapping) or set(data) - {"upstreamHosts", "allowLoopbackUpstreams", "sidecarImages"}:
        raise PolicyError("routes: expected a mapping with upstreamHosts, allowLoopbackUpstreams, sidecarImages")
    loopback = data.get("allowLoopbackUpstreams", False)
    if not isinstance(loopback, bool):
        raise PolicyError("routes.allowLoopbackUpstreams: expected true or false")
    hosts = _strings(data, "upstreamHosts", "routes.")
    for host in hosts:
        if not _HOST_GLOB_RE.match(host):
            raise PolicyError(f"routes.upstreamHosts: {host!r} is not a host name (or glob)")
    return RouteBounds(hosts, loopback, _strings(data, "sidecarImages", "routes."))


def load_policy(path: str | None) -> Policy:
    """The policy in `path` (None: the defaults); raises `PolicyError` naming the file."""
    if path is None:
        return Policy()
    try:
        with open(path, encoding="utf-8") as f:
            return parse_policy(yaml.safe_load(f))
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"cannot read the policy file {path}: {exc}") from None
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from None


# ------------------------------------------------------------------ credentials


@dataclass(frozen=True)
class Refusal:
    """Why the policy refuses a credential: one line per problem."""

    problems: tuple[str, ...] = field(default_factory=tuple)
    subject: str = "credential"  # or "route"

    def __bool__(self) -> bool:
        return bool(self.problems)

    @property
    def message(self) -> str:
        outcome = ("Nothing was granted." if self.subject == "credential" else
                   "Nothing is rendered or injected with it; the previous config (if any) stays in place.")
        return "Refused by the operator's policy (" + VALUES_HINT + "): " + "; ".join(self.problems) + ". " + outcome


def _pinned_pool(policy: Policy) -> str | None:
    return workload_pool(policy.workload_identity_project) if policy.workload_identity_project else None


def spec_refusal(policy: Policy, credential: Any, excluded_namespaces: Iterable[str] = (),
                 writable: bool = True) -> Refusal:
    """What the spec alone shows is out of bounds (checked before any Google call)."""
    problems: list[str] = []
    if credential.namespace in set(excluded_namespaces):
        problems.append(f"namespace {credential.namespace} is a system namespace or the operator's own, where "
                        "credentials are never served")
    elif not writable:
        problems.append(f"the operator may not write in namespace {credential.namespace} (the platform team adds "
                        "it to the chart value rbac.workloadNamespaces)")
    if credential.binding_backend not in AUTOMATIC_BACKENDS:
        return Refusal(tuple(problems))
    for role in credential.binding_roles or (DEFAULT_ROLE,):
        if role not in policy.allowed_roles:
            problems.append(f"spec.binding.roles: {role} is not an allowed role (allowed: "
                            f"{', '.join(policy.allowed_roles) or 'none'})")
    wi = credential.workload_identity
    if wi is not None:
        if policy.workload_identity_project is None:
            problems.append("spec.workloadIdentity: no Workload Identity project is pinned "
                            "(policy.workloadIdentity.projectId), so the operator grants nothing for it")
        elif wi.project_id != policy.workload_identity_project:
            problems.append(f"spec.workloadIdentity.projectId: {wi.project_id} is not this cluster's Workload "
                            f"Identity project ({policy.workload_identity_project})")
        elif (wi.project_number and policy.workload_identity_number
              and wi.project_number != policy.workload_identity_number):
            problems.append(f"spec.workloadIdentity.projectNumber: {wi.project_number} is not the number of "
                            f"{policy.workload_identity_project} ({policy.workload_identity_number})")
    return Refusal(tuple(problems))


def _member_problem(policy: Policy, namespace: str, member: str) -> str | None:
    if found := _PRINCIPAL_RE.match(member):
        if found["id"] == _pinned_pool(policy) and policy.workload_identity_number in (None, found["number"]):
            return None
        if found["pool"] in policy.federation_pools:
            return None
        return (f"the workload identity pool {found['pool']} is not allowed (allowed: the Workload Identity "
                f"project's pool{', ' if policy.federation_pools else ''}{', '.join(policy.federation_pools)}; "
                "policy.federationPools)")
    if found := _GKE_MEMBER_RE.match(member):
        if found["pool"] == _pinned_pool(policy):
            return None
        return f"the Workload Identity pool {found['pool']} is not this cluster's"
    if member.startswith("serviceAccount:"):
        email = member.removeprefix("serviceAccount:")
        if _matches(email, policy.service_accounts_for(namespace)):
            return None
        return f"Google service account {email} is not allowed for namespace {namespace} (policy.namespaces)"
    return f"member {member} is not one the operator grants to"


def grant_refusal(policy: Policy, credential: Any, grants: Iterable[Grant]) -> Refusal:
    """Each grant the operator would make, checked: role, resource and member."""
    if credential.binding_backend not in AUTOMATIC_BACKENDS:
        return Refusal()
    ns = credential.namespace
    problems: list[str] = []
    for grant in sorted(set(grants)):
        if grant.kind == "project":
            if grant.role not in policy.allowed_roles:
                problems.append(f"{grant.role} is not an allowed role")
            if not _matches(grant.target, policy.projects_for(ns)):
                problems.append(f"project {grant.target} is not allowed for namespace {ns} (policy.namespaces)")
        else:
            if grant.role != WORKLOAD_IDENTITY_USER:
                problems.append(f"{grant.role} on a Google service account is never granted")
            if not _matches(grant.target, policy.service_accounts_for(ns)):
                problems.append(f"Google service account {grant.target} is not allowed for namespace {ns} "
                                "(policy.namespaces)")
        if problem := _member_problem(policy, ns, grant.member):
            problems.append(problem)
    return Refusal(tuple(dict.fromkeys(problems)))  # each problem once, in order


# ------------------------------------------------------------------ routes


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def upstream_problem(bounds: RouteBounds, key: str, url: str) -> str | None:
    """Why `spec.upstreams.<key>` may not receive the credential's tokens, or None."""
    where = f"spec.upstreams.{key}: {url}"
    found = _UPSTREAM_RE.match(url)
    if found is None:
        return f"{where} is not a plain http(s) URL (no user info, query or fragment)"
    # "location0" stands in for the placeholder: it cannot end a host in ".googleapis.com",
    # so that suffix must be literal.
    host = found["host"].lower().replace("{location}", "location0")
    if "{" in host or "}" in host:
        return f"{where}: only the {{location}} placeholder is allowed in the host"
    if _loopback(host):
        if bounds.allow_loopback:
            return None
        return f"{where} is a loopback address (only allowed with policy.routes.allowLoopbackUpstreams, for development)"
    if found["scheme"] != "https":
        return f"{where} is not https (the sidecar would send Google tokens in the clear)"
    if host.endswith(GOOGLE_SUFFIX) or _matches(host, bounds.upstream_hosts):
        return None
    return (f"{where} is not on *{GOOGLE_SUFFIX} nor an endpoint the platform allows "
            f"(policy.routes.upstreamHosts: {', '.join(bounds.upstream_hosts) or 'none'})")


def image_repository(image: str) -> str:
    """registry/path/name of an image reference, without tag or digest."""
    name = image.split("@", 1)[0]
    head, _, tail = name.rpartition(":")
    return head if head and "/" not in tail else name


def image_allowed(prefixes: Iterable[str], image: str) -> bool:
    """Whether `image` is under one of `prefixes`. A prefix that ends inside a name (no
    trailing '/', ':' or '@') is a whole repository: `repo/sidecar` allows `repo/sidecar:1`
    and `repo/sidecar@sha256:...`, never `repo/sidecar-evil`."""
    for prefix in prefixes:
        if prefix.endswith(("/", ":", "@")):
            if image.startswith(prefix):
                return True
        elif image == prefix or image.startswith((prefix + ":", prefix + "@")):
            return True
    return False


def route_refusal(policy: Policy, route: Any, default_image: str) -> Refusal:
    """A VertexRoute's upstream overrides and sidecar image, checked against the bounds."""
    bounds = policy.routes
    problems = [p for key, url in sorted(route.upstreams.items()) if (p := upstream_problem(bounds, key, url))]
    image = route.sidecar.image
    if image:
        prefixes = bounds.sidecar_images or (image_repository(default_image),)
        if not image_allowed(prefixes, image):
            problems.append(f"spec.sidecar.image: {image} is not from an allowed registry or repository "
                            f"({', '.join(prefixes)}; policy.routes.sidecarImages)")
    return Refusal(tuple(problems), subject="route")
