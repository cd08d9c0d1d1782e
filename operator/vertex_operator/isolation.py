"""`isolation: sidecarOnly`: an identity that only the sidecar container can assert; pure.

With the default ("cooperative") isolation the Vertex permission belongs to the pod's
Kubernetes service account as GKE's metadata server presents it, to every container
of the pod. With `sidecarOnly` it belongs instead to the principal of a *dedicated*
workload identity federation pool/provider that trusts the cluster's token issuer:

    principal://iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/POOL/
        subject/system:serviceaccount:NS:KSA

Only a projected service-account token with that provider's audience can be exchanged
for it, and the webhook mounts such a token into the sidecar container alone. This
module holds the pool (`SidecarPool`), the grants of the mode, the credential
configuration the sidecar reads, the check that nothing else lets the plain KSA
principal reach Vertex (`exposures`), and the commands `manual` prints.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from vertex_operator import conditions as cond
from vertex_operator.identity import WORKLOAD_IDENTITY_USER, Grant, gke_member, service_account_member, workload_pool

COOPERATIVE = "cooperative"
SIDECAR_ONLY = "sidecarOnly"
IAM_CREDENTIALS_URL = "https://iamcredentials.googleapis.com/v1"

# Roles that carry aiplatform.* permissions (or act as a Google SA that may hold them).
# Basic roles and every predefined Vertex AI role; custom roles cannot be read from a
# policy alone, so they are named in the message as "not checked".
VERTEX_ROLE_PREFIXES = ("roles/aiplatform.",)
VERTEX_ROLES = frozenset({"roles/owner", "roles/editor"})
ACT_AS_ROLES = frozenset({WORKLOAD_IDENTITY_USER, "roles/iam.serviceAccountTokenCreator",
                          "roles/iam.serviceAccountOpenIdTokenCreator", "roles/owner", "roles/editor"})


@dataclass(frozen=True)
class SidecarPool:
    """The dedicated pool/provider whose principals only the sidecar can assert."""

    project_number: str
    pool_id: str
    provider_id: str
    issuer: str | None = None  # the cluster's service-account token issuer (for the setup commands)
    token_expiration_seconds: int = 3600

    @property
    def pool_name(self) -> str:
        return (f"projects/{self.project_number}/locations/global/"
                f"workloadIdentityPools/{self.pool_id}")

    @property
    def audience(self) -> str:
        """The provider's default allowed audience; the projected token asks for exactly it."""
        return f"https://iam.googleapis.com/{self.pool_name}/providers/{self.provider_id}"

    def principal(self, namespace: str, ksa: str) -> str:
        """The federated principal, with the mapping google.subject=assertion.sub."""
        return f"principal://iam.googleapis.com/{self.pool_name}/subject/system:serviceaccount:{namespace}:{ksa}"


# ------------------------------------------------------------------ grants


def sidecar_grants(pool: SidecarPool, namespace: str, ksa: str, roles: Iterable[str],
                   projects: Iterable[str], gsa: str | None) -> tuple[str, tuple[Grant, ...]]:
    """The member and grants of sidecarOnly: Vertex roles for the pool principal, or the
    right to act as `gsa` (whose own roles are granted only on the listed projects)."""
    member = pool.principal(namespace, ksa)
    roles, projects = tuple(roles), tuple(projects)
    if gsa:
        grants = {Grant("serviceAccount", gsa, WORKLOAD_IDENTITY_USER, member)}
        grants |= {Grant("project", p, r, service_account_member(gsa)) for p in projects for r in roles}
    else:
        grants = {Grant("project", p, r, member) for p in projects for r in roles}
    return member, tuple(sorted(grants))


def credential_config(pool: SidecarPool, token_file: str, gsa: str | None, *,
                      token_url: str = "https://sts.googleapis.com/v1/token") -> dict[str, Any]:
    """The `external_account` configuration the sidecar reads (no secrets in it)."""
    config: dict[str, Any] = {
        "universe_domain": "googleapis.com",
        "type": "external_account",
        "audience": f"//iam.googleapis.com/{pool.pool_name}/providers/{pool.provider_id}",
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": token_url,
        "credential_source": {"file": token_file, "format": {"type": "text"}},
    }
    if gsa:
        config["service_account_impersonation_url"] = (
            f"{IAM_CREDENTIALS_URL}/projects/-/serviceAccounts/{gsa}:generateAccessToken")
    return config


# ------------------------------------------------------------------ the check


def covers_plain_ksa(member: str, gke_project: str, namespace: str, ksa: str) -> bool:
    """Whether `member` includes the pod's KSA as GKE's metadata server presents it to every
    container: the GKE pool principal, its `serviceAccount:` form, or a principalSet of the
    pool that names the namespace or the whole pool (any spelling of the project number)."""
    pool = f"/workloadIdentityPools/{workload_pool(gke_project)}/"
    if member in (gke_member(gke_project, namespace, ksa), "allUsers", "allAuthenticatedUsers"):
        return True
    if member.startswith("principal://iam.googleapis.com/projects/"):
        return member.endswith(f"{pool}subject/ns/{namespace}/sa/{ksa}")
    if member.startswith("principalSet://iam.googleapis.com/projects/"):
        return member.endswith((f"{pool}*", f"{pool}namespace/{namespace}"))
    return False


@dataclass(frozen=True)
class Exposure:
    resource: str
    role: str
    member: str

    def describe(self) -> str:
        return f"{self.role} on {self.resource} for {self.member}"


def exposures(policy: Mapping[str, Any], resource: str, gke_project: str, namespace: str, ksa: str, *,
              act_as: bool = False) -> list[Exposure]:
    """Bindings of `policy` (on `resource`) that let a plain-KSA member reach Vertex.

    On a project: roles with aiplatform permissions. On the Google service account the
    sidecar acts as (`act_as`): roles that let a member act as it. Conditional bindings
    count too: their condition may well be true now.
    """
    found: list[Exposure] = []
    for binding in policy.get("bindings") or []:
        role = str(binding.get("role") or "")
        risky = role in ACT_AS_ROLES if act_as else (role.startswith(VERTEX_ROLE_PREFIXES) or role in VERTEX_ROLES)
        if not risky:
            continue
        for member in binding.get("members") or []:
            if covers_plain_ksa(member, gke_project, namespace, ksa):
                found.append(Exposure(resource, role, member))
    return found


def isolated_condition(found: Iterable[Exposure], checked: Iterable[str]) -> cond.Condition:
    items = sorted(set(found), key=lambda e: (e.resource, e.role, e.member))
    where = ", ".join(checked)
    if items:
        return cond.condition(
            "Isolated", False, "PlainPrincipalHasAccess",
            "Containers other than the sidecar can still reach Vertex AI through the GKE metadata server: "
            + "; ".join(e.describe() for e in items[:5]) + (" ..." if len(items) > 5 else "")
            + ". Remove these grants (the operator never removes grants it did not make).")
    return cond.condition("Isolated", True, "NoPlainGrant",
                          f"No grant on {where} lets the pod's plain service account principal reach Vertex AI "
                          "(custom roles and grants on folders or the organization are not checked).")


def manual_isolated_condition() -> cond.Condition:
    return cond.condition("Isolated", "Unknown", "Manual",
                          "binding.backend is manual: run the check in status.commands (the last ones) and "
                          "remove any grant it lists.")


# ------------------------------------------------------------------ manual setup


def setup_commands(pool: SidecarPool, pool_project: str | None) -> list[str]:
    """gcloud commands that create the dedicated pool and the provider for the cluster."""
    project = [f"--project={pool_project}"] if pool_project else [f"--project={pool.project_number}"]
    issuer = pool.issuer or "ISSUER_URL"
    create_pool = ["gcloud", "iam", "workload-identity-pools", "create", pool.pool_id, *project,
                   "--location=global", "--display-name=vertex-sidecar only"]
    create_provider = ["gcloud", "iam", "workload-identity-pools", "providers", "create-oidc", pool.provider_id,
                       *project, "--location=global", f"--workload-identity-pool={pool.pool_id}",
                       f"--issuer-uri={issuer}", "--attribute-mapping=google.subject=assertion.sub"]
    return [" ".join(shlex.quote(a) for a in create_pool), " ".join(shlex.quote(a) for a in create_provider)]


def check_commands(projects: Iterable[str], gsa: str | None, gke_project: str | None,
                   namespace: str, ksa: str) -> list[str]:
    """Commands that list grants reaching the plain KSA principal; each must print nothing."""
    if not gke_project:
        return []
    pool = workload_pool(gke_project)
    pattern = f"{pool}(\\[{namespace}/{ksa}\\]|/subject/ns/{namespace}/sa/{ksa}$|/namespace/{namespace}$|/\\*$)"
    out = []
    for p in sorted(set(projects)):
        out.append(" ".join(shlex.quote(a) for a in [
            "gcloud", "projects", "get-iam-policy", p, "--flatten=bindings[].members",
            f"--filter=bindings.members~'{pattern}'", "--format=table(bindings.role,bindings.members)"]))
    if gsa:
        out.append(" ".join(shlex.quote(a) for a in [
            "gcloud", "iam", "service-accounts", "get-iam-policy", gsa, "--flatten=bindings[].members",
            f"--filter=bindings.members~'{pattern}'", "--format=table(bindings.role,bindings.members)"]))
    return out


# ------------------------------------------------------------------ pods


def pod_problems(pod_spec: Mapping[str, Any], audience: str) -> list[str]:
    """Why a pod cannot keep the sidecar's token to the sidecar (the webhook refuses to inject)."""
    problems: list[str] = []
    if pod_spec.get("shareProcessNamespace") or pod_spec.get("hostPID"):
        problems.append("isolation sidecarOnly: it shares process namespaces (shareProcessNamespace or hostPID), "
                        "which lets other containers read the sidecar's files and memory")
    for volume in pod_spec.get("volumes") or []:
        for source in (volume.get("projected") or {}).get("sources") or []:
            token = source.get("serviceAccountToken")
            if token and token.get("audience") == audience:
                problems.append(f"isolation sidecarOnly: its own volume {volume.get('name')!r} requests a token for "
                                "the sidecar's pool provider, which only the sidecar may hold")
    return problems


def foreign_mounts(pod_spec: Mapping[str, Any], volume: str, sidecar: str) -> list[str]:
    """JSON pointers of mounts of `volume` in containers other than `sidecar` (e.g. copied in
    by a webhook that ran after ours), last first so that removing them in order is safe."""
    found: list[str] = []
    for section in ("initContainers", "containers", "ephemeralContainers"):
        for i, container in enumerate(pod_spec.get(section) or []):
            if container.get("name") == sidecar:
                continue
            for j, mount in enumerate(container.get("volumeMounts") or []):
                if mount.get("name") == volume:
                    found.append(f"/spec/{section}/{i}/volumeMounts/{j}")
    return found[::-1]
