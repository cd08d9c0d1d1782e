"""Google access tokens for the sidecar's credentials: create, cache, refresh.

One `TokenSource` per configured credential. google-auth does the real work (ADC incl.
GKE Workload Identity, key files, federation configs, impersonation); its refresh is
blocking I/O, so it always runs in a worker thread. Tokens are refreshed ahead of
expiry in the background; at most one refresh is in flight per credential, and callers
that need a token while it runs share its result.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import time
from datetime import timezone
from typing import Any, Callable, Mapping

from .config import CredentialSpec

log = logging.getLogger("vertex_sidecar.credentials")

REFRESH_AHEAD_S = 300.0  # refresh in the background this long before expiry (at most half the lifetime)
MIN_VALIDITY_S = 30.0  # never hand out a token with less validity than this (at most a tenth of the lifetime)
KEEP_FRESH_MIN_SLEEP_S = 0.5  # the keep-fresh timer never fires more often than this
WARMUP_BACKOFF_MAX_S = 30.0
TOKEN_WAIT_S = 5.0  # a request waits at most this long for a token before it gets a 503
FAILURE_HOLD_S = 2.0  # after a failed refresh, callers get the same error for this long (no refresh storm)

RefreshObserver = Callable[[str, str], None]  # (credential name, "success" | "failure")

# A PEM block is cut through its END line (or to the end of the text when truncated).
_TOKENISH = re.compile(r"(ya29\.[\w.-]+|eyJ[\w-]+\.[\w-]+\.[\w-]*|-----BEGIN ([A-Z ]+)-----.*?(?:-----END \2-----|$))",
                       re.DOTALL)
_GENERATE_ACCESS_TOKEN = "/v1/projects/-/serviceAccounts/{}:generateAccessToken"


class CredentialError(Exception):
    """No token could be obtained; the message is safe to show (no secrets)."""


def redact(text: str) -> str:
    """Strip anything shaped like an access token, JWT or PEM block from a message."""
    return _TOKENISH.sub("[redacted]", text)


def _load_file_unscoped_then_scope(path: str, scopes: list[str]) -> Any:
    """Any credential file google-auth knows, without its project-id lookup.

    `google.auth.default()` and `load_credentials_from_file(scopes=...)` look up the project
    of an `external_account` config at cloudresourcemanager.googleapis.com — a token
    exchange plus a call the sidecar does not need, which fails where egress only reaches
    Vertex (and in tests). Loading unscoped skips it; scoping afterwards is what `default()`
    does itself.
    """
    import google.auth
    from google.auth import credentials as google_credentials

    credentials, _project = google.auth.load_credentials_from_file(path)
    return google_credentials.with_scopes_if_required(credentials, scopes)


def _external_account(path: str, scopes: list[str]) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            kind = json.load(file).get("type")
    except (OSError, ValueError, AttributeError) as exc:
        raise CredentialError(f"cannot read the credential configuration {path}: {exc}") from None
    if kind not in ("external_account", "external_account_authorized_user"):
        # Refuse rather than load whatever it is: a key file here is a misconfiguration.
        raise CredentialError(f"{path} holds a {kind!r} credential, not an external_account configuration "
                              "(use type service_account_file for key files)")
    return _load_file_unscoped_then_scope(path, scopes)


def _delegate_name(delegate: str) -> str:
    """IAM wants `projects/-/serviceAccounts/EMAIL`; the config may give the bare email."""
    return delegate if "/" in delegate else f"projects/-/serviceAccounts/{delegate}"


def _make_credentials(spec: CredentialSpec, sources: Mapping[str, CredentialSpec], *,
                      as_source: bool = False) -> Any:
    """Build the credentials object for a spec (blocking: may probe metadata). google-auth's,
    except for plain metadata-server ADC (`metadata_token`: the same GET, without importing
    `requests` and `cryptography`); imported per type, so a sidecar loads only what it uses."""
    scopes = list(spec.scopes)
    if spec.type == "adc":
        explicit = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if explicit:  # the first place default() looks; loaded without the project lookup
            return _load_file_unscoped_then_scope(explicit, scopes)
        from .metadata_token import MetadataServerCredentials, use_native_metadata

        if not as_source and use_native_metadata(os.environ):  # (google-auth's impersonation wants its own)
            return MetadataServerCredentials.from_environ(scopes, os.environ)
        import google.auth

        credentials, _project = google.auth.default(scopes=scopes)
        return credentials
    if spec.type == "service_account_file":
        from google.oauth2 import service_account

        assert spec.path is not None
        return service_account.Credentials.from_service_account_file(spec.path, scopes=scopes)
    if spec.type == "external_account_file":
        assert spec.path is not None
        return _external_account(spec.path, scopes)
    if spec.type == "impersonate":
        from google.auth import impersonated_credentials

        assert spec.target_principal is not None
        source_spec = sources[spec.source] if spec.source else CredentialSpec(name="adc-source")
        source = _make_credentials(source_spec, sources, as_source=True)
        # google-auth takes the full URL with the account in it; None keeps Google's endpoint.
        endpoint = (spec.iam_endpoint + _GENERATE_ACCESS_TOKEN.format(spec.target_principal)
                    if spec.iam_endpoint else None)
        return impersonated_credentials.Credentials(
            source_credentials=source,
            target_principal=spec.target_principal,
            target_scopes=scopes,
            delegates=[_delegate_name(d) for d in spec.delegates] or None,
            lifetime=spec.lifetime_seconds,
            iam_endpoint_override=endpoint,
        )
    raise CredentialError(f"credential type {spec.type!r} does not mint tokens")


def _google_error(exc: BaseException) -> tuple[Any, str | None, str | None]:
    """(code, status or OAuth error, message) from the response body google-auth attaches
    as its exception's second argument; Nones when there is none."""
    for arg in exc.args[1:]:
        if isinstance(arg, bytes):
            arg = arg.decode("utf-8", "replace")
        if not isinstance(arg, str):
            continue
        try:
            data = json.loads(arg)
        except ValueError:
            continue
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):  # Google API shape (IAM Credentials)
            return error.get("code"), error.get("status"), error.get("message")
        if isinstance(error, str):  # OAuth shape (STS, OAuth token endpoint)
            return None, error, data.get("error_description")
    return None, None, None


def explain_refresh_error(spec: CredentialSpec, exc: BaseException, target: str | None = None) -> str:
    """What went wrong and what to fix, for logs and 503 answers (redacted, no raw bodies)."""
    first = str(exc.args[0]) if exc.args else ""
    code, status, message = _google_error(exc)
    if "impersonated credentials" in first:  # google-auth's generateAccessToken failure
        account = target or spec.target_principal or "the target service account"
        via = f" (via delegates {', '.join(spec.delegates)})" if spec.delegates else ""
        if code == 403:
            # Federation configs impersonate through roles/iam.workloadIdentityUser; the
            # impersonate type (a Google identity as source) through Token Creator.
            role = "roles/iam.serviceAccountTokenCreator" if spec.type == "impersonate" else \
                "roles/iam.workloadIdentityUser"
            text = (f"impersonation of {account}{via} was denied: {status}: {message}; grant the source identity "
                    f"{role} on {account}" + (" and each delegate on the next" if spec.delegates else ""))
        elif code == 404:
            text = f"impersonation of {account}{via} failed: {message} (does the service account exist?)"
        elif code == 401:
            text = f"impersonation of {account} failed: the source credential's token was refused ({message})"
        else:
            text = f"impersonation of {account} failed: {status or type(exc).__name__}: {message or first}"
    elif status is not None and code is None:
        # STS / OAuth: google-auth's own first argument already reads "Error code invalid_grant: ..."
        text = f"{type(exc).__name__}: {first}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return redact(text)[:500]


def refresh_margins(lifetime_s: float) -> tuple[float, float]:
    """(refresh-ahead, minimum validity) in seconds for a token that lived `lifetime_s` when obtained.

    The fixed margins suit hour-long tokens; a token source handing out 10-second tokens
    would otherwise never yield a token "valid for 30 s more". Scaled, such a token is
    refreshed half-way through its life and handed out until its last second.
    """
    lifetime_s = max(lifetime_s, 0.0)
    return min(REFRESH_AHEAD_S, lifetime_s / 2), min(MIN_VALIDITY_S, lifetime_s / 10)


class TokenSource:
    """Cached access token for one credential."""

    def __init__(self, spec: CredentialSpec, sources: Mapping[str, CredentialSpec] | None = None,
                 observer: RefreshObserver | None = None, clock: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.name = spec.name
        self._sources = sources or {}
        self._observer = observer
        self._credentials: Any = None
        self._request: Any = None
        self._token: str | None = None
        self._expires_at = 0.0
        self._refresh_at = 0.0  # start a background refresh from here on
        self._valid_until = 0.0  # hand the token out until here
        self._clock = clock
        self._refreshing: asyncio.Future[str] | None = None
        self._warmup: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self._failed_at = 0.0

    @property
    def ready(self) -> bool:
        return self._token is not None and self._clock() < self._valid_until

    @property
    def expires_at(self) -> float:
        return self._expires_at

    def cached(self) -> str | None:
        """The cached token while it is valid (no await: the hot path); None means call `token()`."""
        now = self._clock()
        if self._token is not None and now < self._valid_until:
            if now >= self._refresh_at and self._refreshing is None:
                self._start_refresh()  # in the background; the cached token is still good
            return self._token
        return None

    async def token(self) -> str:
        """A valid access token; waits for a refresh only when the cached one is (nearly) expired."""
        cached = self.cached()
        if cached is not None:
            return cached
        if (self._refreshing is None and self.last_error is not None
                and time.monotonic() - self._failed_at < FAILURE_HOLD_S):
            # A broken credential must not turn every incoming request into a call to Google.
            raise CredentialError(f"the sidecar could not obtain a Google access token for credential "
                                  f"{self.name!r} ({self.spec.type}): {self.last_error}")
        try:
            return await asyncio.wait_for(asyncio.shield(self._start_refresh()), TOKEN_WAIT_S)
        except asyncio.TimeoutError:
            reason = self.last_error or "the first token has not been obtained yet"
            raise CredentialError(
                f"no Google access token for credential {self.name!r} ({self.spec.type}) after "
                f"{TOKEN_WAIT_S:g} s: {reason}"
            ) from None

    def invalidate(self, token: str) -> None:
        """Forget `token` after Google refused it (401), so the next call refreshes."""
        if token == self._token:
            self._token = None
            self._expires_at = self._refresh_at = self._valid_until = 0.0

    def _start_refresh(self) -> asyncio.Future[str]:
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._refresh())
            self._refreshing.add_done_callback(self._refresh_done)
        return self._refreshing

    def _refresh_done(self, future: asyncio.Future[str]) -> None:
        self._refreshing = None
        if not future.cancelled():
            future.exception()  # retrieved here so background refresh failures are not reported as lost

    async def _refresh(self) -> str:
        try:
            token, expires_at = await asyncio.to_thread(self._refresh_blocking)
        except Exception as exc:  # google-auth raises a variety of transport/refresh errors
            from .metadata_token import MetadataTokenError

            if isinstance(exc, (CredentialError, MetadataTokenError)):  # ours, already explained
                message = redact(str(exc))[:500]
            else:
                target = getattr(self._credentials, "service_account_email", None)
                message = explain_refresh_error(self.spec, exc, target if isinstance(target, str) else None)
            self.last_error = message
            self._failed_at = time.monotonic()
            self._observe("failure")
            log.warning("token refresh failed for credential %r: %s", self.name, message)
            raise CredentialError(
                f"the sidecar could not obtain a Google access token for credential {self.name!r} "
                f"({self.spec.type}): {message}"
            ) from None
        ahead, min_validity = refresh_margins(expires_at - self._clock())
        self._token, self._expires_at = token, expires_at
        self._refresh_at, self._valid_until = expires_at - ahead, expires_at - min_validity
        self.last_error = None
        self._observe("success")
        return token

    def _refresh_blocking(self) -> tuple[str, float]:
        from .metadata_token import MetadataServerCredentials

        if self._credentials is None:
            self._credentials = _make_credentials(self.spec, self._sources)
        if self._request is None and not isinstance(self._credentials, MetadataServerCredentials):
            from google.auth.transport.requests import Request

            self._request = Request()
        self._credentials.refresh(self._request)
        token = self._credentials.token
        if not token:
            raise CredentialError("google-auth returned no token")
        expiry = getattr(self._credentials, "expiry", None)
        expires_at = (expiry.replace(tzinfo=timezone.utc).timestamp() if expiry is not None
                      else time.time() + 3600.0)
        return token, expires_at

    def _observe(self, result: str) -> None:
        if self._observer is not None:
            self._observer(self.name, result)

    def start_background(self) -> None:
        """Fetch the first token with backoff (readiness waits for it), then keep it fresh."""
        if self._warmup is None:
            self._warmup = asyncio.ensure_future(self._keep_fresh())

    async def _keep_fresh(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._start_refresh()
                delay = 0.5
                # One timer, due when the token enters its refresh window.
                sleep_for = max(self._refresh_at - self._clock(), KEEP_FRESH_MIN_SLEEP_S)
            except CredentialError:
                # e.g. a fresh GKE pod whose metadata server is not serving tokens yet
                sleep_for = delay * (0.5 + random.random())
                delay = min(delay * 2, WARMUP_BACKOFF_MAX_S)
            await asyncio.sleep(sleep_for)

    async def aclose(self) -> None:
        if self._warmup is not None:
            self._warmup.cancel()
            try:
                await self._warmup
            except asyncio.CancelledError:
                pass
            self._warmup = None


class CredentialRegistry:
    """The token sources of a config, by credential name; `client` credentials have none."""

    def __init__(self, specs: Mapping[str, CredentialSpec], observer: RefreshObserver | None = None) -> None:
        self.specs = dict(specs)
        self.sources: dict[str, TokenSource] = {
            name: TokenSource(spec, specs, observer) for name, spec in specs.items() if spec.type != "client"
        }

    def get(self, name: str) -> TokenSource | None:
        return self.sources.get(name)

    def start(self, names: set[str] | None = None) -> None:
        for name, source in self.sources.items():
            if names is None or name in names:
                source.start_background()

    def ready(self, names: set[str] | None = None) -> bool:
        return all(source.ready for name, source in self.sources.items() if names is None or name in names)

    def adopt(self, previous: "CredentialRegistry") -> None:
        """Keep token sources whose spec did not change across a config reload (no new token needed)."""
        for name, source in list(self.sources.items()):
            old = previous.sources.get(name)
            if old is not None and old.spec == source.spec:
                self.sources[name] = old

    async def aclose(self) -> None:
        for source in self.sources.values():
            await source.aclose()
