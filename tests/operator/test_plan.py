"""`reconcile.plan_namespace`: the desired state of a namespace, without a cluster."""

from __future__ import annotations

from typing import Any

from tests.operator import objects as o
from vertex_operator.reconcile import (
    NamespacePlan, Options, credential_record, plan_namespace, route_record,
)
from vertex_operator.selection import workload_from_body

HASH = "vertex.passthrough.dev/config-hash"
ROUTE = "vertex.passthrough.dev/route"
OPTIONS = Options(default_image="img:1", server_version=(1, 31))


def with_meta(body: dict[str, Any], created: str = "2025-01-01T00:00:00Z", generation: int = 1,
              deleting: bool = False) -> dict[str, Any]:
    body["metadata"].update(uid=f"uid-{body['metadata']['name']}", creationTimestamp=created, generation=generation)
    if deleting:
        body["metadata"]["deletionTimestamp"] = "2025-02-01T00:00:00Z"
    return body


def plan(routes: list[dict[str, Any]], credentials: list[dict[str, Any]] | None = None,
         workloads: list[dict[str, Any]] | None = None) -> NamespacePlan:
    creds = credentials if credentials is not None else [o.credential()]
    return plan_namespace(
        [route_record(with_meta(r) if "uid" not in r["metadata"] else r) for r in routes],
        [credential_record(c) for c in creds],
        [workload_from_body(w["kind"], w) for w in workloads or []],
        OPTIONS,
    )


def annotated(workload: dict[str, Any], **annotations: str) -> dict[str, Any]:
    workload["spec"]["template"]["metadata"]["annotations"] = annotations
    return workload


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_selected_workload_is_configured() -> None:
    result = plan([o.route()], workloads=[o.deployment(), o.deployment("other")])
    (patch,) = result.workload_patches
    assert patch.workload.ref == "Deployment/chat" and patch.reason == "configure"
    state = result.states["gemini"]
    assert state.plan is not None and state.rendered is not None
    assert patch.annotations == {HASH: state.plan.config_hash, ROUTE: "gemini"}
    status = result.statuses["gemini"]
    assert status["selectedWorkloads"] == 1 and status["workloads"] == ["Deployment/chat"]
    assert status["configMap"] == "vertex-sidecar-gemini" and status["configHash"] == state.plan.config_hash
    assert conditions(status) == {"Ready": ("False", "CredentialNotReady"), "ConfigReady": ("True", "Rendered"),
                                  "Conflict": ("False", "NoOverlap")}
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])


def test_ready_when_the_credential_is_ready() -> None:
    status = plan([o.route()], [{**o.credential(), **o.ready_status()}], [o.deployment()]).statuses["gemini"]
    assert conditions(status)["Ready"] == ("True", "Ready")
    assert status["conditions"][0]["message"] == "Serving 1 workload(s) with the sidecar config."


def test_configured_workload_is_left_alone() -> None:
    first = plan([o.route()], workloads=[o.deployment()])
    wanted = first.workload_patches[0].annotations
    again = plan([o.route()], workloads=[annotated(o.deployment(), **wanted)])
    assert again.workload_patches == []


def test_missing_credential_freezes_and_explains() -> None:
    configured = annotated(o.deployment(), **{HASH: "abc", ROUTE: "gemini"})
    result = plan([o.route()], credentials=[], workloads=[configured, o.deployment("new", labels={"app": "chat"})])
    assert result.workload_patches == []  # nothing rolls while the route cannot serve
    status = result.statuses["gemini"]
    assert conditions(status)["Ready"] == ("False", "CredentialNotFound")
    assert conditions(status)["ConfigReady"] == ("False", "CredentialNotFound")
    message = status["conditions"][0]["message"]
    assert "VertexCredential 'vertex' does not exist in namespace 'team-a'" in message
    assert "spec.credentialRef.name" in message
    assert "configHash" not in status


def test_deleted_route_rolls_its_workloads_back() -> None:
    configured = annotated(o.deployment(), **{HASH: "abc", ROUTE: "gemini"})
    result = plan([with_meta(o.route(), deleting=True)], workloads=[configured])
    (patch,) = result.workload_patches
    assert patch.reason == "rollback" and patch.annotations == {HASH: "none", ROUTE: None}
    assert result.statuses == {}  # no status for a route on its way out


def test_rolled_back_and_foreign_workloads_are_left_alone() -> None:
    result = plan([], workloads=[annotated(o.deployment(), **{HASH: "none"}), o.deployment("plain")])
    assert result.workload_patches == []


def test_workload_of_an_invalid_route_is_left_alone() -> None:
    bad = o.route()
    bad["spec"]["defaults"]["location"] = "moon"
    configured = annotated(o.deployment(), **{HASH: "abc", ROUTE: "gemini"})
    result = plan([bad], workloads=[configured])
    assert result.workload_patches == []
    status = result.statuses["gemini"]
    assert conditions(status)["Ready"] == ("False", "InvalidSpec")
    assert "spec.defaults.location" in status["conditions"][0]["message"]


def test_rollout_strategy_none_never_touches_workloads() -> None:
    route = o.route(sidecar={"rolloutStrategy": "None"})
    assert plan([route], workloads=[o.deployment()]).workload_patches == []
    configured = annotated(o.deployment(), **{HASH: "abc", ROUTE: "gemini"})
    deleting = with_meta(o.route(sidecar={"rolloutStrategy": "None"}), deleting=True)
    assert plan([deleting], workloads=[configured]).workload_patches == []


def test_two_routes_oldest_wins_with_conflict_conditions() -> None:
    older = with_meta(o.route("zeta"), created="2025-01-01T00:00:00Z")
    newer = with_meta(o.route("alpha"), created="2025-01-02T00:00:00Z")
    result = plan([newer, older], workloads=[o.deployment()])
    (patch,) = result.workload_patches
    assert patch.annotations[ROUTE] == "zeta"
    winner, loser = result.statuses["zeta"], result.statuses["alpha"]
    assert conditions(winner)["Conflict"] == ("True", "AlsoSelectedByNewerRoute")
    assert conditions(winner)["Ready"][1] == "CredentialNotReady"
    assert winner["selectedWorkloads"] == 1 and loser["selectedWorkloads"] == 0
    assert conditions(loser)["Conflict"] == ("True", "SelectedByOlderRoute")
    assert conditions(loser)["Ready"] == ("False", "Conflict")
    assert "Deployment/chat also selected by VertexRoute 'zeta'" in loser["conditions"][0]["message"]


def test_same_age_routes_resolved_by_name() -> None:
    result = plan([o.route("b"), o.route("a")], workloads=[o.deployment()])
    assert result.workload_patches[0].annotations[ROUTE] == "a"


def test_switching_routes_reconfigures() -> None:
    configured = annotated(o.deployment(), **{HASH: "abc", ROUTE: "old"})
    result = plan([o.route()], workloads=[configured])
    assert result.workload_patches[0].annotations[ROUTE] == "gemini"


def test_workloads_that_cannot_get_the_sidecar_are_reported_not_rolled() -> None:
    result = plan([o.route()], workloads=[o.deployment(hostNetwork=True),
                                          o.deployment("own-sa", labels={"app": "chat"}, serviceAccountName="x")])
    assert result.workload_patches == []
    warnings = result.statuses["gemini"]["warnings"]
    assert len(warnings) == 2
    assert warnings[0].startswith("Deployment/chat: it uses hostNetwork")
    assert warnings[1].startswith("Deployment/own-sa: it runs as service account 'x'")


def test_all_workload_kinds() -> None:
    workloads = [o.deployment("d", labels={"app": "chat"}), o.deployment("s", labels={"app": "chat"}, kind="StatefulSet"),
                 o.deployment("ds", labels={"app": "chat"}, kind="DaemonSet")]
    result = plan([o.route()], workloads=workloads)
    assert sorted(p.workload.ref for p in result.workload_patches) == ["DaemonSet/ds", "Deployment/d", "StatefulSet/s"]


def test_config_the_sidecar_refuses_keeps_pods_served() -> None:
    # A fallback outside the route's locations passes the CRD schema; the sidecar's own
    # schema refuses it. The ConfigMap keeps the last good config; pods are still planned.
    route = o.route(match={"models": ["gemini-*"], "locations": ["europe-*"]}, fallbackLocations=["us-east1"])
    result = plan([route], workloads=[o.deployment()])
    state = result.states["gemini"]
    assert state.plan is not None and state.rendered is None
    status = result.statuses["gemini"]
    assert conditions(status)["ConfigReady"] == ("False", "InvalidConfig")
    assert conditions(status)["Ready"] == ("False", "InvalidConfig")
    assert "'us-east1' is not allowed by match.locations" in status["conditions"][1]["message"]
    assert "previous config (if any) stays in place" in status["conditions"][1]["message"]
    assert len(result.workload_patches) == 1


def test_opted_out_workload_is_neither_counted_nor_rolled() -> None:
    opted = annotated(o.deployment(), **{"vertex.passthrough.dev/inject": "false"})
    result = plan([o.route()], workloads=[opted])
    assert result.workload_patches == [] and result.statuses["gemini"]["selectedWorkloads"] == 0


def test_volume_clash_is_reported() -> None:
    clash = o.deployment(volumes=[{"name": "vertex-sidecar-tmp", "emptyDir": {}}])
    result = plan([o.route()], workloads=[clash])
    assert result.workload_patches == []
    assert "vertex-sidecar-tmp" in result.statuses["gemini"]["warnings"][0]


def test_interception_overridden_by_a_workload_is_a_status_warning() -> None:
    own_proxy = o.deployment(containers=[{"name": "app", "image": "app:1",
                                          "env": [{"name": "SSL_CERT_FILE", "value": "/etc/ssl/mine.pem"}]}])
    result = plan([o.route(sidecar={"interception": True})], workloads=[own_proxy])
    (warning,) = result.statuses["gemini"]["warnings"]
    assert warning.startswith("Deployment/chat: container 'app' sets SSL_CERT_FILE itself")
    assert result.workload_patches[0].reason == "configure"  # still injected: its own value wins
    assert "warnings" not in plan([o.route()], workloads=[own_proxy]).statuses["gemini"] or (
        plan([o.route()], workloads=[own_proxy]).statuses["gemini"]["warnings"] == [])
