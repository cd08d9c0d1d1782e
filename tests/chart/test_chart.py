"""The Helm chart, rendered by the real helm: lint, schema-valid manifests, one CRD source,
values schema, and the wiring that must agree with the operator's own code."""

from __future__ import annotations

import base64
import json
import re
import shutil
import textwrap
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from tests.chart.tools import (
    ALL_ENABLED, CHART, NAMESPACE, RELEASE, ROOT, VARIANTS, Docs, StrictLoader, find, helm, one, render,
    render_args,
)
from vertex_operator import __version__ as operator_version
from vertex_operator import cli, inject
from vertex_operator.handlers.pods import WEBHOOK_ID
from vertex_operator.options import DEFAULT_SIDECAR_IMAGE, SYSTEM_NAMESPACES
from vertex_sidecar import __version__ as sidecar_version

CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
MONITORING_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
CUSTOM_RESOURCE_SCHEMAS = Path(__file__).with_name("custom_resources.schema.yaml")


# ---------------------------------------------------------------- lint and render


@pytest.mark.parametrize("values", [[], [ALL_ENABLED]], ids=["default", "all-enabled"])
def test_helm_lint_strict(values: list[Path]) -> None:
    args = ["lint", "--strict", str(CHART)] + [a for v in values for a in ("--values", str(v))]
    result = helm(*args)
    assert "0 chart(s) failed" in result.stdout


def test_every_variant_renders(rendered: dict[str, Docs]) -> None:
    assert set(rendered) == set(VARIANTS)
    for name, docs in rendered.items():
        assert one(docs, "Deployment"), name


def test_rendered_yaml_is_read_strictly() -> None:
    # helm install and kubectl refuse a mapping with a key twice; so does render().
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key"):
        yaml.load("labels:\n  team: a\n  team: b\n", Loader=StrictLoader)


def test_user_labels_never_repeat_or_override_the_selector_labels(rendered: dict[str, Docs]) -> None:
    # commonLabels, podLabels and additionalLabels that name the chart's own keys: each key
    # is rendered once (render() reads strictly), and what selects the pod is kept.
    docs = rendered["colliding-labels"]
    deployment = one(docs, "Deployment")
    template = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template.items()
    assert template["team"] == "ai"
    for service in find(docs, "Service"):
        assert service["spec"]["selector"].items() <= template.items(), service["metadata"]["name"]
    labels = deployment["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "vertex-passthrough"
    assert labels["app.kubernetes.io/component"] == "operator"
    assert (labels["app.kubernetes.io/part-of"], labels["release"]) == ("ai-platform", "platform")
    monitor = one(docs, "ServiceMonitor")
    selected = [s for s in find(docs, "Service")
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == [f"{RELEASE}-vertex-passthrough-metrics"]
    pod_monitor = one(docs, "PodMonitor")["metadata"]["labels"]
    assert (pod_monitor["release"], pod_monitor["app.kubernetes.io/part-of"]) == ("kube-prometheus-stack", "monitoring")
    dashboards = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith(f"{RELEASE}-vertex-passthrough-dashboard-")]
    assert dashboards and all(d["metadata"]["labels"]["grafana_dashboard"] == "1" for d in dashboards)


def _kubernetes_versions() -> list[str]:
    """The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest known."""
    oldest = re.search(r"(\d+\.\d+)", CHART_META["kubeVersion"])
    assert oldest, CHART_META["kubeVersion"]
    return [oldest.group(1), kubernetes_validate.utils.latest_version()]


def _builtin(doc: dict[str, Any]) -> bool:
    group = doc["apiVersion"].rpartition("/")[0]
    return group == "" or "." not in group or group.endswith(".k8s.io")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_builtin_objects_are_valid_kubernetes_strict(variant: str, rendered: dict[str, Docs]) -> None:
    errors = []
    for doc in rendered[variant]:
        if not _builtin(doc):
            continue
        for version in _kubernetes_versions():
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {path}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_crds_are_valid_kubernetes_strict() -> None:
    docs = [d for d in render(include_crds=True) if d["kind"] == "CustomResourceDefinition"]
    assert len(docs) == 2
    for doc in docs:
        for version in _kubernetes_versions():
            kubernetes_validate.validate(doc, version, strict=True)


def _custom_resource_validators() -> dict[str, jsonschema.protocols.Validator]:
    """Closed schemas of the Prometheus Operator and cert-manager kinds the chart renders."""
    doc = yaml.safe_load(CUSTOM_RESOURCE_SCHEMAS.read_text())
    validators = {}
    for key, schema in doc["kinds"].items():
        full = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": doc["$defs"], **schema}
        jsonschema.Draft202012Validator.check_schema(full)
        validators[key] = jsonschema.Draft202012Validator(full)
    return validators


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_custom_resources_match_their_api(variant: str, rendered: dict[str, Docs]) -> None:
    # kubernetes-validate only warns about custom resources: check them against closed
    # schemas of their kinds (misspelled fields, wrong types and enum values fail).
    validators = _custom_resource_validators()
    errors = []
    for doc in rendered[variant]:
        if _builtin(doc):
            continue
        validator = validators.get(f"{doc['apiVersion']}/{doc['kind']}")
        assert validator is not None, f"no schema to check {doc['apiVersion']} {doc['kind']} against"
        errors += [f"{doc['kind']}/{doc['metadata']['name']}: {e.json_path}: {e.message}"
                   for e in validator.iter_errors(doc)]
    assert not errors, "\n".join(errors)


def test_custom_resource_schemas_catch_mistakes(all_docs: Docs) -> None:
    validators = _custom_resource_validators()
    monitor = json.loads(json.dumps(one(all_docs, "PodMonitor")))
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    endpoint["prot"] = endpoint.pop("port")
    endpoint["interval"] = 30
    errors = list(validators["monitoring.coreos.com/v1/PodMonitor"].iter_errors(monitor))
    assert len(errors) == 2


# ---------------------------------------------------------------- CRDs: one source


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_chart_crds_are_the_top_level_crds() -> None:
    # The chart's crds/ is a link to the repository's crds/ (helm follows it, and
    # `helm package` stores the files themselves); a copy that drifted would fail below.
    link = CHART / "crds"
    if link.is_symlink():
        assert link.resolve() == (ROOT / "crds").resolve()
    source = sorted((p.name, _yaml_docs(p)) for p in (ROOT / "crds").glob("*.yaml"))
    in_chart = sorted((p.name, _yaml_docs(p)) for p in link.glob("*.yaml"))
    assert in_chart == source
    rendered = sorted((d for d in render(include_crds=True) if d["kind"] == "CustomResourceDefinition"),
                      key=lambda d: d["metadata"]["name"])
    assert rendered == sorted((doc for _, docs in source for doc in docs), key=lambda d: d["metadata"]["name"])


def test_packaged_chart_carries_the_crds(tmp_path: Path) -> None:
    helm("package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("*.tgz")
    unpacked = tmp_path / "unpacked"
    shutil.unpack_archive(archive, unpacked)
    packed = sorted(p.name for p in (unpacked / "vertex-passthrough" / "crds").iterdir())
    assert packed == sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert not list(unpacked.rglob("*.rules.test.yaml"))  # .helmignore keeps test files out


# ---------------------------------------------------------------- values and schema


def _undescribed(values: Any, schema: dict[str, Any], path: str = "") -> Iterator[str]:
    """Values without a typed, described schema entry. A schema entry without
    `properties` (resources, affinity, ...) covers its whole subtree: Kubernetes types
    that kubernetes-validate checks after rendering."""
    props = schema.get("properties")
    if not isinstance(values, dict) or props is None:
        return
    for key, value in values.items():
        where = f"{path}.{key}" if path else key
        node = props.get(key)
        if node is None or "type" not in node or not (node.get("description") or schema.get("description")):
            yield where
        else:
            yield from _undescribed(value, node, where)


def _schema_at(path: str) -> dict[str, Any]:
    node: dict[str, Any] = SCHEMA
    for key in path.split("."):
        props = node.get("properties", {})
        assert key in props, f"values.schema.json has no entry for {path!r}"
        node = props[key]
    return node


def test_schema_describes_every_value() -> None:
    assert list(_undescribed(VALUES, SCHEMA)) == []
    assert _schema_at("operator.resources")["type"] == "object"


def test_schema_is_closed() -> None:
    # Every object with fixed keys refuses unknown ones, so typos in values fail the install.
    def walk(node: dict[str, Any], path: str) -> Iterator[str]:
        if "properties" in node and node.get("additionalProperties") is not False:
            yield path or "<root>"
        for key, child in node.get("properties", {}).items():
            yield from walk(child, f"{path}.{key}" if path else key)
    assert list(walk(SCHEMA, "")) == []


@pytest.mark.parametrize(("setting", "complaint"), [
    ("webhook.failurePolicy=Sometimes", "failurePolicy"),
    ("webhook.timeoutSeconds=31", "timeoutSeconds"),
    ("operator.logLevel=loud", "logLevel"),
    ("operator.replicas=0", "replicas"),
    ("operator.leaderElection.retryPeriodSeconds=0", "retryPeriodSeconds"),
    ("operator.watchNamespaces={Team_A}", "watchNamespaces"),
    ("monitoring.podMonitor.interval=often", "interval"),
])
def test_schema_refuses_bad_values(setting: str, complaint: str) -> None:
    result = helm("template", RELEASE, str(CHART), "--set", setting, check=False)
    assert result.returncode != 0 and complaint in result.stderr, result.stderr


# ---------------------------------------------------------------- the operator's wiring


def _operator_container(docs: Docs) -> dict[str, Any]:
    deployment = one(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def _policy_args(docs: Docs, container: dict[str, Any], folder: Path) -> list[str]:
    """The operator's args with --policy-file pointing at a copy of the mounted policy ConfigMap."""
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "policy"]
    volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == "policy"]
    config_map = one(docs, "ConfigMap", volume["configMap"]["name"])
    args = []
    for arg in container["args"]:
        if arg.startswith("--policy-file="):
            path = Path(arg.split("=", 1)[1])
            assert path.parent == Path(mount["mountPath"]) and path.name in config_map["data"], arg
            (folder / path.name).write_text(config_map["data"][path.name])
            arg = f"--policy-file={folder / path.name}"
        args.append(arg)
    return args


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_operator_args_parse_with_the_operator_cli(variant: str, rendered: dict[str, Docs], tmp_path: Path) -> None:
    docs = rendered[variant]
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    container = _operator_container(docs)
    options = cli.options_from_args(cli.build_parser().parse_args(_policy_args(docs, container, tmp_path)))
    ports = _ports(container)
    # Leader election on a Lease (no kopf peering objects) and no kopf-managed webhook
    # configuration (the chart owns it: no cluster-wide webhook write access).
    assert options.leader_election and options.standalone is None
    assert options.lease_name == f"{deployment['metadata']['name']}-leader"
    assert options.readiness_port == ports["ready"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ready"}
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    assert options.webhook_managed is None
    assert options.liveness == f"http://0.0.0.0:{ports['health']}/healthz"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert options.metrics_port == ports["metrics"]
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in container["env"]
    watch = VARIANTS[variant][1]
    if any("watchNamespaces" in s for s in watch):
        assert (options.clusterwide, options.namespaces) == (False, ("team-a", "team-b"))
        assert options.write_namespaces is None  # kopf watches only those, and may write in each
    else:
        assert options.clusterwide
        # Exactly where the chart's RoleBindings let it write (none listed: nowhere).
        expected = {"workload-namespaces": frozenset({"team-a", "team-b"}), "cluster-wide-writes": None}
        assert options.write_namespaces == expected.get(variant, frozenset()), variant
    if not options.webhook:
        assert not find(docs, "MutatingWebhookConfiguration") and "webhook" not in ports
        return
    assert options.injection_label == ("vertex.passthrough.dev/injection", "enabled")  # the webhook's opt-in
    assert options.webhook_port == ports["webhook"]
    # The operator knows every namespace the webhook never sees (its own via POD_NAMESPACE).
    (hook,) = one(docs, "MutatingWebhookConfiguration")["webhooks"]
    assert _excluded(hook) == options.excluded_namespaces | {NAMESPACE}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert options.webhook_cert == f"{mounts['webhook-tls']}/tls.crt"
    assert options.webhook_key == f"{mounts['webhook-tls']}/tls.key"


def test_replicas_survive_drains_and_spread_over_nodes_and_zones(rendered: dict[str, Docs], tmp_path: Path) -> None:
    docs = rendered["default"]
    deployment = one(docs, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}
    assert pdb["metadata"]["namespace"] == NAMESPACE
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    assert all(c["labelSelector"] == {"matchLabels": selector} for c in spread)
    template = deployment["spec"]["template"]["spec"]
    # The webhook keeps answering during the shutdown delay, well inside the grace period.
    (container,) = template["containers"]
    options = cli.options_from_args(cli.build_parser().parse_args(_policy_args(docs, container, tmp_path)))
    assert options.shutdown_delay < template["terminationGracePeriodSeconds"]
    assert options.renew_deadline < options.lease_duration


def test_a_single_replica_has_no_disruption_budget() -> None:
    docs = render(sets=("operator.replicas=1",))
    assert find(docs, "PodDisruptionBudget") == []
    assert one(docs, "Deployment")["spec"]["replicas"] == 1


def test_webhook_configuration_matches_what_the_operator_serves(default_docs: Docs) -> None:
    (hook,) = one(default_docs, "MutatingWebhookConfiguration")["webhooks"]
    service_ref = hook["clientConfig"]["service"]
    # kopf serves an admission handler at /<handler id>.
    assert service_ref["path"] == f"/{WEBHOOK_ID}"
    service = one(default_docs, "Service", service_ref["name"])
    assert service["metadata"]["namespace"] == service_ref["namespace"] == NAMESPACE
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == service_ref["port"]]
    assert port["targetPort"] == "webhook"
    pod_labels = one(default_docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    assert hook["sideEffects"] == "None" and hook["admissionReviewVersions"] == ["v1"]
    assert (hook["failurePolicy"], hook["timeoutSeconds"]) == ("Fail", 5)


def test_failure_policy_fail_is_scoped_to_opted_in_namespaces(default_docs: Docs) -> None:
    # Fail by default, but only pods of namespaces labelled for injection ever reach the
    # webhook: an outage never blocks unrelated pods, and never lets a selected one start bare.
    (hook,) = one(default_docs, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Fail"
    assert {"key": "vertex.passthrough.dev/injection", "operator": "In",
            "values": ["enabled"]} in hook["namespaceSelector"]["matchExpressions"]
    # Without the opt-in every namespace would call it: then an outage must not block pods.
    (hook,) = one(render(sets=("webhook.namespaceOptIn=false",)), "MutatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    (hook,) = one(render(sets=("webhook.namespaceOptIn=false", "webhook.failurePolicy=Fail")),
                  "MutatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Fail"  # chosen explicitly
    (hook,) = one(render(sets=("webhook.failurePolicy=Ignore",)), "MutatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Ignore"


def _excluded(hook: dict[str, Any]) -> set[str]:
    expressions = hook["namespaceSelector"]["matchExpressions"]
    (names,) = [e["values"] for e in expressions
                if e["key"] == "kubernetes.io/metadata.name" and e["operator"] == "NotIn"]
    return set(names)


def test_webhook_never_sees_system_namespaces_or_its_own(rendered: dict[str, Docs]) -> None:
    for docs in rendered.values():
        for config in find(docs, "MutatingWebhookConfiguration"):
            for hook in config["webhooks"]:
                assert _excluded(hook) >= SYSTEM_NAMESPACES | {NAMESPACE}
    (hook,) = one(rendered["all-enabled"], "MutatingWebhookConfiguration")["webhooks"]
    assert "monitoring" in _excluded(hook)  # webhook.excludeNamespaces
    assert hook["namespaceSelector"]["matchLabels"] == {"vertex.passthrough.dev/injection": "enabled"}
    assert hook["objectSelector"]["matchExpressions"][0]["key"] == "vertex.passthrough.dev/inject"
    assert (hook["failurePolicy"], hook["timeoutSeconds"], hook["reinvocationPolicy"]) == ("Fail", 10, "IfNeeded")
    (hook,) = one(rendered["namespaced"], "MutatingWebhookConfiguration")["webhooks"]
    assert {"key": "kubernetes.io/metadata.name", "operator": "In",
            "values": ["team-a", "team-b"]} in hook["namespaceSelector"]["matchExpressions"]


OPT_IN = {"key": "vertex.passthrough.dev/injection", "operator": "In", "values": ["enabled"]}


def test_webhook_is_opt_in_per_namespace_by_default(rendered: dict[str, Docs]) -> None:
    for name in ("default", "namespaced", "all-enabled"):
        (hook,) = one(rendered[name], "MutatingWebhookConfiguration")["webhooks"]
        assert OPT_IN in hook["namespaceSelector"]["matchExpressions"], name
    (hook,) = one(render(sets=("webhook.namespaceOptIn=false",)), "MutatingWebhookConfiguration")["webhooks"]
    assert OPT_IN not in hook["namespaceSelector"]["matchExpressions"]
    assert _excluded(hook) >= SYSTEM_NAMESPACES | {NAMESPACE}  # the old behaviour: all but these


def test_generated_certificate_serves_the_webhook_service(default_docs: Docs) -> None:
    (hook,) = one(default_docs, "MutatingWebhookConfiguration")["webhooks"]
    secret = one(default_docs, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == data["ca.crt"]
    cert = x509.load_pem_x509_certificate(data["tls.crt"])
    ca = x509.load_pem_x509_certificate(data["ca.crt"])
    cert.verify_directly_issued_by(ca)
    host = f"{hook['clientConfig']['service']['name']}.{NAMESPACE}.svc"
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert host in names.get_values_for_type(x509.DNSName)
    annotations = secret["metadata"]["annotations"]
    assert annotations["vertex.passthrough.dev/issued-for"] == host
    # The reuse-or-renew decision relies on this date (sprig cannot parse certificates).
    assert abs(int(annotations["vertex.passthrough.dev/not-after"]) - cert.not_valid_after_utc.timestamp()) < 2 * 86400
    volume = [v for v in one(default_docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
              if v["name"] == "webhook-tls"]
    assert volume[0]["secret"]["secretName"] == secret["metadata"]["name"]


def test_cert_manager_mode(all_docs: Docs) -> None:
    config = one(all_docs, "MutatingWebhookConfiguration")
    namespace, name = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")
    certificate = one(all_docs, "Certificate", name)
    assert certificate["metadata"]["namespace"] == namespace
    assert "caBundle" not in config["webhooks"][0]["clientConfig"]
    assert not find(all_docs, "Secret")  # cert-manager writes it
    secret_volume = [v for v in one(all_docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
                     if v["name"] == "webhook-tls"][0]
    assert secret_volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    service = config["webhooks"][0]["clientConfig"]["service"]
    assert f"{service['name']}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    issuer = one(all_docs, "Issuer", certificate["spec"]["issuerRef"]["name"])
    ca = one(all_docs, "Certificate", issuer["spec"]["ca"]["secretName"])
    assert ca["spec"]["isCA"] is True
    own = render([ALL_ENABLED], ["webhook.certManager.issuerRef.name=corp-ca",
                                 "webhook.certManager.issuerRef.kind=ClusterIssuer"])
    assert not find(own, "Issuer")
    assert one(own, "Certificate")["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer",
                                                            "group": "cert-manager.io"}


def test_operator_pod_is_locked_down(default_docs: Docs) -> None:
    pod = one(default_docs, "Deployment")["spec"]["template"]["spec"]
    container = _operator_container(default_docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}  # PSS "restricted"
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_images_and_versions_agree() -> None:
    # One version everywhere: the chart's appVersion tags both images.
    assert CHART_META["appVersion"] == operator_version == sidecar_version
    container = _operator_container(render())
    assert container["image"] == f"vertex-passthrough-operator:{operator_version}"
    args = cli.build_parser().parse_args(container["args"])
    assert args.sidecar_image == DEFAULT_SIDECAR_IMAGE == f"vertex-passthrough-sidecar:{sidecar_version}"
    pinned = _operator_container(render(sets=["sidecar.image.digest=sha256:" + "a" * 64]))
    assert f"--sidecar-image=vertex-passthrough-sidecar@sha256:{'a' * 64}" in pinned["args"]


# ---------------------------------------------------------------- monitoring


def test_monitoring_objects_only_when_enabled(rendered: dict[str, Docs]) -> None:
    for name in ("default", "namespaced", "no-webhook", "own-account"):
        docs = rendered[name]
        assert not [d for d in docs if d["kind"] in MONITORING_KINDS], name
        assert not [d for d in find(docs, "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]
    kinds = {d["kind"] for d in rendered["all-enabled"]}
    assert MONITORING_KINDS <= kinds


def test_monitors_carry_additional_labels(all_docs: Docs) -> None:
    for kind in MONITORING_KINDS:
        found = find(all_docs, kind)
        assert found and all(d["metadata"]["labels"]["release"] == "kube-prometheus-stack" for d in found), kind


def test_pod_monitor_scrapes_the_sidecar_admin_port(all_docs: Docs) -> None:
    spec = one(all_docs, "PodMonitor")["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    (endpoint,) = spec["podMetricsEndpoints"]
    # The port name the operator gives the injected sidecar.
    assert endpoint["port"] == inject.ADMIN_PORT_NAME and endpoint["path"] == "/metrics"


def test_service_monitor_selects_the_operator_metrics_service(all_docs: Docs) -> None:
    monitor = one(all_docs, "ServiceMonitor")
    services = [s for s in find(all_docs, "Service")
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert len(services) == 1
    (port,) = services[0]["spec"]["ports"]
    assert port["name"] == monitor["spec"]["endpoints"][0]["port"] and port["targetPort"] == "metrics"


def test_prometheus_rule_wraps_the_rule_file_unchanged(all_docs: Docs) -> None:
    for name in ("sidecar", "operator"):
        source = yaml.safe_load((CHART / "files" / "alerts" / f"vertex-{name}.rules.yaml").read_text())
        rule = one(all_docs, "PrometheusRule", f"{RELEASE}-vertex-passthrough-{name}")
        assert rule["spec"]["groups"] == source["groups"]


def test_dashboards_are_configmaps_for_the_grafana_sidecar(all_docs: Docs) -> None:
    files = sorted((CHART / "files" / "dashboards").glob("*.json"))
    maps = [d for d in find(all_docs, "ConfigMap") if d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(maps) == len(files) > 0
    by_key = {key: (cm, value) for cm in maps for key, value in cm["data"].items()}
    for path in files:
        cm, text = by_key[path.name]
        assert json.loads(text) == json.loads(path.read_text())
        assert cm["metadata"]["namespace"] == "monitoring"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "Vertex AI"}
    custom = render([ALL_ENABLED], ["monitoring.dashboards.label=dashboards",
                                    "monitoring.dashboards.labelValue=vertex",
                                    "monitoring.dashboards.folderAnnotation=k8s-sidecar-target-directory",
                                    "monitoring.dashboards.folder=/tmp/dashboards/vertex"])
    maps = [d for d in find(custom, "ConfigMap") if d["metadata"]["labels"].get("dashboards") == "vertex"]
    assert len(maps) == len(files)
    assert maps[0]["metadata"]["annotations"] == {"k8s-sidecar-target-directory": "/tmp/dashboards/vertex"}


# ---------------------------------------------------------------- NOTES.txt and samples


def render_notes(tmp_path: Path, sets: list[str]) -> str:
    """NOTES.txt as helm renders it (`helm template` skips it; install needs a cluster):
    a copy of the chart with the notes fed through `tpl` into a ConfigMap."""
    chart = tmp_path / "vertex-passthrough"
    shutil.copytree(CHART, chart, symlinks=False)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "files" / "NOTES.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n'
        'data:\n  notes: {{ tpl (.Files.Get "files/NOTES.txt") . | toJson }}\n')
    docs = render(sets=sets, chart=chart)
    return str(one(docs, "ConfigMap", "notes")["data"]["notes"])


def _notes_samples(notes: str) -> list[dict[str, Any]]:
    blocks = re.findall(r"<<'YAML'\n(.*?)\n\s*YAML\n", notes, flags=re.S)
    assert blocks, "NOTES.txt shows no manifest to apply"
    return [d for block in blocks for d in yaml.safe_load_all(textwrap.dedent(block)) if d]


def test_notes_tell_the_next_step(tmp_path: Path) -> None:
    from tests.operator.test_crd_schema import validation_errors

    notes = render_notes(tmp_path, [])
    assert f"deployment/{RELEASE}-vertex-passthrough" in notes
    samples = _notes_samples(notes)
    assert {d["kind"] for d in samples} == {"VertexCredential", "VertexRoute"}
    for doc in samples:
        assert validation_errors(doc) == [], doc["kind"]
    quiet = render_notes(tmp_path / "off", ["webhook.enabled=false"])
    assert "no pod gets the sidecar" in quiet
    assert "may write in no namespace yet" in notes and "vertex.passthrough.dev/injection=enabled" in notes
    served = render_notes(tmp_path / "served", ["rbac.workloadNamespaces={team-a}"])
    assert "Serving:        namespaces team-a (rbac.workloadNamespaces)" in served and "no namespace yet" not in served


def _markdown_samples(path: Path) -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S)
    return [d for b in blocks for d in yaml.safe_load_all(b)
            if d and d.get("apiVersion", "").startswith("vertex.passthrough.dev/")]


def test_install_guide_samples_match_the_crds() -> None:
    from tests.operator.test_crd_schema import validation_errors

    samples = _markdown_samples(ROOT / "README.md")
    assert {d["kind"] for d in samples} == {"VertexCredential", "VertexRoute"}
    for doc in samples:
        assert validation_errors(doc) == [], doc["metadata"]["name"]


def _schema_allows(path: str) -> bool:
    node = SCHEMA
    for key in path.split("."):
        props = node.get("properties")
        if props is None:  # a free-form map (labels, annotations): any key
            return node.get("type") == "object" and node.get("additionalProperties") is not False
        if key not in props:
            return False
        node = props[key]
    return True


def test_install_guide_values_exist() -> None:
    # Every `--set a.b.c=` in the guide names a real value.
    text = (ROOT / "README.md").read_text()
    paths = re.findall(r"--set(?:-string)? ([\w.-]+?)(?:\[\d+\])?=", text)
    assert paths
    assert [p for p in paths if not _schema_allows(p)] == []


def test_install_guide_shows_the_architecture_source() -> None:
    source = (ROOT / "docs" / "architecture.mmd").read_text()
    blocks = re.findall(r"```mermaid\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks == [source]
    assert source.startswith("flowchart ")


# ---------------------------------------------------------------- the operator's policy


def test_policy_values_reach_the_operator(tmp_path: Path) -> None:
    values = tmp_path / "policy-values.yaml"
    values.write_text(textwrap.dedent("""\
        policy:
          allowedRoles: [roles/aiplatform.user, roles/aiplatform.viewer]
          workloadIdentity: {projectId: my-gke, projectNumber: "123456789012"}
          federationPools: [projects/42/locations/global/workloadIdentityPools/k8s]
          namespaces:
            - namespaces: [team-a]
              projects: [team-a-*]
              serviceAccounts: ["*@team-a-vertex.iam.gserviceaccount.com"]
          routes: {upstreamHosts: [vertex.psc.example.internal], sidecarImages: [reg.example/vertex/]}
        """))
    docs = render((values,))
    container = _operator_container(docs)
    policy = cli.options_from_args(cli.build_parser().parse_args(_policy_args(docs, container, tmp_path))).policy
    assert policy.allowed_roles == ("roles/aiplatform.user", "roles/aiplatform.viewer")
    assert (policy.workload_identity_project, policy.workload_identity_number) == ("my-gke", "123456789012")
    assert policy.projects_for("team-a") == ("team-a-*",) and policy.projects_for("team-b") == ()
    assert policy.federation_pools == ("projects/42/locations/global/workloadIdentityPools/k8s",)
    assert policy.routes.upstream_hosts == ("vertex.psc.example.internal",) and not policy.routes.allow_loopback
    assert policy.routes.sidecar_images == ("reg.example/vertex/",)
    # A changed policy rolls the operator (it reads the file at start).
    default = one(render(), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/policy"]
    assert one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/policy"] != default


def test_default_policy_allows_only_vertex_user_and_nothing_else(default_docs: Docs, tmp_path: Path) -> None:
    container = _operator_container(default_docs)
    policy = cli.options_from_args(cli.build_parser().parse_args(_policy_args(default_docs, container, tmp_path))).policy
    assert policy.allowed_roles == ("roles/aiplatform.user",)
    assert policy.workload_identity_project is None and not policy.namespaces and not policy.federation_pools


def test_policy_number_must_be_a_string() -> None:
    result = helm(*render_args(sets=("policy.workloadIdentity.projectNumber=123456789012",)), check=False)
    assert result.returncode != 0 and "projectNumber" in result.stderr
