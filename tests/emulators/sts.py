"""Google Security Token Service (STS) token exchange, as workload identity federation uses it.

google-auth's `external_account` credentials (`identity_pool` for file/URL sourced tokens)
POST form-encoded RFC 8693 parameters to the credential config's `token_url`
(`https://sts.googleapis.com/v1/token`):

    grant_type=urn:ietf:params:oauth:grant-type:token-exchange
    audience=//iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/X
    scope=https://www.googleapis.com/auth/cloud-platform
    requested_token_type=urn:ietf:params:oauth:token-type:access_token
    subject_token=<JWT or other external token>
    subject_token_type=urn:ietf:params:oauth:token-type:jwt (or id_token, saml2, ...)

The emulator knows workload identity pool providers (`register_oidc_provider`): the
audience must name one, and the subject token must be a JWT signed by one of that
provider's keys, from its issuer, for one of its allowed audiences, unexpired. Tests can
also register opaque subject tokens (`register_subject_token`). A good exchange issues a
federated access token into the shared TokenRegistry whose subject is the federated
principal `principal://iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/subject/SUB`
(the default attribute mapping `google.subject=assertion.sub`).

Errors use STS's OAuth shape, `{"error": "invalid_grant", "error_description": "..."}`,
which google-auth turns into `OAuthError("Error code invalid_grant: ...")`.

app.state knobs: `registry`, `providers` ({audience: OidcProvider}), `subject_tokens`
({token: (audience, subject)}), `token_lifetime_s` (mutable), `fail_tokens` (answer 503);
`exchanges` (log of accepted and refused exchanges: audience, subject, scope, result),
counters `token_requests`, `tokens_issued`.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .google_json import read_token_request
from .keys import JwtError, KeyStore, decode_jwt, new_rsa_key
from .tokens import TokenRegistry

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "JWT_TOKEN_TYPE",
    "TOKEN_EXCHANGE",
    "OidcProvider",
    "create_sts_app",
    "federated_principal",
    "provider_audience",
    "register_oidc_provider",
    "register_subject_token",
]

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
SUBJECT_TOKEN_TYPES = frozenset({
    JWT_TOKEN_TYPE,
    ID_TOKEN_TYPE,
    "urn:ietf:params:oauth:token-type:saml2",
    "urn:ietf:params:aws:token-type:aws4_request",
    "urn:ietf:params:oauth:token-type:mtls",
})
# STS issues tokens usable for Google Cloud APIs only with one of these scopes.
_ALLOWED_SCOPES = frozenset({
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/iam",
})
_CLOCK_SKEW_S = 300
_NO_CACHE = {"cache-control": "no-cache, no-store, max-age=0, must-revalidate", "pragma": "no-cache"}
_BAD_TARGET = (
    'The target service indicated by the "audience" parameters is invalid. This might either be because '
    "the pool or provider is disabled or deleted or because it doesn't exist."
)


def provider_audience(project_number: str, pool: str, provider: str) -> str:
    """The `audience` of a credential config: the provider's full resource name."""
    return (f"//iam.googleapis.com/projects/{project_number}/locations/global/"
            f"workloadIdentityPools/{pool}/providers/{provider}")


def federated_principal(audience: str, subject: str) -> str:
    """The IAM principal STS tokens act as, for `google.subject` = `subject`."""
    pool = audience.split("/providers/", 1)[0].removeprefix("//iam.googleapis.com/")
    return f"principal://iam.googleapis.com/{pool}/subject/{subject}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class OidcProvider:
    """A workload identity pool OIDC provider, e.g. for a Kubernetes cluster's SA token issuer.

    Holds the issuer's signing keys too (the emulator plays the cluster as well), so a
    test can mint subject tokens with `mint`.
    """

    audience: str
    issuer: str
    allowed_audiences: tuple[str, ...]
    keys: KeyStore = field(default_factory=KeyStore)
    _private: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict, repr=False)
    disabled: bool = False

    def new_key(self) -> str:
        """Rotate in a signing key (the issuer's JWKS gains it); returns its key id."""
        key = new_rsa_key()
        kid = secrets.token_hex(8)
        self.keys.add(kid, self.issuer, key.public_key())
        self._private[kid] = key
        return kid

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._private)

    def retire_key(self, kid: str) -> None:
        """Drop a key from the issuer's JWKS: tokens it signed no longer verify."""
        self.keys.remove(kid)
        self._private.pop(kid, None)

    def mint(self, subject: str, *, lifetime_s: float = 3600, audience: str | None = None,
             issuer: str | None = None, issued_at: float | None = None, kid: str | None = None,
             extra: dict[str, Any] | None = None) -> str:
        """An RS256 JWT like a Kubernetes projected service-account token."""
        if kid is None:  # the newest key signs, as after a rotation
            kid = self.key_ids[-1] if self._private else self.new_key()
        now = time.time() if issued_at is None else issued_at
        claims: dict[str, Any] = {
            "iss": issuer or self.issuer,
            "sub": subject,
            "aud": [audience or self.allowed_audiences[0]],
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + lifetime_s),
            **(extra or {}),
        }
        header = {"alg": "RS256", "kid": kid, "typ": "JWT"}
        signing_input = (f"{_b64url(json.dumps(header, separators=(',', ':')).encode())}."
                         f"{_b64url(json.dumps(claims, separators=(',', ':')).encode())}")
        signature = self._private[kid].sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


def register_oidc_provider(sts: Starlette, audience: str, *, issuer: str = "https://kubernetes.default.svc",
                           allowed_audiences: tuple[str, ...] | None = None) -> OidcProvider:
    """Create a provider with one signing key. Default allowed audience is what GCP uses when
    none is configured: the provider's resource name with an `https:` prefix."""
    provider = OidcProvider(audience, issuer, allowed_audiences or ("https:" + audience,))
    provider.new_key()
    with sts.state.lock:
        sts.state.providers[audience] = provider
    return provider


def register_subject_token(sts: Starlette, token: str, audience: str, subject: str) -> None:
    """Accept an opaque subject token for `audience`, mapping to `subject`."""
    with sts.state.lock:
        sts.state.subject_tokens[token] = (audience, subject)


def _error(error: str, description: str, status_code: int = 400) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status_code,
                        headers=_NO_CACHE)


def _check_jwt(provider: OidcProvider, token: str) -> tuple[str | None, str]:
    """(subject, "") for a good token, else (None, STS's error description)."""
    try:
        _, claims, _key = decode_jwt(token, provider.keys)
    except JwtError as exc:
        if str(exc) in ("unknown key id", "bad signature"):
            return None, "Invalid JWT signature."
        return None, "Unable to parse the ID Token."
    if claims.get("iss") != provider.issuer:
        return None, (f"The issuer in ID Token {claims.get('iss')} does not match the expected ones: "
                      f"{provider.issuer}.")
    audiences = claims.get("aud")
    audiences = [audiences] if isinstance(audiences, str) else list(audiences or [])
    if not set(audiences) & set(provider.allowed_audiences):
        return None, (f"The audience in ID Token [{', '.join(map(str, audiences))}] does not match the expected "
                      f"audience {', '.join(provider.allowed_audiences)}.")
    now = time.time()
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int | float) or exp <= now - _CLOCK_SKEW_S:
        return None, "The ID Token has expired."
    if isinstance(iat, int | float) and iat > now + _CLOCK_SKEW_S:
        return None, f"ID Token issued at {int(iat)} is in the future."
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        return None, "The ID Token does not contain a subject (sub) claim."
    return subject, ""


async def _token(request: Request) -> JSONResponse:
    state = request.app.state
    state.token_requests += 1
    if state.fail_tokens:
        return _error("temporarily_unavailable", "The service is currently unavailable.", 503)
    p = await read_token_request(request)
    grant_type = p.get("grant_type", "")
    if grant_type != TOKEN_EXCHANGE:
        return _error("unsupported_grant_type" if grant_type else "invalid_request",
                      f'Invalid value for "grant_type". Expected: {TOKEN_EXCHANGE}' if grant_type
                      else 'Missing required parameter: "grant_type"')
    for name in ("audience", "subject_token", "subject_token_type", "requested_token_type"):
        if not p.get(name):
            return _error("invalid_request", f'Invalid value for "{name}".')
    if p["requested_token_type"] != ACCESS_TOKEN_TYPE:
        return _error("invalid_request", f'Invalid value for "requested_token_type". Expected: {ACCESS_TOKEN_TYPE}')
    if p["subject_token_type"] not in SUBJECT_TOKEN_TYPES:
        return _error("invalid_request", f'Invalid value for "subject_token_type": {p["subject_token_type"]}')
    scopes = tuple(p.get("scope", "").split())
    if not scopes or not _ALLOWED_SCOPES.intersection(scopes):
        return _error("invalid_scope", "The scope must include https://www.googleapis.com/auth/cloud-platform.")

    audience, subject_token = p["audience"], p["subject_token"]
    with state.lock:
        provider: OidcProvider | None = state.providers.get(audience)
        opaque = state.subject_tokens.get(subject_token)
    record: dict[str, Any] = {"audience": audience, "scope": " ".join(scopes),
                              "subject_token_type": p["subject_token_type"], "subject": None}
    state.exchanges.append(record)
    if opaque is not None:
        if opaque[0] != audience:
            record["result"] = "invalid_grant"
            return _error("invalid_grant", "The subject token was not issued for this audience.")
        subject = opaque[1]
    else:
        if provider is None or provider.disabled:
            record["result"] = "invalid_target"
            return _error("invalid_target", _BAD_TARGET)
        subject_or_none, problem = _check_jwt(provider, subject_token)
        if subject_or_none is None:
            record["result"] = "invalid_grant"
            return _error("invalid_grant", problem)
        subject = subject_or_none
    principal = federated_principal(audience, subject)
    token, expires_in = state.registry.issue(principal, float(state.token_lifetime_s), scopes)
    state.tokens_issued += 1
    record.update(subject=principal, result="ok")
    return JSONResponse(
        {"access_token": token, "issued_token_type": ACCESS_TOKEN_TYPE, "token_type": "Bearer",
         "expires_in": expires_in},
        headers=_NO_CACHE,
    )


def create_sts_app(registry: TokenRegistry, *, token_lifetime_s: float = 3600) -> Starlette:
    app = Starlette(routes=[Route("/v1/token", _token, methods=["POST"])])
    state = app.state
    state.registry = registry
    state.lock = threading.Lock()  # tests register providers from another thread
    state.providers = {}
    state.subject_tokens = {}
    state.token_lifetime_s = token_lifetime_s
    state.fail_tokens = False
    state.exchanges = []
    state.token_requests = 0
    state.tokens_issued = 0
    return app
