"""OAuth 2.0 token endpoint for service-account keys (JWT bearer grant, RFC 7523).

google-auth's `service_account.Credentials` signs a JWT with the key file's private key and
POSTs `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<JWT>` to the key
file's `token_uri`. Note that google-auth always puts Google's own token URL in `aud`
(https://oauth2.googleapis.com/token), whatever `token_uri` says — so that audience is
accepted here, as is this endpoint's own URL.

app.state knobs: `keys` (KeyStore), `registry`, `token_lifetime_s` (mutable),
`fail_tokens` (answer 503), `token_requests`, `tokens_issued`.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import urllib.parse
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .google_json import read_token_request
from .keys import JwtError, KeyStore, decode_jwt, new_rsa_key, private_key_pem
from .tokens import TokenRegistry

__all__ = ["GOOGLE_TOKEN_URI", "JWT_BEARER", "create_oauth_app", "make_service_account_key"]

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Google also still accepts the legacy endpoint as audience.
_KNOWN_AUDIENCES = frozenset({GOOGLE_TOKEN_URI, "https://accounts.google.com/o/oauth2/token"})
# Google refuses assertions valid for more than an hour, and tolerates some clock skew.
_MAX_ASSERTION_LIFETIME_S = 3600
_CLOCK_SKEW_S = 300

_BAD_TIMES = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
    "Check your iat and exp values in the JWT claim."
)
_NO_HEADERS = {"cache-control": "no-cache, no-store, max-age=0, must-revalidate", "pragma": "no-cache"}


def _oauth_error(error: str, description: str, status_code: int = 400) -> JSONResponse:
    return JSONResponse(
        {"error": error, "error_description": description},
        status_code=status_code,
        headers=_NO_HEADERS,
    )


def _check_claims(claims: dict[str, Any], own_uri: str, key_email: str) -> JSONResponse | None:
    """Checks in the order Google reports them; returns the error response or None."""
    if claims.get("aud") not in _KNOWN_AUDIENCES | {own_uri}:
        return _oauth_error("invalid_grant", "Invalid JWT: Failed audience check.")
    iat, exp = claims.get("iat"), claims.get("exp")
    now = time.time()
    if (
        not isinstance(iat, int | float)
        or not isinstance(exp, int | float)
        or exp - iat > _MAX_ASSERTION_LIFETIME_S
        or exp <= now - _CLOCK_SKEW_S
        or iat > now + _CLOCK_SKEW_S
    ):
        return _oauth_error("invalid_grant", _BAD_TIMES)
    if claims.get("iss") != key_email:
        return _oauth_error("invalid_grant", "Invalid grant: account not found")
    if not str(claims.get("scope", "")).strip():
        return _oauth_error("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
    return None


async def _token(request: Request) -> JSONResponse:
    state = request.app.state
    state.token_requests += 1
    if state.fail_tokens:
        return _oauth_error("temporarily_unavailable", "The service is currently unavailable.", 503)
    params = await read_token_request(request)
    grant_type = params.get("grant_type", "")
    if not grant_type:
        return _oauth_error("invalid_request", "Missing required parameter: grant_type")
    if grant_type != JWT_BEARER:
        return _oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant_type}")
    assertion = params.get("assertion", "")
    if not assertion:
        return _oauth_error("invalid_request", "Missing required parameter: assertion")
    try:
        _, claims, key = decode_jwt(assertion, state.keys)
    except JwtError:
        # Google gives the same answer for a bad signature and a deleted key.
        return _oauth_error("invalid_grant", "Invalid JWT Signature.")
    own_uri = str(request.url.replace(query=""))
    problem = _check_claims(claims, own_uri, key.client_email)
    if problem is not None:
        return problem
    scopes = tuple(str(claims["scope"]).split())
    # Domain-wide delegation puts the impersonated user in `sub`.
    subject = str(claims.get("sub") or key.client_email)
    token, expires_in = state.registry.issue(subject, float(state.token_lifetime_s), scopes)
    state.tokens_issued += 1
    return JSONResponse(
        {"access_token": token, "expires_in": expires_in, "token_type": "Bearer"},
        headers=_NO_HEADERS,
    )


def create_oauth_app(
    registry: TokenRegistry,
    *,
    token_lifetime_s: float = 3600,
    keys: KeyStore | None = None,
) -> Starlette:
    app = Starlette(routes=[Route("/token", _token, methods=["POST"])])
    app.state.registry = registry
    app.state.keys = keys if keys is not None else KeyStore()
    app.state.token_lifetime_s = token_lifetime_s
    app.state.fail_tokens = False
    app.state.token_requests = 0
    app.state.tokens_issued = 0
    return app


def make_service_account_key(
    token_uri: str,
    path: Path,
    *,
    keys: KeyStore | Starlette,
    project_id: str = "emu-project",
    client_email: str | None = None,
) -> dict[str, str]:
    """Generate an RSA key, register its public half, and write a service-account JSON key.

    `keys` is the OAuth app (its `state.keys` is used) or a KeyStore. Returns the JSON written.
    """
    store: KeyStore = keys.state.keys if isinstance(keys, Starlette) else keys
    email = client_email or f"sidecar@{project_id}.iam.gserviceaccount.com"
    private_key = new_rsa_key()
    key_id = secrets.token_hex(20)
    store.add(key_id, email, private_key.public_key())
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": key_id,
        "private_key": private_key_pem(private_key),
        "client_email": email,
        "client_id": str(100_000_000_000_000_000_000 + secrets.randbelow(10**20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
        + urllib.parse.quote(email),
        "universe_domain": "googleapis.com",
    }
    path = Path(path)
    # Key files are secrets: create them owner-only from the start.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=2)
    return info
