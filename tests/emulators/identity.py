"""STS and IAM Credentials endpoints, added to the combined emulator.

`create_identity_app(registry)` serves both from one app:
- `POST /v1/token` → STS (sts.py)
- `POST /v1/projects/-/serviceAccounts/{email}:generateAccessToken` → IAM Credentials
  (iam_credentials.py)

`mount_identity_endpoints(combined_app)` puts them in front of the combined app's
dispatcher (serve.py), sharing its TokenRegistry, so tokens they issue are accepted by the
Vertex emulator and its request log shows the federated principal or impersonated account.
Behind the `/_upstream/<host>` prefix the host decides: `sts.googleapis.com` → STS,
`iamcredentials.googleapis.com` → IAM Credentials. Without a prefix the paths decide; they
never collide with Vertex paths (`/v1/projects/-/...` is not a valid Vertex project).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from .iam_credentials import create_iam_credentials_app
from .sts import create_sts_app
from .tokens import TokenRegistry
from .upstream import UPSTREAM_HOST_KEY

__all__ = ["IdentityRouter", "create_identity_app", "is_identity_request", "mount_identity_endpoints"]

STS_HOSTS = frozenset({"sts.googleapis.com", "sts.mtls.googleapis.com"})
IAM_HOSTS = frozenset({"iamcredentials.googleapis.com", "iamcredentials.mtls.googleapis.com"})
_IAM_PREFIX = "/v1/projects/-/serviceAccounts/"


def _target(scope: Scope) -> str | None:
    """"sts", "iam" or None for a request the identity endpoints do not serve."""
    host = scope.get(UPSTREAM_HOST_KEY) or ""
    if host in STS_HOSTS:
        return "sts"
    if host in IAM_HOSTS:
        return "iam"
    if host:
        return None
    path = scope.get("path", "")
    if path == "/v1/token":
        return "sts"
    if path.startswith(_IAM_PREFIX):
        return "iam"
    return None


def is_identity_request(scope: Scope) -> bool:
    """For `_Dispatcher._pick`: does this request go to the identity app?"""
    return _target(scope) is not None


class _IdentityApp:
    def __init__(self, sts: Starlette, iam: Starlette) -> None:
        self.sts, self.iam = sts, iam

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.sts if _target(scope) == "sts" else self.iam
        await app(scope, receive, send)


def create_identity_app(registry: TokenRegistry, *, token_lifetime_s: float = 3600) -> Starlette:
    """STS + IAM Credentials on one app. state: registry, sts_app, iam_app."""
    sts = create_sts_app(registry, token_lifetime_s=token_lifetime_s)
    iam = create_iam_credentials_app(registry)
    app = Starlette(routes=[Mount("", app=_IdentityApp(sts, iam))])
    app.state.registry = registry
    app.state.sts_app = sts
    app.state.iam_app = iam
    return app


class IdentityRouter:
    """Identity requests → the identity app, everything else → `fallback`."""

    def __init__(self, identity: ASGIApp, fallback: ASGIApp) -> None:
        self.identity, self.fallback = identity, fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.identity if scope["type"] == "http" and is_identity_request(scope) else self.fallback
        await app(scope, receive, send)


def mount_identity_endpoints(combined_app: Starlette) -> Starlette:
    """Add STS + IAM Credentials to a `create_combined_app` app, in place; idempotent.

    Returns the identity app; also set on the combined app's state as `identity_app`,
    `sts_app` and `iam_app`.
    """
    existing: Starlette | None = getattr(combined_app.state, "identity_app", None)
    if existing is not None:
        return existing
    identity = create_identity_app(combined_app.state.registry)
    mount = next(route for route in combined_app.routes if isinstance(route, Mount) and route.path == "")
    # Mount.handle calls `self.app`; wrapping it keeps the UpstreamPrefix middleware (and
    # so the shared request log and the /_upstream/<host> routing) in front of both.
    mount.app = IdentityRouter(identity, mount.app)
    combined_app.state.identity_app = identity
    combined_app.state.sts_app = identity.state.sts_app
    combined_app.state.iam_app = identity.state.iam_app
    return identity
