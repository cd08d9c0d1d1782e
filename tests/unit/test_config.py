"""Config loading and validation: every error names the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from vertex_sidecar.config import ConfigError, load_config, parse_config_text

DESIGN_EXAMPLE = """
listen: 127.0.0.1:4000
admin_listen: 0.0.0.0:9464
tls_listen: 127.0.0.1:4443
upstreams:
  aiplatform: https://{location}-aiplatform.googleapis.com
  aiplatform_global: https://aiplatform.googleapis.com
  aiplatform_multiregion: https://aiplatform.{location}.rep.googleapis.com
  discovery: https://discoveryengine.googleapis.com
  discovery_multiregion: https://{location}-discoveryengine.googleapis.com
defaults: {project: my-proj, location: us-central1, api_version: v1}
credentials:
  default: {type: adc}
  team-b: {type: service_account_file, path: /var/run/secrets/vertex/key.json}
routes:
  - name: gemini
    match: {projects: ["my-proj"], locations: ["*"], models: ["gemini-*"]}
    credential: default
    defaults: {location: europe-west4}
    fallback_locations: [us-east4]
    quota_project: my-billing-proj
    limits: {requests_per_minute: 600, tokens_per_minute: 2000000, max_body_bytes: 33554432}
"""


def test_design_example_loads() -> None:
    config = parse_config_text(DESIGN_EXAMPLE)
    assert config.listen.port == 4000 and config.tls_listen is not None
    route = config.routes[0]
    assert route.match.models == ("gemini-*",)
    assert route.defaults.location == "europe-west4"
    assert route.limits.requests_per_minute == 600
    assert config.credentials["team-b"].path == "/var/run/secrets/vertex/key.json"


def test_no_file_means_allow_all_with_adc() -> None:
    config = load_config(None)
    assert config.allow_all and config.credentials["default"].type == "adc"
    assert str(config.listen) == "127.0.0.1:4000" and str(config.admin_listen) == "127.0.0.1:9464"


@pytest.mark.parametrize(("text", "message"), [
    ("routes: [{name: a, limits: {requests_per_minute: ten}}]",
     "routes[0].limits.requests_per_minute: expected a positive integer, got 'ten'"),
    ("routs: []", "unknown key(s) 'routs'"),
    ("listen: localhost", "listen: 'localhost' is not a host:port address"),
    ("listen: 127.0.0.1:99999", "port 99999 is out of range"),
    ("defaults: {location: Evil.com}", "defaults.location: 'Evil.com' is not valid"),
    ("defaults: {api_version: v3}", "defaults.api_version: 'v3' is not one of v1, v1beta1"),
    ("credentials: {x: {type: service_account_file}}", "credentials.x.path: required"),
    ("credentials: {x: {type: magic}}", "credentials.x.type: 'magic' is not one of"),
    ("credentials: {x: {type: impersonate}}", "credentials.x.target_principal: required"),
    ("routes: [{credential: nope}]", "routes[0].credential: no credential named 'nope'"),
    ("routes: [{name: a}, {name: a}]", "duplicate route name(s) a"),
    ("routes: [{fallback_locations: [mars]}]", "routes[0].fallback_locations: 'mars' is not valid"),
    ("upstreams: {aiplatform: 'ftp://x'}", "upstreams.aiplatform: 'ftp://x' must be an http(s) URL"),
    ("routes: {a: 1}", "routes: expected a list"),
    ("- just a list", "<top level>: expected a mapping"),
    ("key: [unclosed", "not valid YAML"),
])
def test_errors_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text(text)
    assert message in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yaml")
