"""Fleet-wide limits, budgets and showback on the operator side (pure): CRD schema, spec
parsing, the rendered sidecar config (checked by the sidecar's own parser), the pod
patch, the route status, the command line."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jsonpatch
import pytest
import yaml

from tests.operator import objects as o
from tests.operator.test_crd_schema import route as schema_route
from tests.operator.test_crd_schema import validation_errors
from vertex_operator import cli, fleet, inject, render, showback
from vertex_operator.crd import SecretKey, SpecError, parse_credential, parse_route
from vertex_sidecar.config import parse_config, parse_config_text

CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
STORE = fleet.StoreSettings(url="rediss://10.0.0.3:6378", password_secret=SecretKey("vertex-redis", "password"),
                            tls_ca_pem=CA, timeout_ms=40)
FLEET_LIMITS = {"requestsPerMinute": 600, "tokensPerMinute": 200000, "scope": "fleet", "onStoreError": "deny"}


def make(store: fleet.StoreSettings | None = None, **extra: Any) -> tuple[render.Rendered, inject.SidecarPlan]:
    route = parse_route(o.route(**extra))
    credential = parse_credential(o.credential())
    plan = inject.plan_sidecar(route, credential, default_image="i", server_version=(1, 31), store=store)
    return render.render(route, credential, store=store), plan


# ---------------------------------------------------------------- CRD schema

BAD = [
    ("unknown scope", {"limits": {"scope": "cluster"}}, "is not one of"),
    ("unknown store error policy", {"limits": {"onStoreError": "retry"}}, "is not one of"),
    ("snake_case key", {"limits": {"on_store_error": "deny"}}, "unknown field"),
    ("budget without an amount", {"budget": {"action": "warn"}}, "needs usdPerDay and/or usdPerMonth"),
    ("zero budget", {"budget": {"usdPerDay": 0}}, "less than or equal to the minimum"),
    ("block is not an action", {"budget": {"usdPerDay": 5, "action": "block"}}, "is not one of"),
    ("budget as a string", {"budget": {"usdPerMonth": "100"}}, "is not of type 'number'"),
    ("route budget with rules", {"budget": {"usdPerDay": 5}, "rules": [{"name": "a"}]},
     "a route with rules sets its budgets per rule"),
    ("rule scope typo", {"rules": [{"name": "a", "limits": {"scope": "Fleet"}}]}, "is not one of"),
]


@pytest.mark.parametrize(("name", "spec", "message"), BAD, ids=[b[0] for b in BAD])
def test_schema_refuses_bad_fleet_fields(name: str, spec: dict[str, Any], message: str) -> None:
    errors = validation_errors(schema_route(**spec))
    assert any(message in e for e in errors), errors


def test_schema_accepts_fleet_fields() -> None:
    assert validation_errors(schema_route(limits=FLEET_LIMITS, budget={"usdPerDay": 20, "usdPerMonth": 400.5,
                                                                       "action": "warn"})) == []
    assert validation_errors(schema_route(rules=[{"name": "pro", "limits": {"scope": "fleet"},
                                                  "budget": {"usdPerMonth": 100}}])) == []


@pytest.mark.parametrize(("spec", "message"), [
    ({"limits": {"scope": "cluster"}}, "spec.limits.scope: 'cluster' is not one of pod, fleet"),
    ({"budget": {"usdPerDay": -1}}, "spec.budget.usdPerDay: expected an amount in USD above 0"),
    ({"budget": {"action": "deny"}}, "spec.budget: set usdPerDay and/or usdPerMonth"),
    ({"budget": {"usdPerDay": 1, "action": "block"}}, "spec.budget.action: 'block' is not one of deny, warn"),
    ({"budget": {"usdPerDay": 1}, "rules": [{"name": "a"}]}, "spec.budget: a route with rules sets its budgets"),
    ({"rules": [{"name": "a", "budget": {"usdPerDay": True}}]}, "spec.rules[0].budget.usdPerDay"),
])
def test_operator_refuses_what_an_unvalidating_server_lets_through(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_route(o.route(**spec))
    assert message in str(exc.value)


# ---------------------------------------------------------------- rendering


def test_fleet_limits_and_budget_render_to_the_sidecars_keys() -> None:
    rendered, _ = make(STORE, limits=FLEET_LIMITS, budget={"usdPerDay": 20, "action": "warn"})
    (entry,) = rendered.config["routes"]
    assert entry["limits"] == {"requests_per_minute": 600, "tokens_per_minute": 200000,
                               "scope": "fleet", "on_store_error": "deny"}
    assert entry["budget"] == {"usd_per_day": 20.0, "action": "warn"}
    assert rendered.config["store"] == {"redis": {
        "url": "rediss://10.0.0.3:6378",
        "password_file": "/var/run/secrets/vertex/redis/password",
        "tls_ca_file": "/etc/vertex-sidecar/redis-ca.crt",
        "timeout_ms": 40,
        "key_prefix": "vxp.team-a.gemini",  # routes of one name in two namespaces never share counters
    }}
    # The CA travels in the route's ConfigMap, next to config.yaml (the sidecar mounts the whole map).
    assert rendered.files == {"redis-ca.crt": CA}
    config = parse_config_text(rendered.text)
    assert config.store is not None and config.store.key_prefix == "vxp.team-a.gemini"
    route = config.routes[0]
    assert (route.limits.scope, route.limits.on_store_error) == ("fleet", "deny")
    assert route.budget is not None and (route.budget.usd_per_day, route.budget.action) == (20.0, "warn")


def test_rules_inherit_scope_but_budgets_stay_per_rule() -> None:
    rendered, _ = make(STORE, limits={"requestsPerMinute": 100, "scope": "fleet"}, rules=[
        {"name": "pro", "match": {"models": ["gemini-2.5-pro"]}, "budget": {"usdPerMonth": 300}},
        {"name": "rest", "limits": {"scope": "pod"}},
    ])
    pro, rest = rendered.config["routes"]
    assert pro["limits"] == {"requests_per_minute": 100, "scope": "fleet"}
    assert pro["budget"] == {"usd_per_month": 300.0, "action": "deny"}
    assert rest["limits"] == {"requests_per_minute": 100, "scope": "pod"} and "budget" not in rest
    assert [r.name for r in parse_config(rendered.config).routes] == ["pro", "rest"]


def test_no_store_block_when_the_route_does_not_share_anything() -> None:
    rendered, plan = make(STORE, limits={"requestsPerMinute": 100})
    assert "store" not in rendered.config and rendered.files == {}
    assert plan.store_secret is None and plan.store_fingerprint is None
    # ... and a route without a store keeps the hash it had before stores existed.
    assert plan.config_hash == make(None, limits={"requestsPerMinute": 100})[1].config_hash


def test_fleet_scope_without_a_store_renders_a_per_pod_config() -> None:
    rendered, plan = make(None, limits=FLEET_LIMITS)
    assert "store" not in rendered.config
    assert rendered.config["routes"][0]["limits"]["scope"] == "fleet"  # the sidecar logs that it counts per pod
    assert plan.store_secret is None
    parse_config(rendered.config)


def test_plain_redis_without_password_or_ca() -> None:
    rendered, plan = make(fleet.StoreSettings(url="redis://redis.infra:6379/2"), budget={"usdPerDay": 5})
    assert rendered.config["store"] == {"redis": {"url": "redis://redis.infra:6379/2",
                                                  "key_prefix": "vxp.team-a.gemini"}}
    assert plan.store_secret is None and plan.store_fingerprint is not None


def test_the_sidecar_gets_the_password_secret_and_new_pods_when_the_store_changes() -> None:
    _, plan = make(STORE, limits=FLEET_LIMITS)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "batch", "namespace": o.NS,
                                                          "labels": {"app": "chat"}},
           "spec": {"containers": [{"name": "app", "image": "app:1"}]}}
    result = jsonpatch.apply_patch(copy.deepcopy(pod), inject.inject(pod, plan).patch)
    volumes = {v["name"]: v for v in result["spec"]["volumes"]}
    assert volumes["vertex-store-password"]["secret"] == {
        "secretName": "vertex-redis", "items": [{"key": "password", "path": "password"}], "defaultMode": 0o444}
    (sidecar,) = result["spec"]["initContainers"]
    assert {"name": "vertex-store-password", "mountPath": "/var/run/secrets/vertex/redis",
            "readOnly": True} in sidecar["volumeMounts"]
    # The app container never sees the password.
    assert all(m["name"] != "vertex-store-password" for m in result["spec"]["containers"][0].get("volumeMounts", []))
    # The sidecar reads its store once: a new URL, CA or Secret needs new pods.
    for change in ({"url": "rediss://10.0.0.4:6378"}, {"tls_ca_pem": CA + CA},
                   {"password_secret": SecretKey("other", "password")}):
        other = make(dataclasses.replace(STORE, **change), limits=FLEET_LIMITS)[1]
        assert other.config_hash != plan.config_hash, change


# ---------------------------------------------------------------- status


def status(store: fleet.StoreSettings | None, **extra: Any) -> dict[str, Any]:
    return fleet.route_status(parse_route(o.route(**extra)), store)


def test_status_says_plainly_where_limits_are_counted() -> None:
    shared = status(STORE, limits=FLEET_LIMITS)
    assert shared["limits"]["scope"] == "fleet"
    assert "shared by every sidecar of the route" in shared["limits"]["message"]
    alone = status(None, limits=FLEET_LIMITS)
    assert alone["limits"]["scope"] == "pod"
    assert "no store configured" in alone["limits"]["message"]
    assert "counted per pod" in alone["limits"]["message"]
    assert status(STORE, limits={"requestsPerMinute": 5})["limits"] == {"scope": "pod", "message": (
        "Limits are counted per pod: each sidecar on its own, so N replicas admit N times the limit "
        "(set limits.scope: fleet to share them).")}
    assert "budget" not in shared


def test_status_lists_budgets_and_their_scope() -> None:
    result = status(STORE, rules=[{"name": "pro", "budget": {"usdPerDay": 20, "usdPerMonth": 400}},
                                  {"name": "flash", "budget": {"usdPerMonth": 50, "action": "warn"}}])
    assert result["budget"]["scope"] == "fleet"
    assert result["budget"]["budgets"] == ["pro: $20/day, $400/month (deny)", "flash: $50/month (warn)"]
    alone = status(None, budget={"usdPerDay": 20})
    assert alone["budget"]["scope"] == "pod" and "per pod" in alone["budget"]["message"]


def test_status_fits_the_schema() -> None:
    from vertex_operator import conditions as cond
    from vertex_operator.reconcile import Options, credential_record, plan_namespace, route_record

    body = o.route(limits=FLEET_LIMITS, budget={"usdPerDay": 3})
    body["metadata"].update(uid="u", generation=1, creationTimestamp="2025-01-01T00:00:00Z")
    plan = plan_namespace([route_record(body)], [credential_record(o.credential())], [],
                          Options(default_image="i", store=STORE))
    result = copy.deepcopy(plan.statuses["gemini"])
    result["conditions"] = cond.merge(None, result["conditions"])
    assert result["limits"]["scope"] == "fleet" and result["budget"]["scope"] == "fleet"
    assert validation_errors({**body, "status": result}) == []


# ---------------------------------------------------------------- showback


def pod_owned_by(kind: str | None, owner: str = "", labels: dict[str, str] | None = None,
                 **meta: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": labels or {}, **meta}
    if kind is not None:
        metadata["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": kind, "name": owner, "uid": "u",
                                        "controller": True}]
    return {"metadata": metadata, "spec": {}}


@pytest.mark.parametrize(("pod", "workload"), [
    (pod_owned_by("ReplicaSet", "chat-api-7d9f8c6b5", {"pod-template-hash": "7d9f8c6b5"}), "chat-api"),
    (pod_owned_by("ReplicaSet", "legacy-rs"), "legacy-rs"),  # a bare ReplicaSet: no hash to strip
    (pod_owned_by("StatefulSet", "vectors"), "vectors"),
    (pod_owned_by("DaemonSet", "node-agent"), "node-agent"),
    (pod_owned_by("Job", "reindex"), "reindex"),
    (pod_owned_by("Job", "nightly-report-29416320"), "nightly-report"),  # a CronJob's run
    (pod_owned_by(None, generateName="scratch-"), "scratch"),
    (pod_owned_by(None, name="debug"), "debug"),
    (pod_owned_by(None), None),
])
def test_workload_is_the_owner_controller(pod: dict[str, Any], workload: str | None) -> None:
    assert showback.workload_name(pod) == workload


def test_controller_owner_wins_over_other_owners() -> None:
    pod = pod_owned_by("StatefulSet", "db")
    pod["metadata"]["ownerReferences"].insert(0, {"kind": "Widget", "name": "w", "uid": "x"})
    assert showback.workload_name(pod) == "db"


def test_sidecar_env_and_team() -> None:
    pod = pod_owned_by("ReplicaSet", "chat-5c7f", {"pod-template-hash": "5c7f"})
    env = showback.sidecar_env(pod, "search")
    assert env == [
        {"name": "VERTEX_SIDECAR_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "VERTEX_SIDECAR_WORKLOAD", "value": "chat"},
        {"name": "VERTEX_SIDECAR_TEAM", "value": "search"},
    ]
    # The names are the sidecar's own.
    from vertex_sidecar.showback import showback_from_env

    assert showback_from_env({e["name"]: e.get("value", "team-a") for e in env}) == {
        "namespace": "team-a", "workload": "chat", "team": "search"}
    namespace = {"metadata": {"name": "team-a", "labels": {"example.com/team": "search"}}}
    assert showback.team_of(namespace, "example.com/team") == "search"
    assert showback.team_of(namespace, "team") is None and showback.team_of(None, "team") is None


# ---------------------------------------------------------------- command line


def test_store_flags(tmp_path: Any) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text(CA)
    options = cli.options_from_args(cli.build_parser().parse_args([
        "--store-redis-url", "rediss://10.0.0.3:6378", "--store-redis-password-secret", "vertex-redis",
        "--store-redis-tls-ca-file", str(ca), "--store-redis-timeout-ms", "40",
        "--showback-team-label", "example.com/team"]))
    assert options.store == dataclasses.replace(STORE, tls_ca_pem=None, tls_ca_file=str(ca))
    assert fleet.load_ca(options.store) == dataclasses.replace(STORE, tls_ca_file=str(ca))
    assert options.team_label == "example.com/team"
    assert cli.options_from_args(cli.build_parser().parse_args([])).store is None


@pytest.mark.parametrize(("argv", "message"), [
    (["--store-redis-url", "redis://:hunter2@10.0.0.3:6379"], "without a password"),
    (["--store-redis-url", "http://10.0.0.3"], "expected redis://"),
    (["--store-redis-password-secret", "s"], "need --store-redis-url"),
    (["--store-redis-url", "redis://r:6379", "--store-redis-timeout-ms", "5000"], "between 1 and 1000"),
    (["--store-redis-url", "rediss://r:6379", "--store-redis-tls-ca-file", "/nonexistent/ca.crt"],
     "cannot read the store's CA certificate /nonexistent/ca.crt"),
])
def test_bad_store_flags_stop_the_operator(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--no-webhook", *argv])
    err = capsys.readouterr().err
    assert message in err and "hunter2" not in err



def test_readme_example_renders() -> None:
    """The VertexRoute of the README's fleet section is valid and renders with a store."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("## Fleet-wide limits"):]
    block = re.search(r"```yaml\n(.*?)```", section, flags=re.S)
    assert block is not None
    doc = yaml.safe_load(block.group(1))
    assert validation_errors(doc) == []
    route = parse_route(doc)
    assert fleet.uses_store(route, STORE)
    rendered = render.render(route, parse_credential(o.credential(ns="team-a")), store=STORE)
    assert rendered.config["routes"][0]["budget"] == {"usd_per_day": 50.0, "usd_per_month": 1000.0, "action": "deny"}
    # The sidecar config example of the same section parses too.
    sidecar = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)[1]
    config = parse_config(yaml.safe_load(sidecar))
    assert config.store is not None and config.routes[0].limits.scope == "fleet"
