"""A VertexCredential → what should exist, and how its status reads; pure.

Planned here, applied by `credential_controller`:

* the Kubernetes service account: created and owned by the credential, or an existing one
  adopted (marked with an annotation, never deleted; on release only what we added to it
  is removed again);
* for `federation` without `credentialConfig`: the ConfigMap with the rendered
  `external_account` configuration;
* the IAM grants (`identity.Grant`) of the credential's mode, which a backend applies;
* Config Connector `IAMPolicyMember` objects for `binding.backend: configConnector`;
* the status: `Ready` and `BindingReady` conditions, `member`, `serviceAccountName`,
  `commands` (manual), `bindings` (the ledger of grants the operator made) and `warnings`.

The ledger is what makes deletion exact: a grant is recorded before it is written to
Google (so a crash right after the write cannot lose it), grants that already existed
are never recorded (they are not ours to remove), and only recorded grants are removed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

from vertex_operator import conditions as cond
from vertex_operator import isolation, render
from vertex_operator.crd import (
    API_VERSION, CREDENTIAL_KIND, CREDENTIAL_LABEL, GROUP, MANAGED_BY, MANAGED_BY_LABEL, PREFIX, Credential,
)
from vertex_operator.identity import (
    DEFAULT_ROLE, GSA_ANNOTATION, WORKLOAD_IDENTITY_USER, Grant, direct_member, external_account_config,
    federation_member, gke_member, service_account_member, service_account_project,
)

CREDENTIAL_ANNOTATION = f"{PREFIX}/credential"  # on a service account: the credential using it
ADDED_ANNOTATIONS = f"{PREFIX}/added-annotations"  # on an adopted one: what we added to it

KCC_GROUP = "iam.cnrm.cloud.google.com"
KCC_VERSION = "v1beta1"
KCC_PLURAL = "iampolicymembers"
KCC_KIND = "IAMPolicyMember"

Backend = Literal["iamApi", "configConnector", "manual"]
Ledger = dict[Grant, str]  # grant → the backend that made it

SECRET_WARNING = ("secretRef uses a long-lived service account key: anyone who can read the Secret "
                  "can act as that Google service account until the key is deleted. Prefer "
                  "workloadIdentity (GKE) or federation.")


# ------------------------------------------------------------------ identity


@dataclass(frozen=True)
class Identity:
    """The IAM member of a credential and the grants it needs; or why they are unknown."""

    member: str | None
    grants: tuple[Grant, ...] = ()
    problem: tuple[str, str] | None = None  # (reason, message)


def project_to_look_up(credential: Credential) -> str | None:
    """The project whose number must come from Resource Manager (direct WI without projectNumber)."""
    wi = credential.workload_identity
    if wi is not None and not wi.gcp_service_account and not wi.project_number:
        return wi.project_id
    return None


def identity_of(credential: Credential, project_number: str | None = None) -> Identity:
    ns, ksa = credential.namespace, credential.service_account_name
    roles = credential.binding_roles or (DEFAULT_ROLE,)
    projects = credential.binding_projects
    wi, fed = credential.workload_identity, credential.federation
    if credential.sidecar_pool is not None:
        # sidecarOnly: the dedicated pool's principal, never the GKE pool's.
        gsa = wi.gcp_service_account if wi is not None else None
        on = projects or ((wi.project_id,) if wi is not None and not gsa else ())
        member, grants = isolation.sidecar_grants(credential.sidecar_pool, ns, ksa, roles, on, gsa)
        return Identity(member, grants)
    if wi is not None and wi.gcp_service_account:
        gsa = wi.gcp_service_account
        member = gke_member(wi.project_id, ns, ksa)
        grants = [Grant("serviceAccount", gsa, WORKLOAD_IDENTITY_USER, member)]
        # Roles for the Google service account itself only when asked for: it is often
        # shared and managed elsewhere.
        grants += [Grant("project", p, r, service_account_member(gsa)) for p in projects or () for r in roles]
        return Identity(member, tuple(sorted(set(grants))))
    if wi is not None:
        number = wi.project_number or project_number
        if not number:
            return Identity(None, problem=(
                "ProjectNumberUnknown",
                f"The number of project {wi.project_id} is not known yet (set "
                "spec.workloadIdentity.projectNumber to skip the lookup)."))
        member = direct_member(number, wi.project_id, ns, ksa)
        direct = {Grant("project", p, r, member) for p in projects or (wi.project_id,) for r in roles}
        return Identity(member, tuple(sorted(direct)))
    if fed is not None:
        federated = federation_member(fed.audience, ns, ksa)
        if federated is None:
            if projects:
                return Identity(None, problem=(
                    "MemberUnknown",
                    f"spec.federation.audience {fed.audience!r} does not name a workload identity pool "
                    "provider, so the operator cannot derive the federated principal. Grant the roles "
                    "yourself to principal://iam.googleapis.com/projects/NUMBER/locations/global/"
                    f"workloadIdentityPools/POOL/subject/system:serviceaccount:{ns}:{ksa} and remove "
                    "spec.binding.projects."))
            return Identity(None)
        on_projects = {Grant("project", p, r, federated) for p in projects or () for r in roles}
        return Identity(federated, tuple(sorted(on_projects)))
    return Identity(None)  # secretRef: the key's own account holds its roles


# ------------------------------------------------------------------ ledger


def ledger_from_status(status: Mapping[str, Any] | None) -> Ledger:
    ledger: Ledger = {}
    for item in (status or {}).get("bindings") or []:
        if not isinstance(item, Mapping):
            continue
        grant = Grant.from_status(item)
        backend = item.get("backend")
        if grant is not None and backend in ("iamApi", "configConnector"):
            ledger[grant] = backend
    return ledger


def ledger_to_status(ledger: Mapping[Grant, str]) -> list[dict[str, str]]:
    return [{**g.to_status(), "backend": ledger[g]} for g in sorted(ledger)]


# ------------------------------------------------------------------ service account


def owner_reference(credential: Credential) -> dict[str, Any]:
    # No blockOwnerDeletion: it would need update rights on the credential's finalizers.
    return {"apiVersion": API_VERSION, "kind": CREDENTIAL_KIND, "name": credential.name,
            "uid": credential.uid, "controller": True}


def _gsa(credential: Credential) -> str | None:
    """The Google SA to annotate the KSA with. Never with sidecarOnly: GKE's metadata server
    would then act as it for every container (only the sidecar's credential file does)."""
    wi = credential.workload_identity
    if credential.sidecar_pool is not None:
        return None
    return wi.gcp_service_account if wi is not None else None


def service_account_body(credential: Credential) -> dict[str, Any]:
    annotations = {CREDENTIAL_ANNOTATION: credential.name}
    if gsa := _gsa(credential):
        annotations[GSA_ANNOTATION] = gsa
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": credential.service_account_name,
            "namespace": credential.namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, CREDENTIAL_LABEL: credential.name},
            "annotations": annotations,
            "ownerReferences": [owner_reference(credential)],
        },
    }


@dataclass(frozen=True)
class AccountDecision:
    """What to do with the credential's Kubernetes service account."""

    action: Literal["create", "patch", "keep", "conflict"]
    body: dict[str, Any] | None = None  # create: the object; patch: a merge patch
    owned: bool = False
    message: str = ""  # conflict: why


def _credential_refs(meta: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [r for r in meta.get("ownerReferences") or []
            if r.get("kind") == CREDENTIAL_KIND and str(r.get("apiVersion", "")).startswith(f"{GROUP}/")]


def decide_service_account(credential: Credential, current: Mapping[str, Any] | None) -> AccountDecision:
    if current is None:
        return AccountDecision("create", service_account_body(credential), owned=True)
    meta = current.get("metadata") or {}
    annotations: Mapping[str, str] = meta.get("annotations") or {}
    name = credential.service_account_name
    refs = _credential_refs(meta)
    gsa = _gsa(credential)
    if any(r.get("uid") == credential.uid for r in refs) or any(r.get("name") == credential.name for r in refs):
        # Ours — or of an earlier credential of the same name, which we take over.
        want_annotations: dict[str, str | None] = {CREDENTIAL_ANNOTATION: credential.name, GSA_ANNOTATION: gsa}
        want_labels = {MANAGED_BY_LABEL: MANAGED_BY, CREDENTIAL_LABEL: credential.name}
        patch: dict[str, Any] = {}
        changed_annotations = {k: v for k, v in want_annotations.items() if annotations.get(k) != v}
        if changed_annotations:
            patch["annotations"] = changed_annotations
        if any((meta.get("labels") or {}).get(k) != v for k, v in want_labels.items()):
            patch["labels"] = want_labels
        if not any(r.get("uid") == credential.uid for r in refs):
            others = [r for r in meta.get("ownerReferences") or [] if r not in refs]
            patch["ownerReferences"] = [*others, owner_reference(credential)]
        return AccountDecision("patch" if patch else "keep", {"metadata": patch} if patch else None, owned=True)
    if refs:
        return AccountDecision("conflict", message=(
            f"ServiceAccount {name} belongs to VertexCredential {refs[0].get('name')!r}. Set "
            "spec.serviceAccountName to another name, or delete that credential."))
    user = annotations.get(CREDENTIAL_ANNOTATION)
    if user and user != credential.name:
        return AccountDecision("conflict", message=(
            f"ServiceAccount {name} is already used by VertexCredential {user!r}; one service account "
            "can serve one credential. Set spec.serviceAccountName to another name."))
    # Adopted: add what the mode needs, remember what we added, never take ownership.
    added = {a for a in annotations.get(ADDED_ANNOTATIONS, "").split(",") if a}
    changes: dict[str, str | None] = {}
    if user != credential.name:
        changes[CREDENTIAL_ANNOTATION] = credential.name
    present = annotations.get(GSA_ANNOTATION)
    if gsa and present != gsa:
        if present and GSA_ANNOTATION not in added:
            return AccountDecision("conflict", message=(
                f"ServiceAccount {name} (not created by the operator) is annotated {GSA_ANNOTATION}="
                f"{present}, not {gsa}. Remove that annotation, or set "
                "spec.workloadIdentity.gcpServiceAccount to it."))
        changes[GSA_ANNOTATION] = gsa
        if present is None:
            added.add(GSA_ANNOTATION)
    elif not gsa and present and GSA_ANNOTATION in added:
        changes[GSA_ANNOTATION] = None
        added.discard(GSA_ANNOTATION)
    recorded = ",".join(sorted(added)) or None
    if recorded != annotations.get(ADDED_ANNOTATIONS):
        changes[ADDED_ANNOTATIONS] = recorded
    if not changes:
        return AccountDecision("keep")
    return AccountDecision("patch", {"metadata": {"annotations": changes}})


def release_service_account(credential_name: str, credential_uid: str,
                            current: Mapping[str, Any] | None) -> tuple[Literal["delete", "patch", "keep"], dict[str, Any] | None]:
    """Undo `decide_service_account`: delete our own account, strip what we added to an adopted one."""
    if current is None:
        return "keep", None
    meta = current.get("metadata") or {}
    refs = _credential_refs(meta)
    if any(r.get("uid") == credential_uid for r in refs):
        return "delete", None
    annotations: Mapping[str, str] = meta.get("annotations") or {}
    if refs or annotations.get(CREDENTIAL_ANNOTATION) != credential_name:
        return "keep", None  # someone else's now
    removals: dict[str, None] = {CREDENTIAL_ANNOTATION: None}
    if ADDED_ANNOTATIONS in annotations:
        removals[ADDED_ANNOTATIONS] = None
    for key in annotations.get(ADDED_ANNOTATIONS, "").split(","):
        if key and key in annotations:
            removals[key] = None
    return "patch", {"metadata": {"annotations": removals}}


# ------------------------------------------------------------------ federation ConfigMap


def federation_config_map(credential: Credential) -> dict[str, Any] | None:
    """The operator-rendered credential configuration, for federation without credentialConfig."""
    fed = credential.federation
    if fed is None or not fed.rendered:
        return None
    token_file = f"{render.FEDERATION_DIR}/{render.FEDERATION_TOKEN_FILE}"
    if credential.sidecar_pool is not None:
        wi = credential.workload_identity
        config = isolation.credential_config(credential.sidecar_pool, token_file,
                                             wi.gcp_service_account if wi is not None else None)
    else:
        config = external_account_config(fed.audience, token_file)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": fed.config_map_name,
            "namespace": credential.namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, CREDENTIAL_LABEL: credential.name},
            "ownerReferences": [owner_reference(credential)],
        },
        "data": {fed.config_map_key: json.dumps(config, indent=2) + "\n"},
    }


# ------------------------------------------------------------------ Config Connector


def policy_member_name(credential_name: str, grant: Grant) -> str:
    digest = hashlib.sha256(f"{grant.resource}|{grant.role}|{grant.member}".encode()).hexdigest()[:10]
    return f"{credential_name[:200]}-{digest}"


def policy_member_body(credential: Credential, grant: Grant) -> dict[str, Any]:
    """An IAMPolicyMember: non-authoritative, exactly one member and role (never IAMPolicy)."""
    if grant.kind == "project":
        ref = {"kind": "Project", "external": f"projects/{grant.target}"}
    else:
        project = service_account_project(grant.target)
        ref = {"kind": "IAMServiceAccount", "external": f"projects/{project}/serviceAccounts/{grant.target}"}
    return {
        "apiVersion": f"{KCC_GROUP}/{KCC_VERSION}",
        "kind": KCC_KIND,
        "metadata": {
            "name": policy_member_name(credential.name, grant),
            "namespace": credential.namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, CREDENTIAL_LABEL: credential.name},
            "ownerReferences": [owner_reference(credential)],
        },
        "spec": {"member": grant.member, "role": grant.role, "resourceRef": ref},
    }


def config_connector_condition(objects: Iterable[tuple[Grant, Mapping[str, Any] | None]]) -> cond.Condition:
    """BindingReady mirrored from the IAMPolicyMembers' own Ready conditions."""
    waiting: list[str] = []
    ready = 0
    for grant, obj in objects:
        name = (obj or {}).get("metadata", {}).get("name") or "?"
        found = cond.find(((obj or {}).get("status") or {}).get("conditions"), "Ready")
        if found is None:
            waiting.append(name)
        elif found.get("status") == "True":
            ready += 1
        elif found.get("status") == "False":
            return cond.condition(
                "BindingReady", False, "ConfigConnectorNotReady",
                f"IAMPolicyMember {name} ({grant.describe()}) is not Ready "
                f"({found.get('reason') or 'NotReady'}): {found.get('message') or 'no message'}. "
                f"kubectl describe iampolicymember {name}")
        else:
            waiting.append(name)
    if waiting:
        return cond.condition("BindingReady", "Unknown", "Waiting",
                              f"Waiting for Config Connector to apply IAMPolicyMember {', '.join(waiting)}.")
    return cond.condition("BindingReady", True, "Bound",
                          f"Config Connector applied {ready} IAMPolicyMember(s).")


# ------------------------------------------------------------------ status


def manual_condition(grants: tuple[Grant, ...]) -> cond.Condition:
    if not grants:
        return cond.condition("BindingReady", True, "NothingToGrant",
                              "No IAM grants are needed (spec.binding lists no projects for this mode).")
    return cond.condition(
        "BindingReady", "Unknown", "Manual",
        f"binding.backend is manual: the operator changes nothing in Google Cloud and cannot check it. "
        f"Run the {len(grants)} command(s) in status.commands once.")


def bound_condition(grants: Iterable[Grant]) -> cond.Condition:
    items = sorted(grants)
    if not items:
        return cond.condition("BindingReady", True, "NothingToGrant", "No IAM grants are needed.")
    return cond.condition("BindingReady", True, "Bound",
                          f"{len(items)} grant(s) in place: " + "; ".join(g.describe() for g in items[:5])
                          + (" ..." if len(items) > 5 else ""))


def propagating_condition(grants: Iterable[Grant], remaining: float) -> cond.Condition:
    items = sorted(grants)
    return cond.condition(
        "BindingReady", "Unknown", "Propagating",
        f"Granted {len(items)} binding(s); IAM changes take effect within about 2 minutes (at most 7). "
        f"This is not an error: re-checked in {max(1, round(remaining))}s.")


def ready_condition(binding: cond.Condition, account_problem: tuple[str, str] | None,
                    service_account: str, member: str | None, warnings: list[str]) -> cond.Condition:
    if account_problem is not None:
        return cond.condition("Ready", False, *account_problem)
    who = f"Pods run as ServiceAccount {service_account}" + (f" ({member})" if member else "")
    note = (" Warning: " + " ".join(warnings)) if warnings else ""
    if binding["status"] == "True":
        return cond.condition("Ready", True, "Ready", f"{who}; their IAM grants are in place.{note}")
    if binding["reason"] == "Manual":
        return cond.condition("Ready", True, "ManualBinding",
                              f"{who}. The IAM grants are not checked (backend manual): run the commands "
                              f"in status.commands once.{note}")
    return cond.condition("Ready", False, binding["reason"], binding["message"])


@dataclass
class CredentialStatus:
    """The full status of a credential (conditions without transition times)."""

    generation: int
    service_account: str
    member: str | None
    ledger: Ledger
    binding: cond.Condition
    ready: cond.Condition
    commands: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    extra: list[cond.Condition] = field(default_factory=list)  # e.g. Isolated (sidecarOnly)

    def to_dict(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "observedGeneration": self.generation,
            "serviceAccountName": self.service_account,
            "conditions": [
                {**self.ready, "observedGeneration": self.generation},
                {**self.binding, "observedGeneration": self.generation},
                *({**c, "observedGeneration": self.generation} for c in self.extra),
            ],
            "bindings": ledger_to_status(self.ledger),
        }
        if self.member:
            status["member"] = self.member
        if self.commands:
            status["commands"] = self.commands
        if self.warnings:
            status["warnings"] = self.warnings
        return status
