"""The chart grants the operator exactly the API requests it makes.

The operator tests (kopf against kmock) record every request the operator sends as
sorted unique (apiGroup, resource, verb) triples in tests/operator/rbac_requests.json.
Here the chart is rendered by helm, the rules bound to the operator's ServiceAccount are
collected, and the two sets are compared both ways: a request the chart does not grant
fails (the operator started using something new), and a grant nobody requests fails too
(least privilege), unless it is in the commented allowlist below.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pytest

from tests.chart.tools import NAMESPACE, ROOT, Docs, helm, one, render_args

RECORD = ROOT / "tests" / "operator" / "rbac_requests.json"

Triple = tuple[str, str, str]

# Granted although the kmock-based tests cannot observe the request. Keep it short and
# say why; everything else must come from the record.
ALLOWLIST: dict[Triple, str] = {
    # (none yet: kopf's Events are recorded, kopf's peering is off (the operator elects its
    # leader on a Lease, recorded by tests/operator/test_leadership.py), and the webhook
    # configuration belongs to the chart.)
}


LEADER_ELECTION = "leader-election"  # app.kubernetes.io/component of the Lease Role


def is_lease(triple: Triple) -> bool:
    return triple[:2] == ("coordination.k8s.io", "leases")


def recorded() -> set[Triple]:
    """The recorded requests, except leader election's (a Role of their own, see below)."""
    return {t for t in recorded_all() if not is_lease(t)}


def recorded_leases() -> set[Triple]:
    found = {t for t in recorded_all() if is_lease(t)}
    assert found, "no Lease requests recorded: run tests/operator/test_leadership.py with VERTEX_RBAC_UPDATE=1"
    return found


def recorded_all() -> set[Triple]:
    if not RECORD.exists():
        pytest.skip(f"{RECORD.relative_to(ROOT)} is absent: run the operator tests with "
                    "VERTEX_RBAC_UPDATE=1 to record the operator's API requests")
    triples: set[Triple] = set()
    for item in json.loads(RECORD.read_text()):
        group, resource, verb = item
        triples.add((str(group), str(resource), str(verb)))
    assert triples, f"{RECORD.name} is empty"
    return triples


def operator_grants(docs: Docs, component: str | None = None) -> dict[str, set[Triple]]:
    """Granted (group, resource, verb) by scope: "" for cluster-wide, else the namespace.
    `component` None: every binding except leader election's; else only that component's."""
    deployment = one(docs, "Deployment")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    roles: dict[tuple[str, str, str], dict[str, Any]] = {}
    for doc in docs:
        if doc["kind"] in ("ClusterRole", "Role"):
            roles[(doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])] = doc
    grants: dict[str, set[Triple]] = defaultdict(set)
    for binding in docs:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if not any(s == {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
                   for s in binding.get("subjects", [])):
            continue
        scope = binding["metadata"].get("namespace", "") if binding["kind"] == "RoleBinding" else ""
        ref = binding["roleRef"]
        role_ns = scope if ref["kind"] == "Role" else ""
        role = roles.get((ref["kind"], role_ns, ref["name"]))
        assert role is not None, f"{binding['kind']} {binding['metadata']['name']} refers to a missing {ref}"
        is_election = (role["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == LEADER_ELECTION
        if is_election != (component == LEADER_ELECTION):
            continue
        grants[scope] |= expand(role["rules"])
    return dict(grants)


def expand(rules: list[dict[str, Any]]) -> set[Triple]:
    triples = set()
    for rule in rules:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {field}: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    triples.add((group, resource, verb))
    return triples


def assert_exact(granted: set[Triple], where: str) -> None:
    needed = recorded()
    missing = sorted(needed - granted)
    assert not missing, (
        f"the operator makes requests the chart does not grant ({where}): {missing}. Add them to "
        "vp.operatorRules in charts/vertex-passthrough/templates/_helpers.tpl.")
    extra = sorted(granted - needed - set(ALLOWLIST))
    assert not extra, (
        f"the chart grants what the operator never requests ({where}): {extra}. Remove them, or "
        "add them to ALLOWLIST with the reason the operator tests cannot observe them.")


def test_record_exists_and_is_well_formed() -> None:
    triples = recorded()
    assert all(len(t) == 3 and all(isinstance(x, str) for x in t) for t in triples)


# What writes into a namespace's workloads: granted per namespace, never cluster-wide
# (unless rbac.clusterWideWorkloadAccess). Everything else the operator needs wherever it watches.
WORKLOAD_RESOURCES = {("", "configmaps"), ("", "serviceaccounts"), ("iam.cnrm.cloud.google.com", "iampolicymembers")}
WORKLOAD_KINDS = {("apps", "deployments"), ("apps", "statefulsets"), ("apps", "daemonsets")}
SYSTEM = {"kube-system", "kube-public", "kube-node-lease", NAMESPACE}
# --injection-label (webhook.namespaceOptIn): the operator reads namespaces' labels, cluster-wide.
NAMESPACE_READ = {("", "namespaces", "get")}


def is_workload_write(triple: Triple) -> bool:
    group, resource, verb = triple
    return (group, resource) in WORKLOAD_RESOURCES or ((group, resource) in WORKLOAD_KINDS and verb != "list"
                                                       and verb != "watch")


def split() -> tuple[set[Triple], set[Triple]]:
    needed = recorded()
    writes = {t for t in needed if is_workload_write(t)}
    return needed - writes, writes


def test_cluster_wide_role_never_writes_workloads(default_docs: Docs) -> None:
    grants = operator_grants(default_docs)
    watch, writes = split()
    assert writes, "the record has workload writes (ConfigMaps, ServiceAccounts, pod templates)"
    assert set(grants) == {""}, "no rbac.workloadNamespaces: no namespace is granted writes"
    assert grants[""] == watch, sorted(grants[""] ^ watch)  # reading and its own CRs only
    assert NAMESPACE_READ <= watch
    assert not {t for t in grants[""] if is_workload_write(t)}


def test_workload_writes_are_bound_per_listed_namespace(rendered: dict[str, Docs]) -> None:
    grants = operator_grants(rendered["workload-namespaces"])
    watch, writes = split()
    assert set(grants) == {"", "team-a", "team-b"}
    assert grants[""] == watch
    for namespace in ("team-a", "team-b"):
        assert grants[namespace] == writes, namespace  # cluster ∪ namespace = exactly what it uses
        assert_exact(grants[""] | grants[namespace], f"namespace {namespace}")
    bindings = [d for d in rendered["workload-namespaces"] if d["kind"] == "RoleBinding"
                and not d["metadata"]["name"].endswith(f"-{LEADER_ELECTION}")]
    assert {b["metadata"]["namespace"] for b in bindings} == {"team-a", "team-b"}
    assert all(b["roleRef"]["kind"] == "ClusterRole" for b in bindings)


def test_cluster_wide_writes_only_when_asked_for(rendered: dict[str, Docs]) -> None:
    grants = operator_grants(rendered["cluster-wide-writes"])
    assert set(grants) == {""}
    assert_exact(grants[""], "ClusterRoles (rbac.clusterWideWorkloadAccess)")


def test_namespaced_roles_are_exactly_what_the_operator_uses(rendered: dict[str, Docs]) -> None:
    grants = operator_grants(rendered["namespaced"])
    assert set(grants) == {"", "team-a", "team-b"}, "watchNamespaces: a Role per namespace"
    assert grants[""] == NAMESPACE_READ, "cluster-wide only the namespace labels (webhook opt-in)"
    for namespace in ("team-a", "team-b"):
        assert_exact(grants[""] | grants[namespace], f"Role in {namespace}")


def test_no_variant_grants_anything_in_system_namespaces(rendered: dict[str, Docs]) -> None:
    for name, docs in rendered.items():
        assert not set(operator_grants(docs)) & SYSTEM, name


@pytest.mark.parametrize("value", ["operator.watchNamespaces", "rbac.workloadNamespaces"])
@pytest.mark.parametrize("namespace", ["kube-system", "kube-public", NAMESPACE])
def test_system_namespaces_cannot_be_listed(value: str, namespace: str) -> None:
    result = helm(*render_args(sets=(f"{value}={{team-a,{namespace}}}",)), check=False)
    assert result.returncode != 0 and f"namespace {namespace} cannot be served" in result.stderr


def test_every_variant_grants_each_served_namespace_exactly_what_it_uses(rendered: dict[str, Docs]) -> None:
    watch, _ = split()
    for name, docs in rendered.items():
        grants = operator_grants(docs)
        cluster = grants.get("", set())
        namespaces = [ns for ns in grants if ns]
        for namespace in namespaces:
            assert_exact(cluster | grants[namespace], f"{name}, namespace {namespace}")
        if not namespaces:  # reading only, or (asked for) everything cluster-wide
            assert cluster - NAMESPACE_READ in (watch - NAMESPACE_READ, recorded() - NAMESPACE_READ), name


def test_bindings_follow_the_service_account(rendered: dict[str, Docs]) -> None:
    docs = rendered["own-account"]
    assert not [d for d in docs if d["kind"] == "ServiceAccount"]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "platform-sa"
    assert set(operator_grants(docs)) == {""}


def test_operator_cannot_write_webhook_configurations_or_secrets(rendered: dict[str, Docs]) -> None:
    # The two classic escalation paths for an injecting operator.
    for docs in rendered.values():
        for granted in operator_grants(docs).values():
            groups_resources = {(g, r) for g, r, _ in granted}
            assert ("admissionregistration.k8s.io", "mutatingwebhookconfigurations") not in groups_resources
            assert ("", "secrets") not in groups_resources


def test_user_facing_roles_never_grant_credentials_write(all_docs: Docs) -> None:
    # VertexCredentials choose Google identities and IAM bindings: aggregated roles may read
    # them but never write them (that stays with whoever installs the chart).
    for role in all_docs:
        labels = role.get("metadata", {}).get("labels", {})
        if role["kind"] != "ClusterRole" or not any(k.startswith("rbac.authorization.k8s.io/aggregate-to")
                                                    for k in labels):
            continue
        for group, resource, verb in expand(role["rules"]):
            if resource.startswith("vertexcredentials"):
                assert verb in ("get", "list", "watch"), (role["metadata"]["name"], resource, verb)


def test_leader_election_is_a_role_in_the_release_namespace_only(rendered: dict[str, Docs]) -> None:
    for name, docs in rendered.items():
        grants = operator_grants(docs, LEADER_ELECTION)
        assert grants == {NAMESPACE: recorded_leases()}, name
        for scope, granted in operator_grants(docs).items():
            assert not {t for t in granted if is_lease(t)}, (name, scope)
