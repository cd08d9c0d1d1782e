"""Plain metadata-server ADC without google-auth: when it applies, the wire protocol against
the metadata emulator, refusals, and that a sidecar on it never imports requests or
cryptography."""

from __future__ import annotations

import datetime
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from tests.emulators.serve import ServerHandle, create_combined_app, running_server
from vertex_sidecar.metadata_token import (
    MetadataServerCredentials,
    MetadataTokenError,
    gcloud_adc_file,
    metadata_host,
    parse_token_response,
    use_native_metadata,
)

CLOUD = "https://www.googleapis.com/auth/cloud-platform"
NOW = datetime.datetime(2026, 12, 7, 12, 0, 0)


@pytest.fixture
def emu() -> Iterator[ServerHandle]:
    with running_server(create_combined_app()) as handle:
        yield handle


def test_native_only_where_adc_would_ask_the_metadata_server(tmp_path: Path) -> None:
    home = {"HOME": str(tmp_path)}
    assert use_native_metadata(home)
    for other in ("GOOGLE_APPLICATION_CREDENTIALS", "GCE_METADATA_MTLS_MODE", "GOOGLE_API_CERTIFICATE_CONFIG"):
        assert not use_native_metadata({**home, other: "/x"})
    adc_file = Path(gcloud_adc_file(home))
    adc_file.parent.mkdir(parents=True)
    adc_file.write_text("{}")  # gcloud's user credentials come before the metadata server
    assert not use_native_metadata(home)
    assert gcloud_adc_file({"CLOUDSDK_CONFIG": "/cfg"}) == "/cfg/application_default_credentials.json"
    assert metadata_host({}) == "metadata.google.internal"
    assert metadata_host({"GCE_METADATA_ROOT": "legacy:80"}) == "legacy:80"
    assert metadata_host({"GCE_METADATA_HOST": "new:80", "GCE_METADATA_ROOT": "legacy:80"}) == "new:80"


def test_token_from_the_metadata_emulator_with_scopes(emu: ServerHandle) -> None:
    credentials = MetadataServerCredentials(scopes=[CLOUD], host=f"127.0.0.1:{emu.port}")
    credentials.refresh()
    assert credentials.token and credentials.expiry is not None
    issued = emu.app.state.registry.lookup(credentials.token)
    assert issued is not None and issued.scopes == (CLOUD,)
    remaining = (credentials.expiry - datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None))
    assert 3000 < remaining.total_seconds() <= 3600


def test_metadata_server_failures_are_explained(emu: ServerHandle) -> None:
    emu.app.state.metadata_app.state.fail_tokens = True
    with pytest.raises(MetadataTokenError, match="answered 503"):
        MetadataServerCredentials(scopes=[], host=f"127.0.0.1:{emu.port}").refresh()
    with pytest.raises(MetadataTokenError, match="did not answer .* no other Application Default Credentials"):
        MetadataServerCredentials(scopes=[], host="127.0.0.1:1").refresh()


@pytest.mark.parametrize("status, flavor, body, message", [
    (200, None, b'{"access_token": "t", "expires_in": 10}', "not a metadata server"),
    (404, "Google", b"not found", "answered 404"),
    (200, "Google", b"<html>", "without access_token"),
    (200, "Google", b'{"access_token": "", "expires_in": 10}', "empty token"),
])
def test_bad_answers_are_refused(status: int, flavor: str | None, body: bytes, message: str) -> None:
    with pytest.raises(MetadataTokenError, match=message):
        parse_token_response(status, flavor, body, NOW, "mds")


def test_good_answer() -> None:
    token, expiry = parse_token_response(200, "Google", b'{"access_token": "ya29.x", "expires_in": 60}', NOW, "mds")
    assert token == "ya29.x" and expiry == NOW + datetime.timedelta(seconds=60)


def test_a_metadata_adc_sidecar_imports_neither_requests_nor_cryptography(emu: ServerHandle, tmp_path: Path) -> None:
    """The memory this saves is the point: build the sidecar, get its first token, list modules."""
    script = textwrap.dedent("""
        import asyncio, sys
        from vertex_sidecar.cli import build_sidecar
        from vertex_sidecar.config import Config

        async def main():
            sidecar = build_sidecar(Config())
            source = sidecar.state.snapshot.credentials.sources["default"]
            assert (await source.token()).startswith("ya29.")
            await sidecar.aclose()

        asyncio.run(main())
        print(sorted({m.split(".")[0] for m in sys.modules} & {"requests", "cryptography", "urllib3", "google"}))
    """)
    host = f"127.0.0.1:{emu.port}"
    env = {"GCE_METADATA_HOST": host, "GCE_METADATA_IP": host, "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
