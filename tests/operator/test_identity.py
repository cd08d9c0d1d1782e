"""`identity`: member strings, policy edits that touch only our member, gcloud commands."""

from __future__ import annotations

import copy
import json
import shlex
from typing import Any

import pytest

from vertex_operator import identity as idn
from vertex_operator.identity import Grant

KSA_MEMBER = ("principal://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/"
              "my-gke.svc.id.goog/subject/ns/team-a/sa/vertex")
PROVIDER = "//iam.googleapis.com/projects/42/locations/global/workloadIdentityPools/k8s/providers/c1"


def test_members() -> None:
    assert idn.direct_member("123456789012", "my-gke", "team-a", "vertex") == KSA_MEMBER
    assert idn.gke_member("my-gke", "team-a", "vertex") == "serviceAccount:my-gke.svc.id.goog[team-a/vertex]"
    assert idn.service_account_member("a@b.iam.gserviceaccount.com") == "serviceAccount:a@b.iam.gserviceaccount.com"
    expected = ("principal://iam.googleapis.com/projects/42/locations/global/workloadIdentityPools/k8s/"
                "subject/system:serviceaccount:team-c:runner")
    assert idn.federation_member(PROVIDER, "team-c", "runner") == expected
    assert idn.federation_member("https:" + PROVIDER, "team-c", "runner") == expected
    assert idn.federation_member("my-custom-audience", "team-c", "runner") is None
    assert idn.provider_name("https:" + PROVIDER) == PROVIDER
    assert idn.provider_name(PROVIDER + "/extra") is None


def test_service_account_project() -> None:
    assert idn.service_account_project("caller@my-proj.iam.gserviceaccount.com") == "my-proj"
    # Google-managed and default accounts: IAM infers the project from "-".
    assert idn.service_account_project("123-compute@developer.gserviceaccount.com") == "-"


def test_grant_status_round_trip() -> None:
    project = Grant("project", "my-proj", "roles/aiplatform.user", KSA_MEMBER)
    gsa = Grant("serviceAccount", "caller@my-proj.iam.gserviceaccount.com", idn.WORKLOAD_IDENTITY_USER,
                "serviceAccount:my-gke.svc.id.goog[team-a/vertex]")
    assert project.to_status() == {"resource": "projects/my-proj", "role": "roles/aiplatform.user",
                                   "member": KSA_MEMBER}
    assert gsa.resource == "projects/my-proj/serviceAccounts/caller@my-proj.iam.gserviceaccount.com"
    assert [Grant.from_status(g.to_status()) for g in (gsa, project)] == [gsa, project]
    assert Grant.from_status({"resource": "folders/1", "role": "r", "member": "m"}) is None
    assert Grant.from_status({}) is None


# ---------------------------------------------------------------- policy edits

CONDITION = {"title": "until-2030", "expression": "request.time < timestamp('2030-01-01T00:00:00Z')"}
FOREIGN: dict[str, Any] = {
    "version": 3,
    "etag": "BwYabc123=",
    "auditConfigs": [{"service": "allServices", "auditLogConfigs": [{"logType": "DATA_READ"}]}],
    "bindings": [
        {"role": "roles/owner", "members": ["user:admin@example.com"]},
        {"role": "roles/aiplatform.user", "members": ["group:ml@example.com"]},
        {"role": "roles/aiplatform.user", "members": [KSA_MEMBER], "condition": CONDITION},
    ],
}


def test_add_keeps_everything_else() -> None:
    before = copy.deepcopy(FOREIGN)
    after, changed = idn.edit_policy(FOREIGN, add=[("roles/aiplatform.user", KSA_MEMBER)])
    assert changed and FOREIGN == before  # the input is not modified
    assert after["etag"] == FOREIGN["etag"] and after["auditConfigs"] == FOREIGN["auditConfigs"]
    assert after["version"] == 3
    assert after["bindings"] == [
        FOREIGN["bindings"][0],
        {"role": "roles/aiplatform.user", "members": ["group:ml@example.com", KSA_MEMBER]},
        FOREIGN["bindings"][2],  # the conditional grant is a different grant: untouched
    ]
    again, changed = idn.edit_policy(after, add=[("roles/aiplatform.user", KSA_MEMBER)])
    assert not changed and again["bindings"] == after["bindings"]


def test_add_creates_a_binding_and_remove_drops_only_what_it_emptied() -> None:
    policy: dict[str, Any] = {"etag": "e1", "version": 1,
                              "bindings": [{"role": "roles/viewer", "members": ["user:a@example.com"]}]}
    added, changed = idn.edit_policy(policy, add=[("roles/iam.workloadIdentityUser", "serviceAccount:x")])
    assert changed
    assert added["bindings"][-1] == {"role": "roles/iam.workloadIdentityUser", "members": ["serviceAccount:x"]}
    removed, changed = idn.edit_policy(added, remove=[("roles/iam.workloadIdentityUser", "serviceAccount:x")])
    assert changed and removed["bindings"] == policy["bindings"]
    # Removing what is not there is no change; a conditional binding of our member stays.
    same, changed = idn.edit_policy(FOREIGN, remove=[("roles/aiplatform.user", KSA_MEMBER)])
    assert not changed and same["bindings"] == FOREIGN["bindings"]
    assert idn.has_member(FOREIGN, "roles/aiplatform.user", "group:ml@example.com")
    assert not idn.has_member(FOREIGN, "roles/aiplatform.user", KSA_MEMBER)  # only conditionally


def test_empty_policy() -> None:
    after, changed = idn.edit_policy({"etag": "ACAB"}, add=[("roles/aiplatform.user", KSA_MEMBER)])
    assert changed and after == {"etag": "ACAB", "version": 3,
                                 "bindings": [{"role": "roles/aiplatform.user", "members": [KSA_MEMBER]}]}
    back, changed = idn.edit_policy(after, remove=[("roles/aiplatform.user", KSA_MEMBER)])
    assert changed and "bindings" not in back


# ---------------------------------------------------------------- gcloud


def test_gcloud_commands_are_exact_and_shell_safe() -> None:
    project = Grant("project", "my-vertex", "roles/aiplatform.user", KSA_MEMBER)
    gsa = Grant("serviceAccount", "caller@my-vertex.iam.gserviceaccount.com", idn.WORKLOAD_IDENTITY_USER,
                "serviceAccount:my-gke.svc.id.goog[team-a/vertex]")
    commands = idn.gcloud_commands([gsa, project, project])
    assert commands == [
        f"gcloud projects add-iam-policy-binding my-vertex --member={KSA_MEMBER} "
        "--role=roles/aiplatform.user --condition=None",
        "gcloud iam service-accounts add-iam-policy-binding caller@my-vertex.iam.gserviceaccount.com "
        "--project=my-vertex '--member=serviceAccount:my-gke.svc.id.goog[team-a/vertex]' "
        "--role=roles/iam.workloadIdentityUser --condition=None",
    ]
    # The shell sees exactly the intended arguments (the [..] of the member is quoted).
    assert shlex.split(commands[1])[6] == "--member=serviceAccount:my-gke.svc.id.goog[team-a/vertex]"
    assert idn.gcloud_command(project, "remove").startswith("gcloud projects remove-iam-policy-binding my-vertex")
    assert "--condition" not in idn.gcloud_command(project, "remove")


# ---------------------------------------------------------------- federation


def test_external_account_config() -> None:
    config = idn.external_account_config("https:" + PROVIDER, "/var/run/secrets/vertex/federation/token")
    assert config == {
        "universe_domain": "googleapis.com",
        "type": "external_account",
        "audience": PROVIDER,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": "https://sts.googleapis.com/v1/token",
        "credential_source": {"file": "/var/run/secrets/vertex/federation/token", "format": {"type": "text"}},
    }
    json.dumps(config)
    with pytest.raises(ValueError, match="does not name a workload identity pool provider"):
        idn.external_account_config("custom", "/t")


def test_external_account_config_is_what_google_auth_loads(tmp_path: Any) -> None:
    from google.auth import external_account, identity_pool

    token = tmp_path / "token"
    token.write_text("header.payload.signature")
    config = idn.external_account_config(PROVIDER, str(token))
    credentials = identity_pool.Credentials.from_info(config)
    assert isinstance(credentials, external_account.Credentials)
    assert credentials._audience == PROVIDER
