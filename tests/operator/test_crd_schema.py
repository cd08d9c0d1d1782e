"""The CRDs in `crds/`: samples validate, bad objects are refused, the schemas teach.

The openAPIV3Schema is checked with `openapi-schema-validator` (OAS 3.0, as Kubernetes
uses it). That validator ignores the Kubernetes extensions, so this module also applies
them the way the API server does: `x-kubernetes-validations` (CEL, evaluated with
cel-python), `x-kubernetes-list-type: map` keys, and unknown fields (kubectl's default
strict field validation).
"""

from __future__ import annotations

import copy
import pathlib
import re
from typing import Any, Iterator

import celpy
import pytest
import yaml
from openapi_schema_validator import OAS30Validator

from tests.operator.harness import CRD_DIR
from vertex_operator import render
from vertex_operator.crd import SpecError, parse_credential, parse_route

ROOT = pathlib.Path(__file__).resolve().parents[2]
KINDS = ("VertexRoute", "VertexCredential")


def load_crds() -> dict[str, dict[str, Any]]:
    crds = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        crds[doc["spec"]["names"]["kind"]] = doc
    return crds


CRDS = load_crds()


def schema_of(kind: str) -> dict[str, Any]:
    (version,) = CRDS[kind]["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


# ---------------------------------------------------------------- the validator


def _kubernetes_extensions(schema: dict[str, Any], value: Any, path: str) -> Iterator[str]:
    """Errors from CEL rules, list-map keys and unknown fields, walking schema and value."""
    for rule in schema.get("x-kubernetes-validations", []):
        env = celpy.Environment()
        program = env.program(env.compile(rule["rule"]))
        if not bool(program.evaluate({"self": celpy.json_to_cel(value)})):
            yield f"{path}: {rule.get('message', rule['rule'])}"
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is not None:
            for key, item in value.items():
                if key in props:
                    yield from _kubernetes_extensions(props[key], item, f"{path}.{key}")
                elif path != "" or key not in ("apiVersion", "kind", "metadata"):
                    if not schema.get("additionalProperties") and not schema.get("x-kubernetes-preserve-unknown-fields"):
                        yield f"{path}.{key}: unknown field"
        elif isinstance(schema.get("additionalProperties"), dict):
            for key, item in value.items():
                yield from _kubernetes_extensions(schema["additionalProperties"], item, f"{path}.{key}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        if schema.get("x-kubernetes-list-type") == "map":
            keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"]) for item in value]
            if len(set(keys)) != len(keys):
                yield f"{path}: duplicate entries for key(s) {schema['x-kubernetes-list-map-keys']}"
        for i, item in enumerate(value):
            yield from _kubernetes_extensions(schema["items"], item, f"{path}[{i}]")


def validation_errors(obj: dict[str, Any]) -> list[str]:
    schema = schema_of(obj["kind"])
    errors = [f"schema: {e.json_path}: {e.message}" for e in OAS30Validator(schema).iter_errors(obj)]
    errors += list(_kubernetes_extensions(schema, obj, ""))
    return errors


# ---------------------------------------------------------------- samples


def example_docs() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc and doc.get("kind") in KINDS:
                found.append((f"examples/{path.name}#{i}", doc))
    return found


def readme_docs() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in [ROOT / "README.md"]:
        if not path.exists():
            continue
        blocks = re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S)
        for b, block in enumerate(blocks):
            for i, doc in enumerate(yaml.safe_load_all(block)):
                if doc and doc.get("kind") in KINDS:
                    found.append((f"{path.relative_to(ROOT)}[{b}]#{i}", doc))
    return found


SAMPLES = example_docs() + readme_docs()


def test_there_are_samples_of_both_kinds() -> None:
    kinds = [doc["kind"] for _, doc in SAMPLES]
    assert kinds.count("VertexRoute") >= 4 and kinds.count("VertexCredential") >= 5
    assert any(where.startswith("README.md") for where, _ in SAMPLES)


@pytest.mark.parametrize(("where", "doc"), SAMPLES, ids=[w for w, _ in SAMPLES])
def test_sample_is_valid(where: str, doc: dict[str, Any]) -> None:
    assert validation_errors(doc) == []
    # The operator reads what the schema accepts, and a route renders a config the sidecar accepts.
    if doc["kind"] == "VertexCredential":
        parse_credential(doc)
        return
    route = parse_route(doc)
    credential = parse_credential({"metadata": {"name": route.credential_name, "namespace": route.namespace},
                                   "spec": {"secretRef": {"name": "key"}}})
    render.render(route, credential)


# ---------------------------------------------------------------- bad objects


def route(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "workloadSelector": {"matchLabels": {"app": "chat"}},
        "credentialRef": {"name": "vertex"},
        "defaults": {"project": "my-project", "location": "europe-west4"},
    }
    base.update(spec)
    return {"apiVersion": "vertex.passthrough.dev/v1alpha1", "kind": "VertexRoute",
            "metadata": {"name": "r", "namespace": "ns"}, "spec": base}


def credential(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "vertex.passthrough.dev/v1alpha1", "kind": "VertexCredential",
            "metadata": {"name": "c", "namespace": "ns"}, "spec": spec}


WI = {"projectId": "my-project", "projectNumber": "1234"}

BAD: list[tuple[str, dict[str, Any], str]] = [
    ("route without credentialRef",
     {**route(), "spec": {k: v for k, v in route()["spec"].items() if k != "credentialRef"}}, "'credentialRef' is a required"),
    ("route without spec", {**route(), "spec": None}, "None is not of type 'object'"),
    ("unknown location", route(defaults={"project": "my-project", "location": "moon"}), "does not match"),
    ("bad project id", route(defaults={"project": "My_Project", "location": "us"}), "does not match"),
    ("fallback to a non-location", route(fallbackLocations=["europe"]), "does not match"),
    ("empty selector", route(workloadSelector={}), "an empty selector would select every pod"),
    ("empty matchLabels", route(workloadSelector={"matchLabels": {}}), "an empty selector would select every pod"),
    ("In without values", route(workloadSelector={"matchExpressions": [{"key": "a", "operator": "In"}]}),
     "In and NotIn need values"),
    ("unknown operator", route(workloadSelector={"matchExpressions": [{"key": "a", "operator": "Is"}]}),
     "is not one of"),
    ("boolean nativeSidecar", route(sidecar={"nativeSidecar": True}), "is not of type 'string'"),
    ("unknown rollout strategy", route(sidecar={"rolloutStrategy": "Always"}), "is not one of"),
    ("same port twice", route(sidecar={"port": 9000, "adminPort": 9000}), "port and sidecar.adminPort must differ"),
    ("default admin port as app port", route(sidecar={"port": 9464}), "must differ"),
    ("tls port clash", route(sidecar={"tls": {"enabled": True, "port": 4000}}), "sidecar.tls.port must differ"),
    ("privileged port", route(sidecar={"port": 80}), "less than the minimum"),
    ("zero limit", route(limits={"requestsPerMinute": 0}), "less than the minimum"),
    ("negative timeout", route(timeouts={"connectSeconds": 0}), "less than or equal to the minimum"),
    ("bad quantity", route(sidecar={"resources": {"limits": {"memory": "lots"}}}), "does not match"),
    ("duplicate rule names", route(rules=[{"name": "a"}, {"name": "a"}]), "duplicate entries"),
    ("rule without name", route(rules=[{"match": {"models": ["x"]}}]), "'name' is a required"),
    ("empty models", route(match={"models": []}), "should be non-empty"),
    ("upstream not a URL", route(upstreams={"aiplatform": "aiplatform.googleapis.com"}), "does not match"),
    ("misspelt field", route(sidecars={"port": 4000}), "spec.sidecars: unknown field"),
    ("long name", {**route(), "metadata": {"name": "r" * 64, "namespace": "ns"}}, "at most 63 characters"),
    ("empty fallbacks", route(fallbackLocations=[]), "should be non-empty"),
    ("empty rule fallbacks", route(rules=[{"name": "a", "fallbackLocations": []}]), "should be non-empty"),
    ("no credential mode", credential(), "set exactly one of"),
    ("two credential modes", credential(workloadIdentity=WI, secretRef={"name": "k"}), "set exactly one of"),
    ("binding with a key", credential(secretRef={"name": "k"}, binding={"backend": "manual"}),
     "binding does not apply to secretRef"),
    ("direct identity without project number", credential(workloadIdentity={"projectId": "my-project"}),
     "needs projectNumber"),
    ("numeric project number", credential(workloadIdentity={"projectId": "my-project", "projectNumber": 1234}),
     "is not of type 'string'"),
    ("unknown binding backend", credential(workloadIdentity=WI, binding={"backend": "terraform"}), "is not one of"),
    ("short token lifetime", credential(federation={"audience": "a", "credentialConfig": {"configMapName": "c"},
                                                    "tokenExpirationSeconds": 60}), "less than the minimum"),
    ("federation without config", credential(federation={"audience": "a"}),
     "without credentialConfig the audience must name the pool provider"),
    ("federation config without name", credential(federation={"audience": "a", "credentialConfig": {}}),
     "'configMapName' is a required"),
    ("bad service account email", credential(workloadIdentity={"projectId": "my-project", "gcpServiceAccount": "me@gmail.com"}),
     "does not match"),
    ("bad role", credential(workloadIdentity=WI, binding={"roles": ["aiplatform.user"]}), "does not match"),
    ("bad service account name", credential(workloadIdentity=WI, serviceAccountName="Team_A"), "does not match"),
    # Its name is the value of the vertex.passthrough.dev/credential label on what it owns.
    ("long credential name", {**credential(workloadIdentity=WI), "metadata": {"name": "c" * 64, "namespace": "ns"}},
     "at most 63 characters"),
    ("empty roles", credential(workloadIdentity=WI, binding={"roles": []}), "should be non-empty"),
    ("empty projects", credential(workloadIdentity=WI, binding={"projects": []}), "should be non-empty"),
]


@pytest.mark.parametrize(("name", "obj", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_object_is_refused(name: str, obj: dict[str, Any], message: str) -> None:
    errors = validation_errors(obj)
    assert errors, f"{name} was accepted"
    assert any(message in e for e in errors), errors


def test_what_the_operator_refuses_the_schema_refuses_too() -> None:
    """Lists the operator refuses when empty: the API server says so at apply time instead
    of a Ready=False condition later."""
    for spec in ({"fallbackLocations": []}, {"rules": [{"name": "a", "fallbackLocations": []}]}):
        with pytest.raises(SpecError, match="must not be empty"):
            parse_route(route(**spec))
        assert validation_errors(route(**spec))
    for binding in ({"roles": []}, {"projects": []}):
        with pytest.raises(SpecError, match="must not be empty"):
            parse_credential(credential(workloadIdentity=WI, binding=binding))
        assert validation_errors(credential(workloadIdentity=WI, binding=binding))


def test_good_base_objects_pass() -> None:
    assert validation_errors(route()) == []
    assert validation_errors(credential(workloadIdentity=WI)) == []
    # The operator looks the project number up itself with backend iamApi.
    assert validation_errors(credential(workloadIdentity={"projectId": "my-project"},
                                        binding={"backend": "iamApi"})) == []
    # It renders the federation configuration itself when the audience names the provider.
    provider = "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/k8s/providers/c1"
    for audience in (provider, "https:" + provider):
        assert validation_errors(credential(federation={"audience": audience})) == []


# ---------------------------------------------------------------- the schemas themselves


def _properties(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for key, sub in (schema.get("properties") or {}).items():
        yield f"{path}.{key}", sub
        yield from _properties(sub, f"{path}.{key}")
        if isinstance(sub.get("items"), dict):
            yield from _properties(sub["items"], f"{path}.{key}[]")


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_is_described(kind: str) -> None:
    schema = schema_of(kind)
    assert len(schema.get("description", "")) > 100
    missing = [path for path, sub in _properties(schema, kind) if path != f"{kind}.metadata" and not sub.get("description")]
    assert missing == []


@pytest.mark.parametrize(("kind", "short"), [("VertexRoute", "vxr"), ("VertexCredential", "vxc")])
def test_names_columns_and_status(kind: str, short: str) -> None:
    spec = CRDS[kind]["spec"]
    assert spec["group"] == "vertex.passthrough.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == [short]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    # `kubectl explain` and API docs show them: every column says what it is.
    assert [c["name"] for c in version["additionalPrinterColumns"] if not c.get("description")] == []
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Age"] == ".metadata.creationTimestamp"
    if kind == "VertexRoute":
        assert columns["Workloads"] == ".status.selectedWorkloads"


def test_cel_rules_compile_and_stay_cheap() -> None:
    """Every rule compiles; none iterates (the API server limits the cost of CEL rules)."""
    for kind in KINDS:
        rules = re.findall(r"rule: \"(.*?)\"\n", (CRD_DIR / f"{CRDS[kind]['spec']['names']['plural']}.vertex.passthrough.dev.yaml").read_text())
        assert rules
        for rule in rules:
            celpy.Environment().compile(rule)
            assert not re.search(r"\.(all|exists|map|filter)\(", rule), rule


def test_status_written_by_the_operator_fits_the_schema() -> None:
    from tests.operator import objects as o
    from vertex_operator import conditions as cond
    from vertex_operator.reconcile import Options, credential_record, plan_namespace, route_record
    from vertex_operator.selection import workload_from_body

    body = o.route()
    body["metadata"].update(uid="u", generation=2, creationTimestamp="2025-01-01T00:00:00Z")
    plan = plan_namespace([route_record(body)], [credential_record(o.credential())],
                          [workload_from_body("Deployment", o.deployment(hostNetwork=True))],
                          Options(default_image="i"))
    status = copy.deepcopy(plan.statuses["gemini"])
    status["conditions"] = cond.merge(None, status["conditions"])
    assert validation_errors({**body, "status": status}) == []
