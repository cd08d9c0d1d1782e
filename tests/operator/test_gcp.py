"""`gcp.GoogleIam` against the IAM + Resource Manager emulator, with real google-auth ADC."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.emulators.iam_policy import PolicyStore, project_resource, service_account_resource
from tests.operator.conftest import OPERATOR_EMAIL, Google
from vertex_operator import gcp
from vertex_operator.identity import edit_policy

ROLE = "roles/aiplatform.user"
OURS = ("principal://iam.googleapis.com/projects/111/locations/global/workloadIdentityPools/"
        "my-gke.svc.id.goog/subject/ns/team-a/sa/vertex")
GSA = "caller@my-vertex.iam.gserviceaccount.com"
CONDITIONAL = {"role": ROLE, "members": ["user:temp@example.com"],
               "condition": {"title": "until-2030", "expression": "request.time < timestamp('2030-01-01T00:00:00Z')"}}


def client(google: Google, attempts: int = 5) -> gcp.GoogleIam:
    return gcp.GoogleIam(google.url, google.url, backoff=gcp.Backoff(first=0.005, attempts=attempts))


def add(member: str = OURS, role: str = ROLE) -> gcp.Edit:
    return lambda policy: edit_policy(policy, add=[(role, member)])


async def test_foreign_edit_between_read_and_write_is_kept(google: Google) -> None:
    store = google.store
    store.add_project("my-vertex", "111", [{"role": "roles/owner", "members": ["user:admin@example.com"]},
                                           CONDITIONAL], version=3)
    project = project_resource("my-vertex")
    # Another writer adds its member right after our read: our first write carries a stale etag.
    store.after_get(project, lambda s: s.add_member(project, ROLE, "group:ml@example.com"))
    iam = client(google)
    try:
        result = await iam.update_policy("project", "my-vertex", add())
    finally:
        await iam.close()
    assert result.changed and result.attempts == 2
    assert [c for c in store.calls if c[0] == "setIamPolicy"] == [
        ("setIamPolicy", project, 409), ("setIamPolicy", project, 200)]
    assert store.members(project, ROLE) == ["group:ml@example.com", OURS]
    assert store.members(project, ROLE, conditional=True) == ["user:temp@example.com"]
    assert store.policy(project)["version"] == 3
    assert store.members(project, "roles/owner") == ["user:admin@example.com"]


async def test_service_account_policy_and_no_op(google: Google) -> None:
    google.store.add_service_account(GSA)
    member = "serviceAccount:my-gke.svc.id.goog[team-a/vertex]"
    iam = client(google)
    try:
        first = await iam.update_policy("serviceAccount", GSA, add(member, "roles/iam.workloadIdentityUser"))
        again = await iam.update_policy("serviceAccount", GSA, add(member, "roles/iam.workloadIdentityUser"))
    finally:
        await iam.close()
    assert first.changed and not again.changed
    assert google.store.members(service_account_resource(GSA), "roles/iam.workloadIdentityUser") == [member]
    assert [c[0] for c in google.store.calls] == ["getIamPolicy", "setIamPolicy", "getIamPolicy"]


async def test_conflicts_that_never_end(google: Google) -> None:
    google.store.add_project("my-vertex", "111")
    google.store.fail_next("setIamPolicy", project_resource("my-vertex"), 409, times=10)
    iam = client(google, attempts=3)
    try:
        with pytest.raises(gcp.ConcurrentModification) as caught:
            await iam.update_policy("project", "my-vertex", add())
    finally:
        await iam.close()
    assert len([c for c in google.store.calls if c[0] == "setIamPolicy"]) == 3
    reason, message = gcp.describe(caught.value)
    assert reason == "ConcurrentModification" and "project my-vertex kept changing" in message


@pytest.mark.parametrize(("arrange", "kind", "target", "reason", "words"), [
    (lambda s: (s.add_project("my-vertex", "111"),
                s.deny("resourcemanager.projects.setIamPolicy", "projects/my-vertex")),
     "project", "my-vertex", "PermissionDenied",
     ["lacks permission resourcemanager.projects.setIamPolicy on project my-vertex",
      "roles/resourcemanager.projectIamAdmin", "backend to manual"]),
    (lambda s: None, "project", "nowhere-proj", "PermissionDenied",
     ["resourcemanager.projects.getIamPolicy", "or the project does not exist"]),
    (lambda s: (s.add_service_account(GSA), s.deny("iam.serviceAccounts.getIamPolicy", service_account_resource(GSA))),
     "serviceAccount", GSA, "PermissionDenied", ["iam.serviceAccounts.getIamPolicy", "roles/iam.serviceAccountAdmin"]),
    (lambda s: None, "serviceAccount", GSA, "ServiceAccountNotFound",
     [f"Google service account {GSA} does not exist",
      "gcloud iam service-accounts create caller --project=my-vertex"]),
])
async def test_errors_say_what_is_missing(google: Google, arrange: Any, kind: Any, target: str, reason: str,
                                          words: list[str]) -> None:
    arrange(google.store)
    iam = client(google)
    try:
        with pytest.raises(gcp.GoogleApiError) as caught:
            await iam.update_policy(kind, target, add())
    finally:
        await iam.close()
    found, message = gcp.describe(caught.value)
    assert found == reason
    for word in words:
        assert word in message


async def test_project_number(google: Google) -> None:
    google.store.add_project("my-gke", "123456789012")
    iam = client(google)
    try:
        assert await iam.project_number("my-gke") == "123456789012"
        google.store.deny("resourcemanager.projects.get", "projects/my-gke")
        with pytest.raises(gcp.GoogleApiError) as caught:
            await iam.project_number("my-gke")
    finally:
        await iam.close()
    assert "resourcemanager.projects.get" in gcp.describe(caught.value)[1]


async def test_a_revoked_token_is_replaced_once(google: Google) -> None:
    google.store.add_project("my-vertex", "111")
    iam = client(google)
    try:
        await iam.get_policy("project", "my-vertex")
        google.registry.revoke_all()
        await iam.get_policy("project", "my-vertex")
    finally:
        await iam.close()
    assert [c[2] for c in google.store.calls] == [200, 401, 200]


async def test_without_credentials(google: Google, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(google.key_file) + ".missing")
    iam = client(google)
    try:
        with pytest.raises(gcp.NoCredentials) as caught:
            await iam.get_policy("project", "my-vertex")
    finally:
        await iam.close()
    reason, message = gcp.describe(caught.value)
    assert reason == "GoogleCredentialsUnavailable" and "operator-key.json.missing" in message


async def test_unreachable_endpoint_is_transient(google: Google) -> None:
    iam = gcp.GoogleIam("http://127.0.0.1:9", "http://127.0.0.1:9", timeout=2)
    try:
        with pytest.raises(gcp.GoogleApiError) as caught:
            await iam.get_policy("project", "my-vertex")
    finally:
        await iam.close()
    assert caught.value.transient and gcp.describe(caught.value)[0] == "GoogleUnavailable"


# ---------------------------------------------------------------- the emulator itself


async def raw(google: Google, path: str, body: dict[str, Any] | None = None, token: bool = True) -> tuple[int, Any]:
    tokens = gcp.AdcTokenSource()
    headers = {"Authorization": f"Bearer {await tokens.token()}"} if token else {}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{google.url}/v1/{path}", json=body or {}, headers=headers) as response:
            return response.status, await response.json()


async def test_emulator_policy_versions_and_blind_writes(google: Google) -> None:
    store: PolicyStore = google.store
    store.add_project("my-vertex", "111", [CONDITIONAL], version=3)
    status, old_reader = await raw(google, "projects/my-vertex:getIamPolicy")
    assert status == 200 and old_reader["version"] == 1
    assert old_reader["bindings"][0]["role"].startswith(f"{ROLE}_withcond_")
    assert "condition" not in old_reader["bindings"][0]
    status, refused = await raw(google, "projects/my-vertex:setIamPolicy", {"policy": old_reader})
    assert status == 400 and refused["error"]["status"] == "INVALID_ARGUMENT"
    status, v3 = await raw(google, "projects/my-vertex:getIamPolicy", {"options": {"requestedPolicyVersion": 3}})
    assert v3["version"] == 3 and v3["bindings"] == [CONDITIONAL]
    status, refused = await raw(google, "projects/my-vertex:setIamPolicy", {"policy": {**v3, "version": 1}})
    assert status == 400 and "must specify version 3" in refused["error"]["message"]
    stale = {**v3, "etag": "BwYAAAAAAAA="}
    status, conflict = await raw(google, "projects/my-vertex:setIamPolicy", {"policy": stale})
    assert status == 409 and conflict["error"]["status"] == "ABORTED"
    # No etag: a blind overwrite, which is how careless writers lose conditions.
    status, _ = await raw(google, "projects/my-vertex:setIamPolicy", {"policy": {"bindings": []}})
    assert status == 200 and store.members(project_resource("my-vertex"), ROLE, conditional=True) == []
    status, unauthenticated = await raw(google, "projects/my-vertex:getIamPolicy", token=False)
    assert status == 401 and unauthenticated["error"]["status"] == "UNAUTHENTICATED"


async def test_emulator_member_syntax(google: Google) -> None:
    deleted = "deleted:serviceAccount:old-app@my-vertex.iam.gserviceaccount.com?uid=123456789"
    google.store.add_project("my-vertex", "111", [{"role": ROLE, "members": [deleted, "allUsers"]}])
    for member in ("allUsersOfExample", "xallAuthenticatedUsers", "group:"):
        status, refused = await raw(google, "projects/my-vertex:setIamPolicy",
                                    {"policy": {"bindings": [{"role": ROLE, "members": [member]}]}})
        assert status == 400 and "Invalid member" in refused["error"]["message"], member
    # What IAM hands out it takes back: our edit keeps the deleted member and allUsers.
    iam = client(google)
    try:
        assert (await iam.update_policy("project", "my-vertex", add())).changed
    finally:
        await iam.close()
    assert google.store.members(project_resource("my-vertex"), ROLE) == [deleted, "allUsers", OURS]


async def test_operator_identity_is_the_key_holder(google: Google) -> None:
    tokens = gcp.AdcTokenSource()
    token = await tokens.token()
    assert google.registry.validate(token) == OPERATOR_EMAIL
    assert await tokens.token() == token  # cached while valid
    await asyncio.sleep(0)
