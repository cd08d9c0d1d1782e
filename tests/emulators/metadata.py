"""GCE / GKE metadata server, as google-auth and the sidecar's `adc` credential see it.

Behaviour kept from the real server:
- `GET /` (google-auth's ping) answers 200 with `Metadata-Flavor: Google`.
- A directory named without its trailing slash (`/computeMetadata/v1/instance`, the path
  Node's gcp-metadata pings to detect GCE) answers `301` to the slashed name, which lists
  the directory's entries.
- `/computeMetadata/v1/...` needs the request header `Metadata-Flavor: Google` (403
  otherwise) and refuses proxied requests carrying `X-Forwarded-For` (403).
- Every answer carries `Metadata-Flavor: Google`; JSON is `application/json`, values are
  `application/text` (google-auth parses JSON only on `application/json`); `?alt=json`
  turns a value into JSON.
- The token endpoint hands back the same cached token until it has less than
  `token_reuse_min_remaining_s` (5 min on GCE) left, with a decreasing `expires_in`.
- `unavailable_for_first_s`: a new GKE pod's metadata server does not know the pod for a
  few seconds; its service-account endpoints answered `404 Not Found\\n` in reported cases
  (google-auth does not retry a 404; it does retry 500/503). `unavailable_status` picks
  another code.

app.state knobs: `token_lifetime_s` (mutable), `fail_tokens` / `fail_tokens_status` (token
endpoint fails), `unavailable_until` (monotonic deadline), `unavailable_status`,
`token_reuse_min_remaining_s`, `scopes`, `email`; counters `token_requests`,
`tokens_issued`, `requests_total`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .tokens import TokenRegistry

__all__ = ["DEFAULT_SCOPES", "create_metadata_app"]

DEFAULT_SCOPES = (
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/userinfo.email",
)
_FLAVOR = {"metadata-flavor": "Google"}
_ROOT = "/computeMetadata/v1/"
# Directory listings (a subset of the real entries: what the tests' clients read).
_DIRECTORIES = {
    "instance": "attributes/\nhostname\nid\nservice-accounts/\nzone\n",
    "project": "numeric-project-id\nproject-id\n",
}
_STATUS_TEXT = {
    403: "Forbidden\n",
    404: "Not Found\n",
    500: "Could not recursively fetch uri\n",
    503: "Service Unavailable\n",
}


def _text(value: str, status_code: int = 200) -> Response:
    return Response(value, status_code=status_code, media_type="application/text", headers=_FLAVOR)


def _plain(status_code: int, body: str | None = None) -> Response:
    text = body if body is not None else _STATUS_TEXT.get(status_code, f"Error {status_code}\n")
    return Response(text, status_code=status_code, media_type="text/plain; charset=utf-8", headers=_FLAVOR)


def _json(value: Any) -> Response:
    return Response(json.dumps(value, separators=(",", ":")), media_type="application/json", headers=_FLAVOR)


def _value(request: Request, value: str) -> Response:
    if request.query_params.get("alt") == "json":
        return _json(value)
    return _text(value)


def _static_values(state: Any) -> dict[str, str]:
    zone = f"projects/{state.numeric_project_id}/zones/us-central1-a"
    return {
        "project/project-id": state.project_id,
        "project/numeric-project-id": state.numeric_project_id,
        "universe/universe-domain": "googleapis.com",
        "instance/zone": zone,
        "instance/id": "4520031799277581759",
        "instance/hostname": "gke-emu-pool-1-abcd.us-central1-a.c.emu.internal",
        "instance/attributes/cluster-name": "emu-cluster",
        "instance/attributes/cluster-location": "us-central1",
    }


def _token(request: Request) -> Response:
    state = request.app.state
    state.token_requests += 1
    if state.fail_tokens:
        return _plain(state.fail_tokens_status)
    raw_scopes = request.query_params.get("scopes", "")
    scopes = tuple(s for s in raw_scopes.split(",") if s) or tuple(state.scopes)
    lifetime = float(state.token_lifetime_s)
    cache_key = (scopes, lifetime)
    registry: TokenRegistry = state.registry
    cached = state.token_cache.get(cache_key)
    if cached is not None:
        remaining = registry.remaining_s(cached)
        if remaining > state.token_reuse_min_remaining_s:
            return _json({"access_token": cached, "expires_in": int(remaining), "token_type": "Bearer"})
    token, expires_in = registry.issue(state.principal, lifetime, scopes)
    state.token_cache[cache_key] = token
    state.tokens_issued += 1
    return _json({"access_token": token, "expires_in": expires_in, "token_type": "Bearer"})


def _service_account(request: Request, account: str, leaf: str) -> Response:
    state = request.app.state
    if account not in ("default", state.email):
        return _plain(404)
    if time.monotonic() < state.unavailable_until:
        if leaf == "token":
            state.token_requests += 1
        return _plain(state.unavailable_status)
    recursive = request.query_params.get("recursive", "").lower() == "true"
    if leaf == "" and recursive:
        return _json({"aliases": ["default"], "email": state.email, "scopes": list(state.scopes)})
    if leaf == "":
        return _text("aliases\nemail\nidentity\nscopes\ntoken\n")
    if leaf == "token":
        return _token(request)
    if leaf == "email":
        return _value(request, state.email)
    if leaf == "scopes":
        return _text("".join(f"{s}\n" for s in state.scopes))
    if leaf == "aliases":
        return _text("default\n")
    return _plain(404)


async def _handle(request: Request) -> Response:
    state = request.app.state
    state.requests_total += 1
    path = request.url.path
    if path == "/":
        return _text("computeMetadata/\n")
    if not path.startswith(_ROOT) and path != _ROOT.rstrip("/"):
        return _plain(404)
    if "x-forwarded-for" in request.headers:
        return _plain(403, "Forbidden\n")
    if request.headers.get("metadata-flavor") != "Google":
        return _plain(
            403,
            f"Your client does not have permission to get URL {path} from this server. "
            "Missing Metadata-Flavor:Google header.\n",
        )
    relative = path[len(_ROOT) :]
    if relative in _DIRECTORIES:
        return Response(status_code=301, headers={**_FLAVOR, "location": f"{path}/"})
    if relative.rstrip("/") in _DIRECTORIES and not request.query_params:
        return _text(_DIRECTORIES[relative.rstrip("/")])
    if relative == "instance/service-accounts/":
        return _text(f"default/\n{state.email}/\n")
    if relative.startswith("instance/service-accounts/"):
        account, _, leaf = relative[len("instance/service-accounts/") :].partition("/")
        return _service_account(request, account, leaf)
    if relative == "project/" and request.query_params.get("recursive") == "true":
        return _json({"projectId": state.project_id, "numericProjectId": int(state.numeric_project_id)})
    value = _static_values(state).get(relative)
    if value is not None:
        return _value(request, value)
    return _plain(404)


def create_metadata_app(
    registry: TokenRegistry,
    *,
    project_id: str = "emu-project",
    numeric_project_id: str = "123456789012",
    email: str = "sidecar@emu-project.iam.gserviceaccount.com",
    token_lifetime_s: float = 3600,
    unavailable_for_first_s: float = 0.0,
    unavailable_status: int = 404,
    scopes: tuple[str, ...] = DEFAULT_SCOPES,
    principal: str | None = None,
) -> Starlette:
    # Only GET exists on the real server (PUT is for guest attributes, not modelled).
    app = Starlette(routes=[Route("/{path:path}", _handle, methods=["GET"])])
    state = app.state
    state.registry = registry
    state.project_id = project_id
    state.numeric_project_id = numeric_project_id
    state.email = email
    # Whom its tokens belong to. On GKE with direct Workload Identity (no Google SA) the
    # email is PROJECT.svc.id.goog and the token acts as the pod KSA's GKE pool principal.
    state.principal = principal or email
    state.scopes = tuple(scopes)
    state.token_lifetime_s = token_lifetime_s
    state.fail_tokens = False
    state.fail_tokens_status = 503
    # Counted from app creation: sub-apps of the combined app get no lifespan events.
    state.unavailable_until = time.monotonic() + unavailable_for_first_s
    state.unavailable_status = unavailable_status
    state.token_reuse_min_remaining_s = 300.0
    state.token_cache = {}
    state.token_requests = 0
    state.tokens_issued = 0
    state.requests_total = 0
    return app
