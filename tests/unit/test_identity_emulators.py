"""The STS and IAM Credentials emulators answer like Google's, errors included."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest

from tests.emulators.iam_credentials import allow_token_creator, deny_all_token_creators
from tests.emulators.identity import create_identity_app, mount_identity_endpoints
from tests.emulators.serve import create_combined_app
from tests.emulators.sts import (
    ACCESS_TOKEN_TYPE,
    JWT_TOKEN_TYPE,
    TOKEN_EXCHANGE,
    federated_principal,
    provider_audience,
    register_oidc_provider,
    register_subject_token,
)
from tests.emulators.tokens import TokenRegistry

AUDIENCE = provider_audience("123456789012", "pool", "prov")
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
SA = "target@p.iam.gserviceaccount.com"
IAM_PATH = f"/v1/projects/-/serviceAccounts/{SA}:generateAccessToken"


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://emulator")


def exchange(subject_token: str, **overrides: str) -> dict[str, str]:
    return {"grant_type": TOKEN_EXCHANGE, "audience": AUDIENCE, "scope": CLOUD_PLATFORM,
            "requested_token_type": ACCESS_TOKEN_TYPE, "subject_token": subject_token,
            "subject_token_type": JWT_TOKEN_TYPE, **overrides}


async def test_sts_exchanges_a_provider_signed_jwt_for_a_federated_token() -> None:
    app = create_identity_app(TokenRegistry())
    provider = register_oidc_provider(app.state.sts_app, AUDIENCE)
    async with client(app) as http:
        response = await http.post("/v1/token", data=exchange(provider.mint("system:serviceaccount:ns:app")))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["issued_token_type"] == ACCESS_TOKEN_TYPE and body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    principal = federated_principal(AUDIENCE, "system:serviceaccount:ns:app")
    assert principal == ("principal://iam.googleapis.com/projects/123456789012/locations/global/"
                         "workloadIdentityPools/pool/subject/system:serviceaccount:ns:app")
    assert app.state.registry.validate(body["access_token"]) == principal


@pytest.mark.parametrize(("case", "error", "description"), [
    ("unknown audience", "invalid_target", "The target service indicated by the \"audience\""),
    ("wrong token audience", "invalid_grant", "The audience in ID Token [https://elsewhere]"),
    ("expired", "invalid_grant", "The ID Token has expired."),
    ("foreign key", "invalid_grant", "Invalid JWT signature."),
    ("wrong issuer", "invalid_grant", "The issuer in ID Token https://evil"),
    ("grant type", "unsupported_grant_type", "Invalid value for \"grant_type\""),
    ("no scope", "invalid_scope", "cloud-platform"),
])
async def test_sts_refusals_use_the_oauth_error_shape(case: str, error: str, description: str) -> None:
    app = create_identity_app(TokenRegistry())
    provider = register_oidc_provider(app.state.sts_app, AUDIENCE)
    stranger = register_oidc_provider(app.state.sts_app, provider_audience("1", "other", "x"))
    token = provider.mint("sub")
    params = {
        "unknown audience": exchange(token, audience=provider_audience("123456789012", "pool", "nope")),
        "wrong token audience": exchange(provider.mint("sub", audience="https://elsewhere")),
        "expired": exchange(provider.mint("sub", issued_at=time.time() - 7200, lifetime_s=600)),
        "foreign key": exchange(stranger.mint("sub", audience=provider.allowed_audiences[0])),
        "wrong issuer": exchange(provider.mint("sub", issuer="https://evil")),
        "grant type": exchange(token, grant_type="client_credentials"),
        "no scope": exchange(token, scope=""),
    }[case]
    async with client(app) as http:
        response = await http.post("/v1/token", data=params)
    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == error and description in body["error_description"]
    assert len(app.state.registry) == 0


async def test_sts_accepts_registered_opaque_subject_tokens() -> None:
    app = create_identity_app(TokenRegistry())
    register_subject_token(app.state.sts_app, "opaque-123", AUDIENCE, "build-42")
    async with client(app) as http:
        response = await http.post("/v1/token", data=exchange("opaque-123"))
    assert response.status_code == 200
    assert app.state.registry.validate(response.json()["access_token"]) == federated_principal(AUDIENCE, "build-42")


async def iam_call(app: Any, body: dict[str, Any] | None = None, token: str | None = None,
                   path: str = IAM_PATH) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with client(app) as http:
        return await http.post(path, json=body if body is not None else {"scope": [CLOUD_PLATFORM]},
                               headers=headers)


async def test_iam_generates_a_token_for_the_impersonated_account() -> None:
    app = create_identity_app(TokenRegistry())
    caller, _ = app.state.registry.issue("caller@p.iam.gserviceaccount.com", 3600, ("https://www.googleapis.com/auth/iam",))
    response = await iam_call(app, {"scope": [CLOUD_PLATFORM], "lifetime": "600s", "delegates": None}, caller)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"accessToken", "expireTime"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["expireTime"])  # what google-auth parses
    assert app.state.registry.validate(body["accessToken"]) == SA
    assert 590 < app.state.registry.remaining_s(body["accessToken"]) <= 600


async def test_iam_refusals_use_googles_error_shape() -> None:
    app = create_identity_app(TokenRegistry())
    iam = app.state.iam_app
    registry = app.state.registry
    caller, _ = registry.issue("caller@p.iam.gserviceaccount.com", 3600, (CLOUD_PLATFORM,))
    narrow, _ = registry.issue("caller@p.iam.gserviceaccount.com", 3600, ("https://www.googleapis.com/auth/userinfo.email",))

    missing = await iam_call(app)
    assert missing.status_code == 401 and missing.json()["error"]["status"] == "UNAUTHENTICATED"
    assert (await iam_call(app, token="ya29.unknown")).status_code == 401
    scope = await iam_call(app, token=narrow)
    assert scope.status_code == 403
    assert scope.json()["error"]["details"][0]["reason"] == "ACCESS_TOKEN_SCOPE_INSUFFICIENT"

    deny_all_token_creators(iam, SA)
    denied = (await iam_call(app, token=caller)).json()["error"]
    assert denied["code"] == 403 and denied["status"] == "PERMISSION_DENIED"
    assert denied["message"] == ("Permission 'iam.serviceAccounts.getAccessToken' denied on resource "
                                 "(or it may not exist).")
    assert denied["details"][0]["reason"] == "IAM_PERMISSION_DENIED"
    allow_token_creator(iam, SA, "caller@p.iam.gserviceaccount.com")
    assert (await iam_call(app, token=caller)).status_code == 200

    iam.state.service_accounts = {SA}
    unknown = await iam_call(app, token=caller, path="/v1/projects/-/serviceAccounts/ghost@p.iam.gserviceaccount.com"
                                                     ":generateAccessToken")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == "Not found; Gaia id not found for email ghost@p.iam.gserviceaccount.com"

    bare = await iam_call(app, {"scope": [CLOUD_PLATFORM], "delegates": [SA]}, caller)
    assert bare.status_code == 400 and bare.json()["error"]["status"] == "INVALID_ARGUMENT"
    too_long = await iam_call(app, {"scope": [CLOUD_PLATFORM], "lifetime": "7200s"}, caller)
    assert too_long.status_code == 400
    no_scope = await iam_call(app, {"lifetime": "60s"}, caller)
    assert no_scope.status_code == 400


async def test_iam_delegation_chain_needs_every_hop() -> None:
    app = create_identity_app(TokenRegistry())
    iam = app.state.iam_app
    hop = "hop@p.iam.gserviceaccount.com"
    caller, _ = app.state.registry.issue("caller@p.iam.gserviceaccount.com", 3600, (CLOUD_PLATFORM,))
    allow_token_creator(iam, hop, "caller@p.iam.gserviceaccount.com")
    deny_all_token_creators(iam, SA)
    body = {"scope": [CLOUD_PLATFORM], "delegates": [f"projects/-/serviceAccounts/{hop}"]}
    assert (await iam_call(app, body, caller)).status_code == 403
    allow_token_creator(iam, SA, hop)
    assert (await iam_call(app, body, caller)).status_code == 200
    assert iam.state.calls[-1]["delegates"] == [hop]


async def test_mounted_on_the_combined_app_by_host_and_by_path() -> None:
    combined = create_combined_app()
    identity = mount_identity_endpoints(combined)
    assert mount_identity_endpoints(combined) is identity  # idempotent
    provider = register_oidc_provider(combined.state.sts_app, AUDIENCE)
    async with client(combined) as http:
        by_host = await http.post("/_upstream/sts.googleapis.com/v1/token", data=exchange(provider.mint("a")))
        by_path = await http.post("/v1/token", data=exchange(provider.mint("b")))
        token = by_host.json()["access_token"]
        iam = await http.post(f"/_upstream/iamcredentials.googleapis.com{IAM_PATH}", json={"scope": [CLOUD_PLATFORM]},
                              headers={"authorization": f"Bearer {token}"})
        oauth = await http.post("/token", data={"grant_type": "nope"})
        vertex = await http.post(
            "/_upstream/us-central1-aiplatform.googleapis.com/v1/projects/p1/locations/us-central1/publishers/"
            "google/models/gemini-2.5-flash:generateContent",
            json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
            headers={"authorization": f"Bearer {iam.json()['accessToken']}"})
    assert by_host.status_code == by_path.status_code == iam.status_code == vertex.status_code == 200
    assert oauth.json()["error"] == "unsupported_grant_type"  # still the OAuth emulator
    assert combined.state.requests[-1]["auth_subject"] == SA
    assert [r["upstream_host"] for r in combined.state.requests[:3]] == [
        "sts.googleapis.com", None, "iamcredentials.googleapis.com"]
