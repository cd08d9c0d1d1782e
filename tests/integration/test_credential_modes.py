"""Every credential mode, end to end: the real sidecar process, real google-auth inside it,
against the emulated metadata server, STS, IAM Credentials and Vertex sharing one token
registry. The Vertex emulator records who each request authenticated as (`auth_subject`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.emulators.iam_credentials import allow_token_creator, deny_all_token_creators
from tests.emulators.identity import mount_identity_endpoints
from tests.emulators.serve import ServerHandle, create_combined_app, running_server
from tests.emulators.sts import OidcProvider, federated_principal, provider_audience, register_oidc_provider

from .conftest import StartSidecar

PROMPT = {"contents": [{"role": "user", "parts": [{"text": "ping"}]}]}
MODEL_PATH = "v1/projects/{project}/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent"
GEN = MODEL_PATH.format(project="emu-project")
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"

AUDIENCE = provider_audience("123456789012", "emu-pool", "k8s-cluster")
KSA = "system:serviceaccount:team-a:chatbot"
PRINCIPAL = federated_principal(AUDIENCE, KSA)
POD_SA = "sidecar@emu-project.iam.gserviceaccount.com"  # what the metadata emulator serves
TARGET_SA = "vertex-caller@emu-project.iam.gserviceaccount.com"
DELEGATE_1 = "hop-one@emu-project.iam.gserviceaccount.com"
DELEGATE_2 = "hop-two@emu-project.iam.gserviceaccount.com"
# No metadata server: proves a mode does not fall back to ADC.
NO_METADATA = {"GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}


@pytest.fixture
def emulator() -> Iterator[ServerHandle]:
    """The combined emulator plus STS and IAM Credentials (overrides the conftest fixture)."""
    app = create_combined_app(project_id="emu-project")
    mount_identity_endpoints(app)
    with running_server(app) as handle:
        yield handle


@pytest.fixture
def provider(emulator: ServerHandle) -> OidcProvider:
    """A workload identity pool provider trusting a (non-GKE) cluster's service-account tokens."""
    return register_oidc_provider(emulator.app.state.sts_app, AUDIENCE,
                                  issuer="https://oidc.cluster.example.com")


def vertex_calls(emulator: ServerHandle) -> list[dict[str, Any]]:
    return [r for r in emulator.app.state.requests if "/publishers/" in r["path"]]


def write_credential_config(tmp_path: Path, emulator: ServerHandle, token_file: Path, *,
                            impersonate: str | None = None, lifetime_s: int | None = None,
                            name: str = "credential-config.json") -> Path:
    """A credential configuration as `gcloud iam workload-identity-pools create-cred-config` writes it."""
    config: dict[str, Any] = {
        "universe_domain": "googleapis.com",
        "type": "external_account",
        "audience": AUDIENCE,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": f"{emulator.url}/_upstream/sts.googleapis.com/v1/token",
        "credential_source": {"file": str(token_file), "format": {"type": "text"}},
    }
    if impersonate is not None:
        config["service_account_impersonation_url"] = (
            f"{emulator.url}/_upstream/iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/"
            f"{impersonate}:generateAccessToken")
        if lifetime_s is not None:
            config["service_account_impersonation"] = {"token_lifetime_seconds": lifetime_s}
    path = tmp_path / name
    path.write_text(json.dumps(config, indent=2))
    return path


def projected_token(tmp_path: Path, provider: OidcProvider, subject: str = KSA) -> Path:
    """The kubelet-projected service-account token file."""
    token_file = tmp_path / "token"
    token_file.write_text(provider.mint(subject))
    return token_file


def generate(sidecar: Any, path: str = GEN, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{sidecar.base_url}/{path}", json=PROMPT, headers=headers, timeout=20)


def test_external_account_file_acts_as_the_federated_principal(
        tmp_path: Path, start: StartSidecar, emulator: ServerHandle, provider: OidcProvider) -> None:
    config = write_credential_config(tmp_path, emulator, projected_token(tmp_path, provider))
    sidecar = start({"credentials": {"default": {"type": "external_account_file", "path": str(config)}}},
                    env=NO_METADATA)
    assert generate(sidecar).status_code == 200
    assert vertex_calls(emulator)[-1]["auth_subject"] == PRINCIPAL
    exchanges = emulator.app.state.sts_app.state.exchanges
    assert [(e["result"], e["scope"]) for e in exchanges] == [("ok", CLOUD_PLATFORM)]
    sts_requests = [r for r in emulator.app.state.requests if r["path"] == "/v1/token"]
    assert [r["upstream_host"] for r in sts_requests] == ["sts.googleapis.com"]
    assert sts_requests[0]["headers"]["content-type"] == "application/x-www-form-urlencoded"


def test_external_account_file_with_service_account_impersonation(
        tmp_path: Path, start: StartSidecar, emulator: ServerHandle, provider: OidcProvider) -> None:
    iam = emulator.app.state.iam_app
    allow_token_creator(iam, TARGET_SA, PRINCIPAL)  # only the federated principal may act as it
    config = write_credential_config(tmp_path, emulator, projected_token(tmp_path, provider),
                                     impersonate=TARGET_SA, lifetime_s=1800)
    sidecar = start({"credentials": {"default": {"type": "external_account_file", "path": str(config)}}},
                    env=NO_METADATA)
    assert generate(sidecar).status_code == 200
    assert vertex_calls(emulator)[-1]["auth_subject"] == TARGET_SA
    [call] = iam.state.calls
    assert (call["caller"], call["target"], call["lifetime"], call["status"]) == (PRINCIPAL, TARGET_SA, 1800, 200)
    assert call["scope"] == [CLOUD_PLATFORM]


def test_federation_refusals_are_clear_503s(
        tmp_path: Path, start: StartSidecar, emulator: ServerHandle, provider: OidcProvider) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(provider.mint(KSA, audience="https://wrong.example.com"))
    plain = write_credential_config(tmp_path, emulator, token_file, name="plain.json")
    token_ok = tmp_path / "token-ok"
    token_ok.write_text(provider.mint(KSA))
    impersonating = write_credential_config(tmp_path, emulator, token_ok, impersonate=TARGET_SA, name="imp.json")
    deny_all_token_creators(emulator.app.state.iam_app, TARGET_SA)
    sidecar = start({
        "credentials": {"fed": {"type": "external_account_file", "path": str(plain)},
                        "fed-sa": {"type": "external_account_file", "path": str(impersonating)}},
        "routes": [{"name": "a", "match": {"projects": ["emu-project"]}, "credential": "fed"},
                   {"name": "b", "match": {"projects": ["other-project"]}, "credential": "fed-sa"}],
    }, env=NO_METADATA, wait_ready=False)

    refused = generate(sidecar).json()["error"]
    assert refused["code"] == 503 and "'fed'" in refused["message"]
    assert "invalid_grant" in refused["message"] and "https://wrong.example.com" in refused["message"]
    denied = generate(sidecar, MODEL_PATH.format(project="other-project")).json()["error"]
    assert denied["code"] == 503 and "'fed-sa'" in denied["message"]
    assert f"impersonation of {TARGET_SA} was denied" in denied["message"]
    assert "roles/iam.workloadIdentityUser" in denied["message"]
    assert not vertex_calls(emulator)


def test_rotated_subject_token_is_used_after_a_401(
        tmp_path: Path, start: StartSidecar, emulator: ServerHandle, provider: OidcProvider) -> None:
    token_file = projected_token(tmp_path, provider)
    config = write_credential_config(tmp_path, emulator, token_file)
    sidecar = start({"credentials": {"default": {"type": "external_account_file", "path": str(config)}}},
                    env=NO_METADATA)
    assert generate(sidecar).status_code == 200
    first_token = vertex_calls(emulator)[-1]["headers"]["authorization"].removeprefix("Bearer ")

    # The kubelet rotates the projected token and the issuer retires the old signing key:
    # an exchange of the old subject token would now fail with invalid_grant.
    [old_kid] = provider.key_ids
    provider.new_key()
    provider.retire_key(old_kid)
    token_file.write_text(provider.mint(KSA))
    emulator.app.state.registry.revoke(first_token)  # Google stops accepting the cached token

    assert generate(sidecar).status_code == 200
    assert [c["status"] for c in vertex_calls(emulator)[-2:]] == [401, 200]
    assert vertex_calls(emulator)[-1]["auth_subject"] == PRINCIPAL
    assert [e["result"] for e in emulator.app.state.sts_app.state.exchanges] == ["ok", "ok"]


def test_adc_with_a_federation_config_in_google_application_credentials(
        tmp_path: Path, start: StartSidecar, emulator: ServerHandle, provider: OidcProvider) -> None:
    """google.auth.default() would also look the project up at cloudresourcemanager.googleapis.com
    (unreachable here, as in egress-restricted clusters); the sidecar must not need that."""
    config = write_credential_config(tmp_path, emulator, projected_token(tmp_path, provider))
    sidecar = start({}, env={**NO_METADATA, "GOOGLE_APPLICATION_CREDENTIALS": str(config)})
    assert generate(sidecar).status_code == 200
    assert vertex_calls(emulator)[-1]["auth_subject"] == PRINCIPAL


def impersonate_config(emulator: ServerHandle, **extra: Any) -> dict[str, Any]:
    return {"credentials": {"vertex-sa": {
        "type": "impersonate",
        "target_principal": TARGET_SA,
        "iam_endpoint": f"{emulator.url}/_upstream/iamcredentials.googleapis.com",
        **extra,
    }}, "routes": [{"name": "all", "credential": "vertex-sa"}]}


def test_impersonate_from_adc_through_delegates(start: StartSidecar, emulator: ServerHandle) -> None:
    iam = emulator.app.state.iam_app
    allow_token_creator(iam, DELEGATE_1, POD_SA)
    allow_token_creator(iam, DELEGATE_2, DELEGATE_1)
    allow_token_creator(iam, TARGET_SA, DELEGATE_2)
    sidecar = start(impersonate_config(
        emulator, delegates=[DELEGATE_1, f"projects/-/serviceAccounts/{DELEGATE_2}"], lifetime_seconds=1200))
    assert generate(sidecar).status_code == 200
    assert vertex_calls(emulator)[-1]["auth_subject"] == TARGET_SA
    [call] = iam.state.calls
    assert call["caller"] == POD_SA and call["target"] == TARGET_SA
    assert call["delegates"] == [DELEGATE_1, DELEGATE_2]
    assert (call["lifetime"], call["scope"], call["status"]) == (1200, [CLOUD_PLATFORM], 200)
    [iam_request] = [r for r in emulator.app.state.requests if ":generateAccessToken" in r["path"]]
    assert iam_request["upstream_host"] == "iamcredentials.googleapis.com"


def test_impersonation_denied_is_a_clear_503(start: StartSidecar, emulator: ServerHandle) -> None:
    deny_all_token_creators(emulator.app.state.iam_app, TARGET_SA)
    sidecar = start(impersonate_config(emulator), wait_ready=False)
    response = generate(sidecar)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["status"] == "UNAVAILABLE"
    message = error["message"]
    assert "'vertex-sa'" in message and TARGET_SA in message
    assert "impersonation" in message and "denied" in message
    assert "roles/iam.serviceAccountTokenCreator" in message
    assert "ya29" not in response.text and "Bearer" not in response.text
    assert not vertex_calls(emulator), "nothing may be sent without a token"
    readyz = httpx.get(f"{sidecar.admin_url}/readyz")
    assert readyz.status_code == 503 and "vertex-sa" in readyz.json()["waiting_for_credentials"]
    assert not any("ya29" in line for line in sidecar.stderr_lines + sidecar.stdout_lines)


def caller_token(emulator: ServerHandle, subject: str = "alice@example.com") -> str:
    token, _ = emulator.app.state.registry.issue(subject, 3600, (CLOUD_PLATFORM,))
    return token


def test_client_mode_forwards_the_callers_authorization(start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({"credentials": {"own": {"type": "client"}},
                     "routes": [{"name": "callers", "credential": "own"}]})
    token = caller_token(emulator)
    assert generate(sidecar, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    call = vertex_calls(emulator)[-1]
    assert call["auth_subject"] == "alice@example.com"
    assert call["headers"]["authorization"] == f"Bearer {token}"

    missing = generate(sidecar)
    assert missing.status_code == 401  # Google's answer, relayed
    assert missing.json()["error"]["status"] == "UNAUTHENTICATED"
    assert missing.json()["error"]["details"][0]["reason"] == "CREDENTIALS_MISSING"
    assert "authorization" not in vertex_calls(emulator)[-1]["headers"], "the sidecar must not add its own"
    assert emulator.app.state.metadata_app.state.token_requests == 0, "client mode mints no tokens"


def test_adc_route_never_forwards_the_callers_authorization(start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({
        "credentials": {"own": {"type": "client"}, "default": {"type": "adc"}},
        "routes": [
            {"name": "callers", "match": {"projects": ["caller-project"]}, "credential": "own"},
            {"name": "pod", "match": {"projects": ["emu-project"]}, "credential": "default"},
        ],
    })
    token = caller_token(emulator)
    headers = {"Authorization": f"Bearer {token}", "x-goog-api-key": "AIza-caller-key"}

    assert generate(sidecar, headers=headers).status_code == 200
    pod_call = vertex_calls(emulator)[-1]
    assert pod_call["auth_subject"] == POD_SA
    assert token not in json.dumps(pod_call["header_list"])
    assert "x-goog-api-key" not in pod_call["headers"]

    path = MODEL_PATH.format(project="caller-project")
    assert generate(sidecar, path, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert vertex_calls(emulator)[-1]["auth_subject"] == "alice@example.com"
    deadline = time.monotonic() + 5
    while len(sidecar.access_log()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert token not in "\n".join(sidecar.stdout_lines + sidecar.stderr_lines)
