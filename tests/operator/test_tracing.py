"""Tracing for injected sidecars: route field over the chart's defaults, the rendered config,
the pod's k8s.* resource attributes (what the sidecar then reads), the webhook end to end."""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Awaitable

import jsonpatch
import pytest

from tests.operator import objects as o
from tests.operator.conftest import Cluster, OperatorThread
from tests.operator.test_crd_schema import validation_errors
from tests.operator.test_webhook import Admission, arrange, pod as review_pod
from vertex_operator import inject, render
from vertex_operator.cli import build_parser, options_from_args
from vertex_operator.crd import SpecError, parse_credential, parse_route
from vertex_operator.tracing import TracingDefaults, workload_attributes
from vertex_sidecar.config import parse_config_text
from vertex_sidecar.tracing import tracing_settings

IMAGE = "registry.test/vertex-sidecar:1"
ON = TracingDefaults(enabled=True, endpoint="http://otel.observability:4318", sample_ratio=0.5)


def plan_for(tracing: dict[str, Any] | None = None, defaults: TracingDefaults = TracingDefaults()
             ) -> inject.SidecarPlan:
    extra = {"sidecar": {"tracing": tracing}} if tracing is not None else {}
    return inject.plan_sidecar(parse_route(o.route(**extra)), parse_credential(o.credential()),
                               default_image=IMAGE, server_version=(1, 31), tracing_defaults=defaults)


def deployment_pod() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "chat-7d9f5c-", "namespace": o.NS,
                         "labels": {"app": "chat", "pod-template-hash": "7d9f5c"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "chat-7d9f5c",
                                              "uid": "u1", "controller": True}]},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}}


def expand(env: list[dict[str, Any]], downward: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: downward-API values, and
    $(VAR) references to variables defined earlier in the list."""
    values: dict[str, str] = {}
    for entry in env:
        if "valueFrom" in entry:
            values[entry["name"]] = downward[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            values[entry["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                           lambda m: values.get(m.group(1), m.group(0)), entry["value"])
    return values


def test_route_field_wins_over_the_operator_defaults() -> None:
    assert plan_for().tracing is None  # off unless someone turns it on
    inherited = plan_for(defaults=ON).tracing
    assert inherited is not None and inherited.endpoint == ON.endpoint and inherited.sample_ratio == 0.5
    own = plan_for({"endpoint": "https://mine:4318", "sampleRatio": 0, "baggageKeys": ["tenant"]}, ON).tracing
    assert own is not None and (own.endpoint, own.sample_ratio, own.baggage_keys) == (
        "https://mine:4318", 0.0, ("tenant",))
    assert plan_for({"enabled": False}, ON).tracing is None
    assert plan_for({"enabled": True}).tracing is not None
    for bad, message in (({"enabled": "yes"}, "true or false"), ({"sampleRatio": 1.5}, "from 0 to 1"),
                         ({"endpoint": "otel:4318"}, "http")):
        with pytest.raises(SpecError, match=message):
            plan_for(bad)
        assert validation_errors(o.route(sidecar={"tracing": bad}))  # the CRD schema refuses it too
    assert not validation_errors(o.route(sidecar={"tracing": {"enabled": True, "endpoint": "http://c:4318",
                                                              "sampleRatio": 0.1, "baggageKeys": ["tenant"]}}))


def test_restarts_only_for_what_needs_new_pods() -> None:
    off = plan_for()
    assert off.config_hash == plan_for({"enabled": False}).config_hash
    on = plan_for(defaults=ON)
    assert on.config_hash != off.config_hash
    assert plan_for({"endpoint": "http://other:4318"}, ON).config_hash != on.config_hash
    assert plan_for({"sampleRatio": 0.01, "baggageKeys": ["x"]}, ON).config_hash == on.config_hash  # hot-reloaded


def test_rendered_config_and_pod_env_give_the_sidecar_its_settings() -> None:
    route = parse_route(o.route(sidecar={"tracing": {"baggageKeys": ["tenant"]}}))
    plan = plan_for({"baggageKeys": ["tenant"]}, ON)
    rendered = render.render(route, parse_credential(o.credential()), plan.tracing)
    assert rendered.config["tracing"] == {"enabled": True, "endpoint": ON.endpoint, "sample_ratio": 0.5,
                                          "baggage_keys": ["tenant"]}
    assert "tracing" not in render.render(route, parse_credential(o.credential())).config

    pod = deployment_pod()
    result = inject.inject(pod, plan)
    patched = jsonpatch.apply_patch(copy.deepcopy(pod), result.patch)
    (sidecar,) = [c for c in patched["spec"]["initContainers"] if c["name"] == "vertex-sidecar"]
    names = [entry["name"] for entry in sidecar["env"]]
    assert len(names) == len(set(names))  # the showback namespace variable is reused, not repeated
    env = expand(sidecar["env"], {"metadata.name": "chat-7d9f5c-x2k4p", "metadata.uid": "0b1c-uid",
                                  "metadata.namespace": o.NS, "spec.nodeName": "node-7",
                                  "status.podIP": "10.0.0.7"})
    settings = tracing_settings(parse_config_text(rendered.text).tracing, env)
    assert settings.enabled and settings.endpoint == "http://otel.observability:4318/v1/traces"
    assert settings.sampler.ratio == 0.5 and settings.baggage_keys == ("tenant",)
    assert {key: value for key, value in settings.resource.items() if key.startswith("k8s.")} == {
        "k8s.pod.name": "chat-7d9f5c-x2k4p", "k8s.pod.uid": "0b1c-uid", "k8s.namespace.name": o.NS,
        "k8s.node.name": "node-7", "k8s.container.name": "vertex-sidecar",
        "k8s.replicaset.name": "chat-7d9f5c", "k8s.deployment.name": "chat"}
    # Without tracing the sidecar gets none of it.
    plain = jsonpatch.apply_patch(copy.deepcopy(pod), inject.inject(pod, plan_for()).patch)
    (untraced,) = [c for c in plain["spec"]["initContainers"] if c["name"] == "vertex-sidecar"]
    assert "OTEL_RESOURCE_ATTRIBUTES" not in {e["name"] for e in untraced.get("env", [])}


@pytest.mark.parametrize("owner, labels, expected", [
    ({"kind": "StatefulSet", "name": "db"}, {}, {"k8s.statefulset.name": "db"}),
    ({"kind": "DaemonSet", "name": "agent"}, {}, {"k8s.daemonset.name": "agent"}),
    ({"kind": "Job", "name": "nightly-29000000"}, {}, {"k8s.job.name": "nightly-29000000",
                                                      "k8s.cronjob.name": "nightly"}),
    ({"kind": "Job", "name": "once"}, {}, {"k8s.job.name": "once"}),
    ({"kind": "ReplicaSet", "name": "rs-by-hand"}, {}, {"k8s.replicaset.name": "rs-by-hand"}),
    ({"kind": "SomethingElse", "name": "x"}, {}, {}),
    (None, {}, {}),
])
def test_workload_attributes(owner: dict[str, str] | None, labels: dict[str, str],
                             expected: dict[str, str]) -> None:
    meta: dict[str, Any] = {"labels": labels}
    if owner is not None:
        meta["ownerReferences"] = [{**owner, "controller": True}]
    assert workload_attributes({"metadata": meta}) == expected


def test_cli_flags() -> None:
    options = options_from_args(build_parser().parse_args(
        ["--tracing", "--tracing-endpoint", "http://otel:4318", "--tracing-sample-ratio", "0.2"]))
    assert options.tracing == TracingDefaults(True, "http://otel:4318", 0.2)
    assert options_from_args(build_parser().parse_args([])).tracing == TracingDefaults()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--tracing-sample-ratio", "2"])


async def test_webhook_injects_tracing_from_the_chart_defaults(
        cluster: Cluster, start_operator: Callable[..., Awaitable[OperatorThread]],
        tls_files: dict[str, Any]) -> None:
    operator = await start_operator(tracing=ON)
    admission = Admission(operator, str(tls_files["ca"]))
    await arrange(cluster)
    config_map = await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini")
    assert config_map is not None
    assert parse_config_text(config_map["data"]["config.yaml"]).tracing.endpoint == ON.endpoint
    owned = review_pod()
    owned["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "chat-7d9f",
                                             "uid": "u", "controller": True}]
    owned["metadata"]["labels"]["pod-template-hash"] = "7d9f"
    result, _ = await admission.admit(owned)
    sidecar = result["spec"]["initContainers"][0]
    attributes = {e["name"]: e.get("value") for e in sidecar["env"]}["OTEL_RESOURCE_ATTRIBUTES"]
    assert "k8s.deployment.name=chat" in attributes.split(",")
    assert "k8s.pod.name=$(VERTEX_SIDECAR_POD_NAME)" in attributes.split(",")
