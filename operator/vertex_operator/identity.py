"""Google identities of Kubernetes service accounts, and IAM policy edits; pure.

* Member strings: how a pod's Kubernetes service account appears in IAM policies —
  directly as a Workload Identity principal, as the `PROJECT.svc.id.goog[NS/KSA]`
  service-account member that may act as a Google service account, or as a workload
  identity federation principal.
* `Grant`: one (resource, role, member) binding the operator is responsible for.
* Policy edits: add or remove one member of one role in an IAM policy dict, touching
  nothing else — other members, other roles, conditional bindings (policy version 3),
  audit configs and the etag all stay as they came.
* `gcloud_commands`: what `binding.backend: manual` shows instead of doing it.
* `external_account_config`: the federation credential configuration the sidecar reads.
"""

from __future__ import annotations

import copy
import re
import shlex
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

DEFAULT_ROLE = "roles/aiplatform.user"
WORKLOAD_IDENTITY_USER = "roles/iam.workloadIdentityUser"
GSA_ANNOTATION = "iam.gke.io/gcp-service-account"
STS_TOKEN_URL = "https://sts.googleapis.com/v1/token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
POLICY_VERSION = 3  # the version that carries conditions; always requested and written

ResourceKind = Literal["project", "serviceAccount"]

# //iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/POOL/providers/P,
# also in the https:// form that is a provider's default allowed audience.
_PROVIDER_RE = re.compile(
    r"^(?:https:)?//iam\.googleapis\.com/projects/(?P<number>[0-9]+)/locations/global/"
    r"workloadIdentityPools/(?P<pool>[-a-z0-9]+)/providers/(?P<provider>[-a-z0-9]+)$")
_GSA_PROJECT_RE = re.compile(r"^[^@]+@(?P<project>[a-z][a-z0-9-]{4,28}[a-z0-9])\.iam\.gserviceaccount\.com$")


# ------------------------------------------------------------------ members


def workload_pool(project_id: str) -> str:
    """The GKE Workload Identity pool of a cluster's project."""
    return f"{project_id}.svc.id.goog"


def direct_member(project_number: str, project_id: str, namespace: str, ksa: str) -> str:
    """A Kubernetes service account as a Workload Identity principal (no Google SA needed)."""
    return (f"principal://iam.googleapis.com/projects/{project_number}/locations/global/"
            f"workloadIdentityPools/{workload_pool(project_id)}/subject/ns/{namespace}/sa/{ksa}")


def gke_member(project_id: str, namespace: str, ksa: str) -> str:
    """The member that `roles/iam.workloadIdentityUser` on a Google service account names."""
    return f"serviceAccount:{workload_pool(project_id)}[{namespace}/{ksa}]"


def service_account_member(email: str) -> str:
    return f"serviceAccount:{email}"


def provider_name(audience: str) -> str | None:
    """The provider resource name a federation audience designates, if it designates one."""
    found = _PROVIDER_RE.match(audience)
    if found is None:
        return None
    return (f"//iam.googleapis.com/projects/{found['number']}/locations/global/"
            f"workloadIdentityPools/{found['pool']}/providers/{found['provider']}")


def federation_member(audience: str, namespace: str, ksa: str) -> str | None:
    """The federated principal of a Kubernetes service account, or None for a custom audience.

    Assumes the provider's documented mapping for Kubernetes, `google.subject=assertion.sub`,
    so that the subject is `system:serviceaccount:NS:KSA`.
    """
    found = _PROVIDER_RE.match(audience)
    if found is None:
        return None
    return (f"principal://iam.googleapis.com/projects/{found['number']}/locations/global/"
            f"workloadIdentityPools/{found['pool']}/subject/system:serviceaccount:{namespace}:{ksa}")


def service_account_project(email: str) -> str:
    """The project of a user-managed Google service account; "-" lets IAM infer it."""
    found = _GSA_PROJECT_RE.match(email)
    return found["project"] if found else "-"


# ------------------------------------------------------------------ grants


@dataclass(frozen=True, order=True)
class Grant:
    """One role for one member on one resource (a project, or a Google service account)."""

    kind: ResourceKind
    target: str  # project id, or service account email
    role: str
    member: str

    @property
    def resource(self) -> str:
        """The resource name as status and messages show it."""
        if self.kind == "project":
            return f"projects/{self.target}"
        return f"projects/{service_account_project(self.target)}/serviceAccounts/{self.target}"

    def describe(self) -> str:
        return f"{self.role} on {self.resource} for {self.member}"

    def to_status(self) -> dict[str, str]:
        return {"resource": self.resource, "role": self.role, "member": self.member}

    @classmethod
    def from_status(cls, item: Mapping[str, Any]) -> "Grant | None":
        resource, role, member = item.get("resource"), item.get("role"), item.get("member")
        if not (isinstance(resource, str) and isinstance(role, str) and isinstance(member, str)):
            return None
        parts = resource.split("/")
        if len(parts) == 2 and parts[0] == "projects":
            return cls("project", parts[1], role, member)
        if len(parts) == 4 and parts[0] == "projects" and parts[2] == "serviceAccounts":
            return cls("serviceAccount", parts[3], role, member)
        return None


# ------------------------------------------------------------------ policy edits


def _unconditional(binding: Mapping[str, Any], role: str) -> bool:
    return binding.get("role") == role and not binding.get("condition")


def has_member(policy: Mapping[str, Any], role: str, member: str) -> bool:
    """Whether `member` holds `role` without a condition."""
    return any(_unconditional(b, role) and member in (b.get("members") or [])
               for b in policy.get("bindings") or [])


def edit_policy(policy: Mapping[str, Any], add: Iterable[tuple[str, str]] = (),
                remove: Iterable[tuple[str, str]] = ()) -> tuple[dict[str, Any], bool]:
    """A copy of `policy` with (role, member) pairs added and removed; and whether it changed.

    Only unconditional bindings are touched: a conditional binding of the same role is a
    different grant (it may be someone's time-limited access) and is kept as it is.
    Bindings we empty are dropped (IAM refuses bindings without members); everything
    else — order, other members, `etag`, `auditConfigs` — is kept.
    """
    result = copy.deepcopy(dict(policy))
    bindings: list[dict[str, Any]] = result.setdefault("bindings", [])
    changed = False
    emptied: list[int] = []  # positions of the bindings whose last member we removed
    for role, member in remove:
        for i, binding in enumerate(bindings):
            members = binding.get("members") or []
            if _unconditional(binding, role) and member in members:
                binding["members"] = [m for m in members if m != member]
                changed = True
                if not binding["members"]:
                    emptied.append(i)
    if emptied:
        result["bindings"] = bindings = [b for i, b in enumerate(bindings) if i not in emptied]
    for role, member in add:
        if has_member(result, role, member):
            continue
        target = next((b for b in bindings if _unconditional(b, role)), None)
        if target is None:
            bindings.append({"role": role, "members": [member]})
        else:
            target["members"] = [*(target.get("members") or []), member]
        changed = True
    if not result["bindings"]:
        del result["bindings"]
    # Writing version 3 is always allowed, and required once any binding has a condition.
    result["version"] = POLICY_VERSION
    return result, changed


# ------------------------------------------------------------------ gcloud


def gcloud_command(grant: Grant, action: Literal["add", "remove"] = "add") -> str:
    """The gcloud command that makes (or undoes) one grant; safe to paste into a shell."""
    verb = f"{action}-iam-policy-binding"
    if grant.kind == "project":
        args = ["gcloud", "projects", verb, grant.target]
    else:
        args = ["gcloud", "iam", "service-accounts", verb, grant.target]
        project = service_account_project(grant.target)
        if project != "-":
            args.append(f"--project={project}")
    args += [f"--member={grant.member}", f"--role={grant.role}"]
    if action == "add":
        # Non-interactive even when the policy already has conditional bindings.
        args.append("--condition=None")
    return " ".join(shlex.quote(a) for a in args)


def gcloud_commands(grants: Iterable[Grant], action: Literal["add", "remove"] = "add") -> list[str]:
    return [gcloud_command(g, action) for g in sorted(set(grants))]


# ------------------------------------------------------------------ federation


def external_account_config(audience: str, token_file: str, *, token_url: str = STS_TOKEN_URL) -> dict[str, Any]:
    """The `external_account` credential configuration for a projected Kubernetes token.

    Equivalent to `gcloud iam workload-identity-pools create-cred-config PROVIDER
    --credential-source-file=TOKEN_FILE --credential-source-type=text`. `audience` must
    designate a provider (see `provider_name`).
    """
    provider = provider_name(audience)
    if provider is None:
        raise ValueError(f"{audience!r} does not name a workload identity pool provider")
    return {
        "universe_domain": "googleapis.com",
        "type": "external_account",
        "audience": provider,
        "subject_token_type": JWT_TOKEN_TYPE,
        "token_url": token_url,
        "credential_source": {"file": token_file, "format": {"type": "text"}},
    }
