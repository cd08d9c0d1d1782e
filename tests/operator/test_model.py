"""The pure building blocks: `crd` parsing, `selection`, `conditions`."""

from __future__ import annotations

from typing import Any

import pytest

from tests.operator import objects as o
from vertex_operator import conditions as cond
from vertex_operator.crd import SpecError, parse_credential, parse_route
from vertex_operator.selection import (
    LabelSelector, Requirement, SelectorError, Workload, parse_selector, selecting, workload_from_body,
)

# ---------------------------------------------------------------- crd


def test_route_defaults() -> None:
    body = o.route()
    body["metadata"].update(uid="u1", generation=3, creationTimestamp="2025-01-01T00:00:00Z")
    route = parse_route(body)
    assert (route.name, route.namespace, route.uid, route.generation) == ("gemini", "team-a", "u1", 3)
    assert route.defaults.api_version == "v1"
    assert route.sidecar.port == 4000 and route.sidecar.admin_port == 9464
    assert route.sidecar.native_sidecar == "auto" and route.sidecar.rollout_strategy == "Workload"
    assert route.config_map_name == "vertex-sidecar-gemini"
    (rule,) = route.effective_rules()
    assert (rule.name, rule.projects, rule.locations, rule.models) == (
        "gemini", ("my-project",), ("*",), ("gemini-*",))


@pytest.mark.parametrize(("change", "message"), [
    ({"workloadSelector": {}}, "spec.workloadSelector: required"),
    ({"workloadSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}, "operator"),
    ({"credentialRef": {}}, "spec.credentialRef.name: required"),
    ({"defaults": {"project": "my-project", "location": "moon"}}, "spec.defaults.location: 'moon'"),
    ({"defaults": {"project": "X", "location": "us"}}, "spec.defaults.project"),
    ({"fallbackLocations": ["mars-1"]}, "spec.fallbackLocations"),
    ({"limits": {"requestsPerMinute": 0}}, "spec.limits.requestsPerMinute"),
    ({"rules": [{"name": "a"}, {"name": "a"}]}, "duplicate rule name"),
    ({"rules": [{"match": {}}]}, "spec.rules[0].name: required"),
    ({"sidecar": {"port": 9464}}, "must all differ"),
    ({"sidecar": {"nativeSidecar": True}}, "nativeSidecar"),
    ({"sidecar": {"rolloutStrategy": "Always"}}, "rolloutStrategy"),
    ({"upstreams": {"vertex": "https://x"}}, "unknown key"),
    ({"match": {"models": []}}, "must not be empty"),
])
def test_route_errors_name_the_field(change: dict[str, Any], message: str) -> None:
    body = o.route()
    body["spec"].update(change)
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_route(body)


def test_credential_modes_and_defaults() -> None:
    wi = parse_credential(o.credential())
    assert (wi.mode, wi.sidecar_type, wi.service_account_name, wi.binding_backend) == (
        "workloadIdentity", "adc", "vertex", "manual")
    fed = parse_credential(o.credential(federation={"audience": "aud", "credentialConfig": {"configMapName": "c"}}))
    assert fed.sidecar_type == "external_account_file"
    assert fed.federation is not None and fed.federation.config_map_key == "credential-configuration.json"
    assert fed.federation.token_expiration_seconds == 3600
    rendered = parse_credential(o.credential(federation={
        "audience": "https://iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/k8s/providers/c1"}))
    assert rendered.federation is not None and rendered.federation.rendered
    assert rendered.federation.config_map_name == "vertex-federation-vertex"
    assert not fed.federation.rendered
    looked_up = parse_credential(o.credential(workloadIdentity={"projectId": "my-project"}, binding={"backend": "iamApi"}))
    assert looked_up.workload_identity is not None and looked_up.workload_identity.project_number is None
    assert (looked_up.binding_roles, looked_up.binding_projects) == (None, None)
    key = parse_credential(o.credential(secretRef={"name": "s"}, serviceAccountName="runner"))
    assert key.sidecar_type == "service_account_file" and key.service_account_name == "runner"
    assert key.secret is not None and key.secret.key == "key.json"


@pytest.mark.parametrize(("spec", "message"), [
    ({}, "exactly one"),
    ({"secretRef": {"name": "s"}, "federation": {"audience": "a", "credentialConfig": {"configMapName": "c"}}},
     "exactly one"),
    ({"workloadIdentity": {}}, "projectId: required"),
    ({"workloadIdentity": {"projectId": "my-project", "gcpServiceAccount": "nope"}}, "gcpServiceAccount"),
    ({"federation": {"audience": "a"}}, "without credentialConfig it must name the pool provider"),
    ({"federation": {"audience": "a", "credentialConfig": {}}}, "configMapName: required"),
    ({"workloadIdentity": {"projectId": "my-project"}}, "projectNumber: direct Workload Identity needs it"),
    ({"secretRef": {"name": "s"}, "binding": {"backend": "manual"}}, "does not apply to secretRef"),
    ({"workloadIdentity": {"projectId": "my-project", "projectNumber": "1"}, "binding": {"roles": ["admin"]}},
     "spec.binding.roles"),
])
def test_credential_errors(spec: dict[str, Any], message: str) -> None:
    body = o.credential()
    body["spec"] = spec
    with pytest.raises(SpecError, match=message):
        parse_credential(body)


def test_credential_readiness() -> None:
    body = o.credential()
    assert parse_credential(body).ready is False
    assert "no status yet" in parse_credential(body).ready_message
    ready = {**body, **o.ready_status()}
    assert parse_credential(ready).ready is True
    stale = {**ready, "metadata": {**body["metadata"], "generation": 2}}
    assert parse_credential(stale).ready is False and "not reconciled yet" in parse_credential(stale).ready_message
    failing = {**body, "status": {"conditions": [
        {"type": "Ready", "status": "False", "reason": "BindingFailed", "message": "403 on setIamPolicy"}]}}
    parsed = parse_credential(failing)
    assert not parsed.ready and parsed.ready_message == "is not Ready (BindingFailed): 403 on setIamPolicy"


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize(("selector", "labels", "expected"), [
    ({"matchLabels": {"app": "a"}}, {"app": "a", "x": "y"}, True),
    ({"matchLabels": {"app": "a"}}, {"app": "b"}, False),
    ({"matchLabels": {"app": "a"}}, {}, False),
    ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["x", "y"]}]}, {"tier": "y"}, True),
    ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["x"]}]}, {}, False),
    ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["x"]}]}, {}, True),
    ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["x"]}]}, {"tier": "x"}, False),
    ({"matchExpressions": [{"key": "ai", "operator": "Exists"}]}, {"ai": ""}, True),
    ({"matchExpressions": [{"key": "ai", "operator": "DoesNotExist"}]}, {"ai": ""}, False),
    ({"matchLabels": {"app": "a"}, "matchExpressions": [{"key": "off", "operator": "DoesNotExist"}]},
     {"app": "a", "off": "1"}, False),
])
def test_label_selectors(selector: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(selector).matches(labels) is expected


@pytest.mark.parametrize("bad", [
    {"matchLabels": ["a"]},
    {"matchExpressions": [{"key": "a", "operator": "In"}]},
    {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
    {"matchExpressions": "a=b"},
])
def test_bad_selectors(bad: dict[str, Any]) -> None:
    with pytest.raises(SelectorError):
        parse_selector(bad)


def test_selector_text() -> None:
    selector = LabelSelector({"app": "a"}, (Requirement("t", "In", ("x", "y")), Requirement("z", "DoesNotExist")))
    assert str(selector) == "app=a,t in (x,y),!z"


def test_oldest_route_wins_then_name() -> None:
    class R:
        def __init__(self, name: str, created: str) -> None:
            self.name, self.created = name, created
            self.selector = LabelSelector({"app": "a"})

    routes = [R("b", "2025-01-02T00:00:00Z"), R("z", "2025-01-01T00:00:00Z"), R("a", "2025-01-02T00:00:00Z")]
    assert [r.name for r in selecting(routes, {"app": "a"})] == ["z", "a", "b"]
    assert selecting(routes, {"app": "other"}) == []


def test_workload_snapshot_keeps_only_what_matters() -> None:
    body = o.deployment(hostNetwork=True, serviceAccountName="sa", nodeSelector={"a": "b"},
                        volumes=[{"name": "data", "emptyDir": {}}])
    body["spec"]["template"]["metadata"]["annotations"] = {"x": "y"}
    w = workload_from_body("Deployment", body)
    assert w == Workload("Deployment", "team-a", "chat", {"app": "chat"}, {"x": "y"},
                         {"hostNetwork": True, "serviceAccountName": "sa", "volumes": [{"name": "data"}]})
    assert w.ref == "Deployment/chat"


# ---------------------------------------------------------------- conditions


def test_transition_time_kept_while_status_is_unchanged() -> None:
    old = cond.merge(None, [cond.condition("Ready", False, "A", "x", 1)], "T1")
    assert old == [{"type": "Ready", "status": "False", "reason": "A", "message": "x",
                    "observedGeneration": 1, "lastTransitionTime": "T1"}]
    same = cond.merge(old, [cond.condition("Ready", False, "B", "y", 2)], "T2")
    assert same[0]["lastTransitionTime"] == "T1" and same[0]["reason"] == "B"
    flipped = cond.merge(same, [cond.condition("Ready", True, "Ready", "", 2)], "T3")
    assert flipped[0]["lastTransitionTime"] == "T3"
    assert cond.is_true(flipped, "Ready") and not cond.is_true(flipped, "Other")


def test_same_status_ignores_transition_times() -> None:
    desired = {"selectedWorkloads": 1, "conditions": [cond.condition("Ready", True, "Ready", "", 1)]}
    current = {"selectedWorkloads": 1, "extra": "kept",
               "conditions": cond.merge(None, desired["conditions"], "T")}
    assert cond.same_status(current, desired)
    assert not cond.same_status(current, {**desired, "selectedWorkloads": 2})
    assert not cond.same_status(None, desired)
    assert cond.same_status(current, {**desired, "configHash": None})
