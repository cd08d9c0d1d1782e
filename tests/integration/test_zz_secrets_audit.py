"""Runs last among the integration tests: nothing any sidecar of this session printed or
served on its admin port contains a token, a JWT, key material or a test caller key.

Every sidecar started through tests/harness/sidecar_process.py adds its stdout, stderr,
/metrics and /readyz to SESSION_OUTPUT when it is stopped. (Error bodies are checked where
they are produced, in test_no_secrets_leak.py and the credential tests.)
"""

from __future__ import annotations

import re

import pytest

from tests.harness.sidecar_process import SESSION_OUTPUT

SECRET_SHAPES = {
    "access token": re.compile(r"ya29\.[\w.-]{8,}"),
    "JWT": re.compile(r"eyJ[\w-]{8,}\.eyJ[\w-]{8,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|MII[A-Za-z0-9+/]{60,}"),
    "test caller key": re.compile(r"s3cret-key|caller-secret|plain-caller-key"),
}


def test_no_secret_in_any_sidecar_output_of_the_session() -> None:
    if not SESSION_OUTPUT:
        pytest.skip("run with the other integration tests: no sidecar output was collected")
    hits = [
        f"{kind} in {source}: …{match.group(0)[:12]}…"
        for source, text in SESSION_OUTPUT
        for kind, shape in SECRET_SHAPES.items()
        for match in [shape.search(text)]
        if match
    ]
    assert not hits, "\n".join(hits)
    assert sum(len(text) for _, text in SESSION_OUTPUT) > 10_000  # the audit really saw the run's output
