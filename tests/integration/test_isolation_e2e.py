"""isolation sidecarOnly end to end on loopback: the operator's rendered credential
configuration and projected token, materialised as the kubelet would, let a real sidecar
reach Vertex; a process acting as the app container, with the GKE metadata server's token
for the pod's plain KSA principal, is refused by Vertex with 403, and the pod's other
(API-server audience) token is refused by STS."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import pytest

from tests.emulators.serve import ServerHandle, create_combined_app, running_server
from tests.emulators.sts import OidcProvider, provider_audience, register_oidc_provider
from tests.operator import objects as o
from vertex_operator import inject, render
from vertex_operator.credential_reconcile import federation_config_map
from vertex_operator.crd import parse_credential, parse_route

from .conftest import StartSidecar, adc_env

NUMBER = "123456789012"
POOL_PRINCIPAL = (f"principal://iam.googleapis.com/projects/{NUMBER}/locations/global/workloadIdentityPools/"
                  "vertex-sidecar/subject/system:serviceaccount:team-a:vertex")
GKE_PRINCIPAL = (f"principal://iam.googleapis.com/projects/{NUMBER}/locations/global/workloadIdentityPools/"
                 "my-project.svc.id.goog/subject/ns/team-a/sa/vertex")
PATH = "v1/projects/my-project/locations/europe-west4/publishers/google/models/gemini-2.5-flash:generateContent"
PROMPT = {"contents": [{"role": "user", "parts": [{"text": "ping"}]}]}
CREDENTIAL = {"workloadIdentity": {"projectId": "my-project", "projectNumber": NUMBER}, "isolation": "sidecarOnly",
              "sidecarPool": {"poolId": "vertex-sidecar", "providerId": "prod-cluster"}}


@pytest.fixture
def emulator() -> Iterator[ServerHandle]:
    """GKE as the pod sees it: the metadata server answers for the KSA's GKE pool principal;
    Vertex grants its roles to the dedicated pool's principal only."""
    app = create_combined_app(project_id="my-project", email="my-project.svc.id.goog")
    app.state.metadata_app.state.principal = GKE_PRINCIPAL
    app.state.vertex_app.state.allowed_principals = {POOL_PRINCIPAL}
    with running_server(app) as handle:
        yield handle


@pytest.fixture
def provider(emulator: ServerHandle) -> OidcProvider:
    return register_oidc_provider(emulator.app.state.sts_app, provider_audience(NUMBER, "vertex-sidecar", "prod-cluster"),
                                  issuer="https://container.googleapis.com/v1/projects/my-project/locations/x/clusters/c")


def materialise(pod: dict[str, Any], credential: Any, provider: OidcProvider, root: Path,
                emulator: ServerHandle) -> Path:
    """The sidecar's projected volume as the kubelet writes it: a token with the volume's audience
    for the pod's KSA, and the operator's ConfigMap (its paths moved under `root`)."""
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == inject.FEDERATION_VOLUME)
    token_source, config_source = volume["projected"]["sources"]
    audience = token_source["serviceAccountToken"]["audience"]
    (root / token_source["serviceAccountToken"]["path"]).write_text(
        provider.mint(f"system:serviceaccount:{o.NS}:{pod['spec']['serviceAccountName']}", audience=audience))
    config_map = federation_config_map(credential)
    assert config_map is not None
    item = config_source["configMap"]["items"][0]
    config = json.loads(config_map["data"][item["key"]])
    config["credential_source"]["file"] = config["credential_source"]["file"].replace(render.FEDERATION_DIR, str(root))
    config["token_url"] = f"{emulator.url}/_upstream/sts.googleapis.com/v1/token"
    (root / item["path"]).write_text(json.dumps(config))
    return root


APP_CONTAINER = r"""
import json, sys
import google.auth, google.auth.transport.requests, httpx
from google.auth import identity_pool
url, sts, token_file = sys.argv[1:4]
request = google.auth.transport.requests.Request()
credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
credentials.refresh(request)  # the GKE metadata server's token for the plain KSA principal
answer = httpx.post(url, json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
                    headers={"Authorization": f"Bearer {credentials.token}"}, timeout=20)
result = {"metadata_token": answer.status_code, "error": answer.json()["error"]}
fed = identity_pool.Credentials(audience=sys.argv[4], subject_token_type="urn:ietf:params:oauth:token-type:jwt",
                                token_url=sts, credential_source={"file": token_file},
                                scopes=["https://www.googleapis.com/auth/cloud-platform"])
try:
    fed.refresh(request)  # the automounted API-server token, exchanged for the pool
    result["automount_token"] = "exchanged"
except Exception as exc:
    result["automount_token"] = str(exc)
print(json.dumps(result))
"""


def test_only_the_sidecar_reaches_vertex(tmp_path: Path, start: StartSidecar, emulator: ServerHandle,
                                         provider: OidcProvider) -> None:
    route = parse_route(o.route())
    credential = parse_credential(o.credential(**CREDENTIAL))
    plan = inject.plan_sidecar(route, credential, default_image="sidecar:1", server_version=(1, 31))
    pod = {"metadata": {"namespace": o.NS}, "spec": {"containers": [{"name": "app", "image": "app:1"}]}}
    result = inject.inject(pod, plan)
    pod = jsonpatch.apply_patch(pod, result.patch)
    mounted = tmp_path / "federation"
    mounted.mkdir()
    materialise(pod, credential, provider, mounted, emulator)

    rendered = render.render(route, credential).config
    entry = dict(rendered["credentials"]["vertex"])
    assert entry["type"] == "external_account_file"
    entry["path"] = entry["path"].replace(render.FEDERATION_DIR, str(mounted))
    sidecar = start({"credentials": {"vertex": entry}, "routes": rendered["routes"], "defaults": rendered["defaults"]})
    answer = httpx.post(f"{sidecar.base_url}/{PATH}", json=PROMPT, timeout=20)
    assert answer.status_code == 200, answer.text
    calls = [r for r in emulator.app.state.requests if "/publishers/" in r["path"]]
    assert calls[-1]["auth_subject"] == POOL_PRINCIPAL

    automount = tmp_path / "kube-api-token"  # audience: the API server, as automounted
    automount.write_text(provider.mint(f"system:serviceaccount:{o.NS}:vertex", audience="https://kubernetes.default.svc"))
    app = subprocess.run(
        [sys.executable, "-c", APP_CONTAINER,
         f"{emulator.url}/_upstream/europe-west4-aiplatform.googleapis.com/{PATH}",
         f"{emulator.url}/_upstream/sts.googleapis.com/v1/token", str(automount),
         provider_audience(NUMBER, "vertex-sidecar", "prod-cluster")],
        env={**adc_env(emulator), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert app.returncode == 0, app.stderr
    seen = json.loads(app.stdout)
    assert seen["metadata_token"] == 403
    assert seen["error"]["status"] == "PERMISSION_DENIED"
    assert "aiplatform.endpoints.predict" in seen["error"]["message"]
    assert "invalid_grant" in seen["automount_token"] and "audience" in seen["automount_token"]
