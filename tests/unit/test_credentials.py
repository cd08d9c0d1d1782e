"""TokenSource caching and refresh with a fake google-auth credentials object; error texts."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from google.auth import exceptions as google_exceptions

from vertex_sidecar import credentials as credentials_module
from vertex_sidecar.config import ConfigError, CredentialSpec, parse_config
from vertex_sidecar.credentials import (
    MIN_VALIDITY_S,
    REFRESH_AHEAD_S,
    CredentialError,
    TokenSource,
    refresh_margins,
    explain_refresh_error,
)

WAIT_S = 5.0  # deadline for anything that should happen at once


class FakeCredentials:
    """Quacks like google-auth credentials: `refresh(request)` sets `token` and naive-UTC `expiry`."""

    def __init__(self, lifetime_s: float = 3600.0) -> None:
        self.lifetime_s = lifetime_s
        self.token: str | None = None
        self.expiry: datetime | None = None
        self.error: Exception | None = None
        self.gate = threading.Event()  # a refresh blocks until the gate is open
        self.gate.set()
        self.started = threading.Event()  # set when a refresh begins
        self._lock = threading.Lock()
        self.refreshes = 0

    def refresh(self, request: Any) -> None:
        with self._lock:
            self.refreshes += 1
            number = self.refreshes
        self.started.set()
        if not self.gate.wait(WAIT_S):
            raise TimeoutError("test gate never opened")
        if self.error is not None:
            raise self.error
        self.token = f"ya29.fake-{number}"
        self.expiry = datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(seconds=self.lifetime_s)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeCredentials:
    creds = FakeCredentials()
    monkeypatch.setattr(credentials_module, "_make_credentials", lambda spec, sources: creds)
    return creds


def source(observed: list[tuple[str, str]] | None = None) -> TokenSource:
    observer = (lambda name, result: observed.append((name, result))) if observed is not None else None
    return TokenSource(CredentialSpec(name="team-a", type="adc"), observer=observer)


async def wait_started(fake: FakeCredentials) -> None:
    assert await asyncio.to_thread(fake.started.wait, WAIT_S), "no refresh started"


async def test_one_refresh_serves_fifty_concurrent_callers(fake: FakeCredentials) -> None:
    fake.gate.clear()
    tokens = source()
    callers = [asyncio.ensure_future(tokens.token()) for _ in range(50)]
    await wait_started(fake)
    fake.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*callers), WAIT_S)
    assert set(results) == {"ya29.fake-1"}
    assert fake.refreshes == 1


class Clock:
    """Wall clock with an adjustable offset, so a test can jump to a token's refresh window."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def test_refresh_ahead_serves_the_cached_token_while_refreshing(fake: FakeCredentials) -> None:
    # Valid, but inside the refresh-ahead window: callers get it at once, a refresh starts behind them.
    clock = Clock()
    tokens = TokenSource(CredentialSpec(name="team-a", type="adc"), clock=clock)
    assert await tokens.token() == "ya29.fake-1"
    fake.started.clear()
    fake.gate.clear()
    clock.offset = fake.lifetime_s - (REFRESH_AHEAD_S + MIN_VALIDITY_S) / 2
    assert await asyncio.wait_for(tokens.token(), WAIT_S) == "ya29.fake-1"
    await wait_started(fake)
    assert await asyncio.wait_for(tokens.token(), WAIT_S) == "ya29.fake-1"  # still in flight: served cached
    assert fake.refreshes == 2, "callers during a background refresh must not start another"
    fake.gate.set()
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while (latest := await tokens.token()) != "ya29.fake-2":
        assert asyncio.get_running_loop().time() < deadline, "the background refresh never landed"
        await asyncio.sleep(0.01)
    assert latest == "ya29.fake-2" and fake.refreshes == 2


def test_margins_scale_down_to_short_lived_tokens() -> None:
    assert refresh_margins(3600) == (REFRESH_AHEAD_S, MIN_VALIDITY_S)  # hour-long tokens: the fixed margins
    ahead, min_validity = refresh_margins(10)
    assert (ahead, min_validity) == (5, 1)  # refreshed half-way, handed out until its last second
    assert refresh_margins(0) == (0, 0)


async def test_a_ten_second_token_is_ready_and_refreshed_half_way(fake: FakeCredentials) -> None:
    # Before the margins scaled, a 10 s token was never "valid for 30 s more": never ready.
    fake.lifetime_s = 10.0
    clock = Clock()
    tokens = TokenSource(CredentialSpec(name="team-a", type="adc"), clock=clock)
    assert await tokens.token() == "ya29.fake-1"
    assert tokens.ready and tokens.cached() == "ya29.fake-1" and fake.refreshes == 1
    fake.started.clear()
    clock.offset = 6.0  # past half its life: still handed out, a refresh starts behind it
    assert tokens.cached() == "ya29.fake-1"
    await wait_started(fake)
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while tokens.cached() != "ya29.fake-2":
        assert asyncio.get_running_loop().time() < deadline, "the background refresh never landed"
        await asyncio.sleep(0.01)
    assert fake.refreshes == 2
    clock.offset = 6.0 + 9.5  # in the new token's last half second: no longer handed out
    assert not tokens.ready and tokens.cached() is None


async def test_invalidate_forgets_only_the_refused_token(fake: FakeCredentials) -> None:
    tokens = source()
    assert await tokens.token() == "ya29.fake-1"
    tokens.invalidate("ya29.some-older-token")  # a late 401 for a token already replaced
    assert await tokens.token() == "ya29.fake-1" and fake.refreshes == 1
    tokens.invalidate("ya29.fake-1")
    assert not tokens.ready
    assert await tokens.token() == "ya29.fake-2" and fake.refreshes == 2


async def test_refresh_errors_are_redacted(fake: FakeCredentials, caplog: pytest.LogCaptureFixture) -> None:
    fake.error = RuntimeError(
        "refresh failed for ya29.a0AfB_secret-token.xyz with key "
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n and more"
    )
    observed: list[tuple[str, str]] = []
    tokens = source(observed)
    with caplog.at_level(logging.WARNING, logger="vertex_sidecar.credentials"):
        with pytest.raises(CredentialError) as raised:
            await tokens.token()
    for text in (str(raised.value), tokens.last_error or "", caplog.text):
        assert "[redacted]" in text
        assert "ya29" not in text and "PRIVATE KEY" not in text and "MIIEv" not in text
    assert "'team-a'" in str(raised.value) and "and more" in str(raised.value)
    assert observed == [("team-a", "failure")]


def test_impersonation_refusal_is_explained() -> None:
    body = json.dumps({"error": {
        "code": 403, "status": "PERMISSION_DENIED",
        "message": "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).",
    }})
    error = google_exceptions.RefreshError("Unable to acquire impersonated credentials", body)
    spec = CredentialSpec(name="imp", type="impersonate", target_principal="sa@p.iam.gserviceaccount.com")
    text = explain_refresh_error(spec, error)
    assert text.startswith("impersonation of sa@p.iam.gserviceaccount.com was denied: PERMISSION_DENIED")
    assert "roles/iam.serviceAccountTokenCreator" in text and "{" not in text


def test_sts_refusal_keeps_googles_description_without_the_raw_body() -> None:
    body = json.dumps({"error": "invalid_grant", "error_description": "Invalid JWT signature."})
    error = google_exceptions.OAuthError("Error code invalid_grant: Invalid JWT signature.", body)
    spec = CredentialSpec(name="fed", type="external_account_file", path="/x.json")
    assert explain_refresh_error(spec, error) == "OAuthError: Error code invalid_grant: Invalid JWT signature."


def test_external_account_file_refuses_a_service_account_key(tmp_path: Path) -> None:
    key = tmp_path / "key.json"
    key.write_text(json.dumps({"type": "service_account", "client_email": "a@b"}))
    spec = CredentialSpec(name="fed", type="external_account_file", path=str(key))
    with pytest.raises(CredentialError, match="'service_account' credential, not an external_account"):
        credentials_module._make_credentials(spec, {})


IMPERSONATE = {"type": "impersonate", "target_principal": "sa@p.iam.gserviceaccount.com"}


def test_iam_endpoint_is_an_impersonate_only_url() -> None:
    config = parse_config({"credentials": {"imp": {**IMPERSONATE, "iam_endpoint": "http://127.0.0.1:1/iam/"}}})
    assert config.credentials["imp"].iam_endpoint == "http://127.0.0.1:1/iam"
    assert parse_config({"credentials": {"imp": IMPERSONATE}}).credentials["imp"].iam_endpoint is None
    with pytest.raises(ConfigError, match=r"credentials\.a\.iam_endpoint: only used by type impersonate"):
        parse_config({"credentials": {"a": {"type": "adc", "iam_endpoint": "https://x"}}})
    with pytest.raises(ConfigError, match="must be an http"):
        parse_config({"credentials": {"imp": {**IMPERSONATE, "iam_endpoint": "iamcredentials.googleapis.com"}}})


@pytest.mark.parametrize(("credentials", "message"), [
    ({"imp": {**IMPERSONATE, "source": "own"}, "own": {"type": "client"}}, "'own' is of type client"),
    ({"a": {**IMPERSONATE, "source": "b"}, "b": {**IMPERSONATE, "source": "a"}}, r"circular sources \(a -> b -> a\)"),
])
def test_impersonation_sources_must_mint_tokens(credentials: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"credentials": credentials})
