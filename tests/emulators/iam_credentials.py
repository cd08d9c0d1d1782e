"""IAM Service Account Credentials API: `generateAccessToken`, as impersonation uses it.

google-auth's `impersonated_credentials` (and `external_account` configs with a
`service_account_impersonation_url`) POST

    /v1/projects/-/serviceAccounts/{email}:generateAccessToken
    Authorization: Bearer <the caller's token>
    {"delegates": [...] | null, "scope": [...], "lifetime": "3600s"}

and expect `{"accessToken": "...", "expireTime": "2024-05-01T12:00:00Z"}` (RFC 3339, no
fractional seconds: google-auth parses it with `%Y-%m-%dT%H:%M:%SZ`).

Checks, in the order Google's front end and IAM make them:
- a valid bearer token from the shared TokenRegistry with the cloud-platform or iam scope
  (401 / 403 in Google's shape, as the Vertex emulator answers);
- the request (scope present, lifetime `Ns` within 1..3600 s unless `max_lifetime_s` is
  raised, delegates in `projects/-/serviceAccounts/EMAIL` form) → 400 INVALID_ARGUMENT;
- the target and every delegate exist (`service_accounts`; None = any
  `*.gserviceaccount.com` email) → 404 NOT_FOUND "Gaia id not found";
- the delegation chain caller → delegates… → target: each hop needs
  `iam.serviceAccounts.getAccessToken` (roles/iam.serviceAccountTokenCreator) → 403
  PERMISSION_DENIED with an `IAM_PERMISSION_DENIED` ErrorInfo.
Issued tokens carry the impersonated email as subject, so the Vertex emulator's request
log shows who called.

app.state knobs: `registry`, `token_creators` ({email: set of principals allowed to mint
its tokens}; an email absent from the table allows everyone — the default),
`service_accounts` (set or None), `max_lifetime_s`, `fail_requests` (answer 503);
`calls` (log: caller, target, delegates, scope, lifetime, status), counters
`token_requests`, `tokens_issued`.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import google_errors
from .google_json import json_response
from .tokens import TokenRegistry

__all__ = ["GET_ACCESS_TOKEN", "allow_token_creator", "create_iam_credentials_app", "deny_all_token_creators"]

SERVICE = "iamcredentials.googleapis.com"
GET_ACCESS_TOKEN = "iam.serviceAccounts.getAccessToken"
_RPC = "google.iam.credentials.v1.IAMCredentials.GenerateAccessToken"
_ACCEPTED_SCOPES = frozenset({
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/iam",
})
_DELEGATE = re.compile(r"^projects/-/serviceAccounts/([^/]+)$")
_LIFETIME = re.compile(r"^(\d+)(?:\.\d+)?s$")
_REALM = 'Bearer realm="https://accounts.google.com/"'


def allow_token_creator(app: Starlette, target: str, *principals: str) -> None:
    """Grant roles/iam.serviceAccountTokenCreator on `target` to `principals` (only them)."""
    with app.state.lock:
        app.state.token_creators.setdefault(target, set()).update(principals)


def deny_all_token_creators(app: Starlette, target: str) -> None:
    """Nobody may impersonate `target` (an empty allow list)."""
    with app.state.lock:
        app.state.token_creators[target] = set()


def _error(request: Request, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return json_response(request, body, status_code=body["error"]["code"], headers=headers)


def _denied() -> dict[str, Any]:
    return google_errors.error_body(
        403,
        f"Permission '{GET_ACCESS_TOKEN}' denied on resource (or it may not exist).",
        details=[{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "IAM_PERMISSION_DENIED",
            "domain": "iam.googleapis.com",
            "metadata": {"permission": GET_ACCESS_TOKEN},
        }],
    )


def _bearer(request: Request) -> tuple[str | None, Response | None]:
    """(caller subject, None) or (None, the error response)."""
    registry: TokenRegistry = request.app.state.registry
    authorization = request.headers.get("authorization")
    if authorization is None:
        return None, _error(request, google_errors.missing_credentials(_RPC, SERVICE), {"www-authenticate": _REALM})
    scheme, _, token = authorization.partition(" ")
    invalid = {"www-authenticate": f'{_REALM}, error="invalid_token"'}
    record = registry.lookup(token.strip()) if scheme.lower() == "bearer" else None
    if record is None:
        return None, _error(request, google_errors.invalid_credentials(_RPC, SERVICE, expired=False), invalid)
    if record.expires_at <= registry.now():
        return None, _error(request, google_errors.invalid_credentials(_RPC, SERVICE, expired=True), invalid)
    if record.scopes and not _ACCEPTED_SCOPES.intersection(record.scopes):
        return None, _error(request, google_errors.insufficient_scopes(_RPC, SERVICE))
    return record.subject, None


def _exists(state: Any, email: str) -> bool:
    if state.service_accounts is None:
        return email.endswith(".gserviceaccount.com")
    return email in state.service_accounts


def _may_mint(state: Any, caller: str, target: str) -> bool:
    with state.lock:
        allowed = state.token_creators.get(target)
    # No entry means the test did not set a policy on this account: allow, so tests that do
    # not care about IAM need no setup. An entry is an exact allow list, as IAM is.
    return allowed is None or caller in allowed


def _parse(body: Any) -> tuple[tuple[str, ...], list[str], int] | str:
    """(scopes, delegate emails, lifetime seconds) or the INVALID_ARGUMENT message."""
    if not isinstance(body, dict):
        return "Invalid JSON payload received."
    scope = body.get("scope")
    if isinstance(scope, str):
        scope = [scope]
    if not scope or not isinstance(scope, list) or not all(isinstance(s, str) and s for s in scope):
        return "Scope required."
    delegates_raw = body.get("delegates") or []
    if not isinstance(delegates_raw, list):
        return "Invalid value at 'delegates'."
    delegates: list[str] = []
    for item in delegates_raw:
        match = _DELEGATE.match(item) if isinstance(item, str) else None
        if match is None:
            return (f"Invalid form of account ID {item}. Should be "
                    "[projects/-/serviceAccounts/{ACCOUNT_EMAIL_OR_UNIQUEID}].")
        delegates.append(match.group(1))
    lifetime_raw = body.get("lifetime", "3600s")
    lifetime_match = _LIFETIME.match(str(lifetime_raw))
    if lifetime_match is None:
        return f"Invalid value at 'lifetime' (type.googleapis.com/google.protobuf.Duration), \"{lifetime_raw}\""
    return tuple(scope), delegates, int(lifetime_match.group(1))


async def _generate_access_token(request: Request) -> Response:
    state = request.app.state
    state.token_requests += 1
    name, sep, action = request.path_params["name_action"].partition(":")
    if not sep or action != "generateAccessToken":
        return _error(request, google_errors.not_found())
    if state.fail_requests:
        return _error(request, google_errors.error_body(503, "The service is currently unavailable."))
    caller, problem = _bearer(request)
    if problem is not None:
        return problem
    assert caller is not None
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as exc:
        if isinstance(exc, json.JSONDecodeError):
            return _error(request, google_errors.invalid_json(exc))
        return _error(request, google_errors.bad_request("Invalid JSON payload received."))
    parsed = _parse(body)
    call: dict[str, Any] = {"caller": caller, "target": name, "delegates": None, "scope": None,
                            "lifetime": None, "status": None}
    state.calls.append(call)
    if isinstance(parsed, str):
        call["status"] = 400
        return _error(request, google_errors.bad_request(parsed))
    scopes, delegates, lifetime = parsed
    call.update(delegates=delegates, scope=list(scopes), lifetime=lifetime)
    if not 1 <= lifetime <= state.max_lifetime_s:
        call["status"] = 400
        return _error(request, google_errors.bad_request(
            f"The lifetime must be between 1s and {int(state.max_lifetime_s)}s.", "lifetime"))
    for email in (*delegates, name):
        if not _exists(state, email):
            call["status"] = 404
            return _error(request, google_errors.not_found(f"Not found; Gaia id not found for email {email}"))
    chain = [caller, *delegates, name]
    for previous, following in zip(chain, chain[1:]):
        if not _may_mint(state, previous, following):
            call["status"] = 403
            return _error(request, _denied())
    token, _ = state.registry.issue(name, float(lifetime), scopes)
    state.tokens_issued += 1
    call["status"] = 200
    expire = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=lifetime)
    return json_response(request, {"accessToken": token, "expireTime": expire.strftime("%Y-%m-%dT%H:%M:%SZ")})


def create_iam_credentials_app(registry: TokenRegistry, *, service_accounts: set[str] | None = None,
                               max_lifetime_s: float = 3600) -> Starlette:
    app = Starlette(routes=[
        Route("/v1/projects/{project}/serviceAccounts/{name_action}", _generate_access_token, methods=["POST"]),
    ])
    state = app.state
    state.registry = registry
    state.lock = threading.Lock()
    state.token_creators = {}
    state.service_accounts = service_accounts
    state.max_lifetime_s = max_lifetime_s
    state.fail_requests = False
    state.calls = []
    state.token_requests = 0
    state.tokens_issued = 0
    return app
