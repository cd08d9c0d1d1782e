"""Bearer-token check in front of the Vertex emulator, answering like Google's front end.

- no credential → 401 CREDENTIALS_MISSING ("Request is missing required authentication
  credential...")
- an API key instead of a token → 401 "API keys are not supported by this API..."
- unknown or revoked token → 401 ACCESS_TOKEN_TYPE_UNSUPPORTED, expired → 401
  ACCESS_TOKEN_EXPIRED (both "Request had invalid authentication credentials...")
- token without the cloud-platform scope → 403 ACCESS_TOKEN_SCOPE_INSUFFICIENT
- a principal without a Vertex role (when `app.state.allowed_principals` is set) → 403
  IAM_PERMISSION_DENIED "Permission 'aiplatform.endpoints.predict' denied on resource ..."
401s carry `WWW-Authenticate: Bearer realm="https://accounts.google.com/"` like Google's.
`/_emulator/...` test paths skip the check unless `app.state.emulator_paths_require_auth`.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from . import google_errors
from .google_json import GOOGLE_JSON, encode_json
from .rpc import rpc_for_path
from .tokens import TokenRegistry
from .upstream import LOG_ENTRY_KEY

__all__ = ["AUTH_SUBJECT_KEY", "CLOUD_PLATFORM_SCOPES", "BearerAuth"]

AUTH_SUBJECT_KEY = "emulator.auth_subject"
CLOUD_PLATFORM_SCOPES = frozenset(
    {
        "https://www.googleapis.com/auth/cloud-platform",
        "https://www.googleapis.com/auth/cloud-platform.read-only",
    }
)
_REALM = 'Bearer realm="https://accounts.google.com/"'
_RESOURCE_RE = re.compile(r"projects/[^/]+/locations/[^/]+/(?:publishers/[^/]+/models|endpoints)/[^/:]+")


def _header(scope: Scope, name: bytes) -> str | None:
    key: bytes
    value: bytes
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class BearerAuth:
    def __init__(self, app: ASGIApp, registry: TokenRegistry | None) -> None:
        self.app = app
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.registry is None or self._exempt(scope):
            await self.app(scope, receive, send)
            return
        body, status, www = self._check(scope)
        entry = scope.get(LOG_ENTRY_KEY)
        if body is None:
            if entry is not None:
                entry["auth_subject"] = scope[AUTH_SUBJECT_KEY]
            await self.app(scope, receive, send)
            return
        scope["app"].state.auth_failures += 1
        pretty = b"prettyPrint=false" not in scope.get("query_string", b"")
        headers = {"www-authenticate": www} if www else {}
        response = Response(encode_json(body, pretty=pretty), status, headers, media_type=GOOGLE_JSON)
        await response(scope, receive, send)

    def _exempt(self, scope: Scope) -> bool:
        app = scope.get("app")
        require = bool(getattr(app.state, "emulator_paths_require_auth", False)) if app else False
        return scope["path"].startswith("/_emulator/") and not require

    def _check(self, scope: Scope) -> tuple[dict[str, Any] | None, int, str | None]:
        assert self.registry is not None
        method, service = rpc_for_path(scope["path"])
        authorization = _header(scope, b"authorization")
        if authorization is None:
            has_key = _header(scope, b"x-goog-api-key") is not None or b"key=" in scope.get(
                "query_string", b""
            )
            if has_key:
                return google_errors.api_key_rejected(method, service), 401, None
            return google_errors.missing_credentials(method, service), 401, _REALM
        scheme, _, token = authorization.partition(" ")
        invalid = f'{_REALM}, error="invalid_token"'
        if scheme.lower() != "bearer" or not token.strip():
            return google_errors.invalid_credentials(method, service, expired=False), 401, invalid
        record = self.registry.lookup(token.strip())
        if record is None:
            return google_errors.invalid_credentials(method, service, expired=False), 401, invalid
        if record.expires_at <= self.registry.now():
            return google_errors.invalid_credentials(method, service, expired=True), 401, invalid
        if record.scopes and not CLOUD_PLATFORM_SCOPES.intersection(record.scopes):
            return google_errors.insufficient_scopes(method, service), 403, None
        # IAM: with `app.state.allowed_principals` set, only those principals hold Vertex
        # roles; any other valid token gets Vertex's 403 IAM_PERMISSION_DENIED.
        app = scope.get("app")
        allowed = getattr(app.state, "allowed_principals", None) if app else None
        if allowed is not None and record.subject not in allowed:
            found = _RESOURCE_RE.search(scope["path"])
            resource = found.group(0) if found else scope["path"].lstrip("/")
            return google_errors.permission_denied("aiplatform.endpoints.predict", resource, service), 403, None
        scope[AUTH_SUBJECT_KEY] = record.subject
        return None, 200, None
