"""Google access tokens for the sidecar's credentials: create, cache, refresh.

One `TokenSource` per configured credential. google-auth does the real work (ADC incl.
GKE Workload Identity, key files, federation configs, impersonation); its refresh is
blocking I/O, so it always runs in a worker thread. Tokens are refreshed ahead of
expiry in the background; at most one refresh is in flight per credential, and callers
that need a token while it runs share its result.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from datetime import timezone
from typing import Any, Callable, Mapping

from .config import CredentialSpec

log = logging.getLogger("vertex_sidecar.credentials")

REFRESH_AHEAD_S = 300.0  # refresh in the background this long before expiry
MIN_VALIDITY_S = 30.0  # never hand out a token with less validity than this
WARMUP_BACKOFF_MAX_S = 30.0
TOKEN_WAIT_S = 5.0  # a request waits at most this long for a token before it gets a 503

RefreshObserver = Callable[[str, str], None]  # (credential name, "success" | "failure")

_TOKENISH = re.compile(r"(ya29\.[\w.-]+|eyJ[\w-]+\.[\w-]+\.[\w-]*|-----BEGIN [A-Z ]+-----[^-]*)")


class CredentialError(Exception):
    """No token could be obtained; the message is safe to show (no secrets)."""


def redact(text: str) -> str:
    """Strip anything shaped like an access token, JWT or PEM block from a message."""
    return _TOKENISH.sub("[redacted]", text)


def _make_credentials(spec: CredentialSpec, sources: Mapping[str, CredentialSpec]) -> Any:
    """Build the google-auth credentials object for a spec (blocking: may probe metadata)."""
    import google.auth
    from google.auth import impersonated_credentials
    from google.oauth2 import service_account

    scopes = list(spec.scopes)
    if spec.type == "adc":
        credentials, _project = google.auth.default(scopes=scopes)
        return credentials
    if spec.type == "service_account_file":
        assert spec.path is not None
        return service_account.Credentials.from_service_account_file(spec.path, scopes=scopes)
    if spec.type == "external_account_file":
        assert spec.path is not None
        credentials, _project = google.auth.load_credentials_from_file(spec.path, scopes=scopes)
        return credentials
    if spec.type == "impersonate":
        source_spec = sources[spec.source] if spec.source else CredentialSpec(name="adc-source")
        source = _make_credentials(source_spec, sources)
        return impersonated_credentials.Credentials(
            source_credentials=source,
            target_principal=spec.target_principal,
            target_scopes=scopes,
            delegates=list(spec.delegates) or None,
            lifetime=spec.lifetime_seconds,
        )
    raise CredentialError(f"credential type {spec.type!r} does not mint tokens")


class TokenSource:
    """Cached access token for one credential."""

    def __init__(self, spec: CredentialSpec, sources: Mapping[str, CredentialSpec] | None = None,
                 observer: RefreshObserver | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self._sources = sources or {}
        self._observer = observer
        self._credentials: Any = None
        self._request: Any = None
        self._token: str | None = None
        self._expires_at = 0.0
        self._refreshing: asyncio.Future[str] | None = None
        self._warmup: asyncio.Task[None] | None = None
        self.last_error: str | None = None

    @property
    def ready(self) -> bool:
        return self._token is not None and time.time() < self._expires_at - MIN_VALIDITY_S

    @property
    def expires_at(self) -> float:
        return self._expires_at

    async def token(self) -> str:
        """A valid access token; waits for a refresh only when the cached one is (nearly) expired."""
        now = time.time()
        if self._token is not None and now < self._expires_at - MIN_VALIDITY_S:
            if now >= self._expires_at - REFRESH_AHEAD_S and self._refreshing is None:
                self._start_refresh()  # in the background; the cached token is still good
            return self._token
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
            self._expires_at = 0.0

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
            message = redact(f"{type(exc).__name__}: {exc}")[:500]
            self.last_error = message
            self._observe("failure")
            log.warning("token refresh failed for credential %r: %s", self.name, message)
            raise CredentialError(
                f"the sidecar could not obtain a Google access token for credential {self.name!r} "
                f"({self.spec.type}): {message}"
            ) from None
        self._token, self._expires_at = token, expires_at
        self.last_error = None
        self._observe("success")
        return token

    def _refresh_blocking(self) -> tuple[str, float]:
        from google.auth.transport.requests import Request

        if self._credentials is None:
            self._credentials = _make_credentials(self.spec, self._sources)
        if self._request is None:
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
                sleep_for = max(self._expires_at - REFRESH_AHEAD_S - time.time(), 5.0)
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
