"""`credential_reconcile`: a VertexCredential's identity, service account, objects and status."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.operator import objects as o
from tests.operator.test_crd_schema import validation_errors
from vertex_operator import conditions as cond
from vertex_operator import credential_reconcile as plan
from vertex_operator.crd import Credential, parse_credential
from vertex_operator.identity import GSA_ANNOTATION, WORKLOAD_IDENTITY_USER, Grant

GSA = "caller@my-vertex.iam.gserviceaccount.com"
PROVIDER = "https://iam.googleapis.com/projects/42/locations/global/workloadIdentityPools/k8s/providers/c1"
DIRECT = ("principal://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/"
          "my-project.svc.id.goog/subject/ns/team-a/sa/vertex")


def credential(uid: str = "uid-1", **spec: Any) -> Credential:
    body = o.credential(**spec)
    body["metadata"].update(uid=uid, generation=2)
    return parse_credential(body)


# ---------------------------------------------------------------- identity


def test_direct_workload_identity() -> None:
    found = plan.identity_of(credential())
    assert found.member == DIRECT and found.problem is None
    assert found.grants == (Grant("project", "my-project", "roles/aiplatform.user", DIRECT),)
    custom = plan.identity_of(credential(
        workloadIdentity={"projectId": "my-project", "projectNumber": "123456789012"},
        binding={"roles": ["roles/aiplatform.user", "roles/aiplatform.viewer"], "projects": ["a-proj1", "b-proj2"]}))
    assert [(g.target, g.role) for g in custom.grants] == [
        ("a-proj1", "roles/aiplatform.user"), ("a-proj1", "roles/aiplatform.viewer"),
        ("b-proj2", "roles/aiplatform.user"), ("b-proj2", "roles/aiplatform.viewer")]


def test_direct_workload_identity_with_a_looked_up_number() -> None:
    looked_up = credential(workloadIdentity={"projectId": "my-project"}, binding={"backend": "iamApi"})
    assert plan.project_to_look_up(looked_up) == "my-project"
    assert plan.identity_of(looked_up).problem[0] == "ProjectNumberUnknown"  # type: ignore[index]
    assert plan.identity_of(looked_up, "123456789012").member == DIRECT
    assert plan.project_to_look_up(credential()) is None


def test_through_a_google_service_account() -> None:
    member = "serviceAccount:my-project.svc.id.goog[team-a/vertex]"
    found = plan.identity_of(credential(workloadIdentity={"projectId": "my-project", "gcpServiceAccount": GSA}))
    assert found.member == member
    assert found.grants == (Grant("serviceAccount", GSA, WORKLOAD_IDENTITY_USER, member),)
    with_roles = plan.identity_of(credential(workloadIdentity={"projectId": "my-project", "gcpServiceAccount": GSA},
                                             binding={"projects": ["my-vertex"]}))
    assert Grant("project", "my-vertex", "roles/aiplatform.user", f"serviceAccount:{GSA}") in with_roles.grants


def test_federation() -> None:
    principal = ("principal://iam.googleapis.com/projects/42/locations/global/workloadIdentityPools/k8s/"
                 "subject/system:serviceaccount:team-a:vertex")
    bare = plan.identity_of(credential(federation={"audience": PROVIDER}))
    assert bare.member == principal and bare.grants == ()
    granted = plan.identity_of(credential(federation={"audience": PROVIDER}, binding={"projects": ["my-vertex"]}))
    assert granted.grants == (Grant("project", "my-vertex", "roles/aiplatform.user", principal),)
    custom = {"audience": "my-audience", "credentialConfig": {"configMapName": "wif"}}
    assert plan.identity_of(credential(federation=custom)) == plan.Identity(None)
    unknown = plan.identity_of(credential(federation=custom, binding={"projects": ["my-vertex"]}))
    assert unknown.problem is not None and unknown.problem[0] == "MemberUnknown"
    assert "system:serviceaccount:team-a:vertex" in unknown.problem[1]


def test_secret_key_needs_no_grants() -> None:
    assert plan.identity_of(credential(secretRef={"name": "key"})) == plan.Identity(None)


# ---------------------------------------------------------------- service account


def sa(annotations: dict[str, str] | None = None, owners: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "vertex", "namespace": o.NS, "annotations": annotations or {}}
    if owners is not None:
        meta["ownerReferences"] = owners
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}


def owner(uid: str = "uid-1", name: str = "vertex") -> dict[str, Any]:
    return {"apiVersion": "vertex.passthrough.dev/v1alpha1", "kind": "VertexCredential", "name": name,
            "uid": uid, "controller": True}


def test_created_service_account_is_owned_and_labelled() -> None:
    decision = plan.decide_service_account(credential(workloadIdentity={"projectId": "my-project",
                                                                        "gcpServiceAccount": GSA}), None)
    assert decision.action == "create" and decision.owned
    assert decision.body == {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {
        "name": "vertex", "namespace": o.NS,
        "labels": {"app.kubernetes.io/managed-by": "vertex-operator", "vertex.passthrough.dev/credential": "vertex"},
        "annotations": {"vertex.passthrough.dev/credential": "vertex", GSA_ANNOTATION: GSA},
        "ownerReferences": [owner()]}}


def test_owned_service_account_follows_the_spec() -> None:
    c = credential()  # direct: no Google service account annotation any more
    current = plan.service_account_body(credential(workloadIdentity={"projectId": "my-project", "gcpServiceAccount": GSA}))
    decision = plan.decide_service_account(c, current)
    assert decision.action == "patch" and decision.owned
    assert decision.body == {"metadata": {"annotations": {GSA_ANNOTATION: None}}}
    assert plan.decide_service_account(c, plan.service_account_body(c)).action == "keep"
    # Left over by an earlier credential of the same name: taken over.
    stale = plan.service_account_body(credential(uid="uid-0"))
    taken = plan.decide_service_account(c, stale)
    assert taken.action == "patch" and taken.body["metadata"]["ownerReferences"] == [owner()]  # type: ignore[index]


def test_existing_service_account_is_adopted_and_released_exactly() -> None:
    c = credential(workloadIdentity={"projectId": "my-project", "gcpServiceAccount": GSA})
    mine = sa({"team": "a"})
    decision = plan.decide_service_account(c, mine)
    assert decision.action == "patch" and not decision.owned
    patch = decision.body["metadata"]["annotations"]  # type: ignore[index]
    assert patch == {"vertex.passthrough.dev/credential": "vertex", GSA_ANNOTATION: GSA,
                     "vertex.passthrough.dev/added-annotations": GSA_ANNOTATION}
    adopted = sa({"team": "a", **patch})
    assert plan.decide_service_account(c, adopted).action == "keep"
    action, release = plan.release_service_account("vertex", "uid-1", adopted)
    assert action == "patch" and release == {"metadata": {"annotations": {
        "vertex.passthrough.dev/credential": None, "vertex.passthrough.dev/added-annotations": None,
        GSA_ANNOTATION: None}}}
    # An annotation the owner had set already is theirs: it stays on release.
    theirs = sa({GSA_ANNOTATION: GSA})
    patch = plan.decide_service_account(c, theirs).body["metadata"]["annotations"]  # type: ignore[index]
    assert patch == {"vertex.passthrough.dev/credential": "vertex"}
    action, release = plan.release_service_account("vertex", "uid-1", sa({GSA_ANNOTATION: GSA, **patch}))
    assert release == {"metadata": {"annotations": {"vertex.passthrough.dev/credential": None}}}


def test_service_account_conflicts() -> None:
    c = credential(workloadIdentity={"projectId": "my-project", "gcpServiceAccount": GSA})
    other_gsa = plan.decide_service_account(c, sa({GSA_ANNOTATION: "x@other-proj.iam.gserviceaccount.com"}))
    assert other_gsa.action == "conflict" and "not created by the operator" in other_gsa.message
    used = plan.decide_service_account(c, sa({"vertex.passthrough.dev/credential": "other"}))
    assert used.action == "conflict" and "already used by VertexCredential 'other'" in used.message
    owned = plan.decide_service_account(c, sa(owners=[owner("uid-9", "other")]))
    assert owned.action == "conflict" and "belongs to VertexCredential 'other'" in owned.message


def test_release() -> None:
    assert plan.release_service_account("vertex", "uid-1", sa(owners=[owner()])) == ("delete", None)
    assert plan.release_service_account("vertex", "uid-1", None) == ("keep", None)
    assert plan.release_service_account("vertex", "uid-1", sa({"x": "y"})) == ("keep", None)
    assert plan.release_service_account("vertex", "uid-1", sa(owners=[owner("uid-9", "other")])) == ("keep", None)


# ---------------------------------------------------------------- federation and Config Connector


def test_rendered_federation_config_map() -> None:
    body = plan.federation_config_map(credential(federation={"audience": PROVIDER, "tokenExpirationSeconds": 7200}))
    assert body is not None
    assert body["metadata"]["name"] == "vertex-federation-vertex"
    assert body["metadata"]["ownerReferences"] == [owner()]
    config = json.loads(body["data"]["credential-configuration.json"])
    assert config["type"] == "external_account"
    assert config["audience"] == PROVIDER.replace("https:", "")
    assert config["credential_source"] == {"file": "/var/run/secrets/vertex/federation/token",
                                           "format": {"type": "text"}}
    own = credential(federation={"audience": PROVIDER, "credentialConfig": {"configMapName": "wif"}})
    assert plan.federation_config_map(own) is None


def test_policy_member_objects() -> None:
    c = credential(workloadIdentity={"projectId": "my-project", "gcpServiceAccount": GSA})
    grant = plan.identity_of(c).grants[0]
    body = plan.policy_member_body(c, grant)
    assert body["apiVersion"] == "iam.cnrm.cloud.google.com/v1beta1" and body["kind"] == "IAMPolicyMember"
    assert body["spec"] == {"member": grant.member, "role": WORKLOAD_IDENTITY_USER, "resourceRef": {
        "kind": "IAMServiceAccount", "external": f"projects/my-vertex/serviceAccounts/{GSA}"}}
    assert body["metadata"]["ownerReferences"] == [owner()]
    name = plan.policy_member_name("vertex", grant)
    assert name == body["metadata"]["name"] and name.startswith("vertex-") and len(name) == len("vertex-") + 10
    project = Grant("project", "my-vertex", "roles/aiplatform.user", DIRECT)
    assert plan.policy_member_body(c, project)["spec"]["resourceRef"] == {"kind": "Project", "external": "projects/my-vertex"}
    assert plan.policy_member_name("vertex", project) != name


@pytest.mark.parametrize(("statuses", "expected"), [
    ([None, None], ("Unknown", "Waiting")),
    ([{"conditions": [{"type": "Ready", "status": "True", "reason": "UpToDate"}]}, None], ("Unknown", "Waiting")),
    ([{"conditions": [{"type": "Ready", "status": "True", "reason": "UpToDate"}]}] * 2, ("True", "Bound")),
    ([{"conditions": [{"type": "Ready", "status": "False", "reason": "UpdateFailed",
                       "message": "Error 403: Permission denied"}]}, None], ("False", "ConfigConnectorNotReady")),
])
def test_config_connector_readiness_is_mirrored(statuses: list[Any], expected: tuple[str, str]) -> None:
    grant = Grant("project", "my-vertex", "roles/aiplatform.user", DIRECT)
    objects = [(grant, {"metadata": {"name": f"m{i}"}, **({"status": s} if s else {})}) for i, s in enumerate(statuses)]
    found = plan.config_connector_condition(objects)
    assert (found["status"], found["reason"]) == expected
    if expected[1] == "ConfigConnectorNotReady":
        assert "(UpdateFailed): Error 403: Permission denied" in found["message"]


# ---------------------------------------------------------------- status


def test_ledger_round_trip() -> None:
    ledger = {Grant("project", "my-vertex", "roles/aiplatform.user", DIRECT): "iamApi",
              Grant("serviceAccount", GSA, WORKLOAD_IDENTITY_USER, "serviceAccount:x"): "configConnector"}
    status = {"bindings": plan.ledger_to_status(ledger) + [{"resource": "projects/p", "role": "r", "member": "m"}]}
    assert plan.ledger_from_status(status) == ledger  # entries without a known backend are not ours


def test_ready_follows_binding() -> None:
    grants = plan.identity_of(credential()).grants
    manual = plan.ready_condition(plan.manual_condition(grants), None, "vertex", DIRECT, [])
    assert (manual["status"], manual["reason"]) == ("True", "ManualBinding")
    propagating = plan.ready_condition(plan.propagating_condition(grants, 42), None, "vertex", DIRECT, [])
    assert (propagating["status"], propagating["reason"]) == ("False", "Propagating")
    assert "not an error" in propagating["message"]
    conflict = plan.ready_condition(plan.bound_condition(grants), ("ServiceAccountConflict", "taken"), "vertex", None, [])
    assert (conflict["status"], conflict["reason"], conflict["message"]) == ("False", "ServiceAccountConflict", "taken")
    assert plan.manual_condition(())["reason"] == "NothingToGrant"


def test_status_fits_the_schema_and_the_route_side_reads_it() -> None:
    c = credential(workloadIdentity={"projectId": "my-project", "gcpServiceAccount": GSA})
    found = plan.identity_of(c)
    binding = plan.bound_condition(found.grants)
    status = plan.CredentialStatus(
        generation=2, service_account="vertex", member=found.member, ledger={found.grants[0]: "iamApi"},
        binding=binding, ready=plan.ready_condition(binding, None, "vertex", found.member, [plan.SECRET_WARNING]),
        commands=["gcloud projects add-iam-policy-binding x"], warnings=[plan.SECRET_WARNING]).to_dict()
    status["conditions"] = cond.merge(None, status["conditions"])
    body = {**o.credential(workloadIdentity={"projectId": "my-project", "gcpServiceAccount": GSA}), "status": status}
    body["metadata"].update(generation=2)
    assert validation_errors(body) == []
    parsed = parse_credential(body)
    assert parsed.ready and parsed.service_account_name == "vertex"
