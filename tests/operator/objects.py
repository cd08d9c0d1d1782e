"""Builders of the objects the operator tests arrange."""

from __future__ import annotations

from typing import Any

NS = "team-a"


def namespace(name: str = NS) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def credential(name: str = "vertex", ns: str = NS, **spec: Any) -> dict[str, Any]:
    spec = spec or {"workloadIdentity": {"projectId": "my-project", "projectNumber": "123456789012"}}
    return {"apiVersion": "vertex.passthrough.dev/v1alpha1", "kind": "VertexCredential",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def ready_status(generation: int = 1) -> dict[str, Any]:
    return {"status": {"observedGeneration": generation, "conditions": [{
        "type": "Ready", "status": "True", "reason": "Bound", "message": "ok",
        "observedGeneration": generation, "lastTransitionTime": "2025-01-01T00:00:00Z"}]}}


def route(name: str = "gemini", ns: str = NS, app: str = "chat", credential: str = "vertex",
          **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "workloadSelector": {"matchLabels": {"app": app}},
        "credentialRef": {"name": credential},
        "defaults": {"project": "my-project", "location": "europe-west4"},
        "match": {"models": ["gemini-*"]},
    }
    spec.update(extra)
    return {"apiVersion": "vertex.passthrough.dev/v1alpha1", "kind": "VertexRoute",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def deployment(name: str = "chat", ns: str = NS, labels: dict[str, str] | None = None,
               kind: str = "Deployment", **pod_spec: Any) -> dict[str, Any]:
    labels = labels or {"app": name}
    spec: dict[str, Any] = {
        "selector": {"matchLabels": labels},
        "template": {"metadata": {"labels": labels},
                     "spec": {"containers": [{"name": "app", "image": "app:1"}], **pod_spec}},
    }
    if kind == "StatefulSet":
        spec["serviceName"] = name
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name, "namespace": ns}, "spec": spec}
