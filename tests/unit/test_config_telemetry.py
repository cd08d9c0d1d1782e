"""Config keys of telemetry: `pricing` overrides and `metrics.header_labels`."""

from __future__ import annotations

import pytest

from vertex_sidecar.config import Config, ConfigError, parse_config, parse_config_text


def test_defaults() -> None:
    config = Config()
    assert config.pricing is None and dict(config.metrics.header_labels) == {}
    assert parse_config({}).metrics.header_labels == {}


def test_pricing_overrides_and_header_labels_load() -> None:
    config = parse_config_text("""
pricing:
  models:
    my-tuned-gemini: {input: 1.0, output: 2.0}
    gemini-2.5-flash: {input: 0.5}
metrics:
  header_labels: {X-Team: team, x-cost-center: cost_center}
""")
    assert config.pricing is not None and "my-tuned-gemini" in config.pricing["models"]
    assert dict(config.metrics.header_labels) == {"x-team": "team", "x-cost-center": "cost_center"}


@pytest.mark.parametrize(("document", "message"), [
    ({"pricing": {"models": {"gemini-x": {"input": -1}}}},
     "pricing.models.gemini-x.input: expected a non-negative number"),
    ({"pricing": {"modles": {}}}, "pricing: unknown field(s) ['modles']"),
    ({"pricing": {"models": {"gemini-x": {"inptu": 1}}}}, "pricing.models.gemini-x: unknown field(s) ['inptu']"),
    ({"metrics": {"header_lables": {}}}, "metrics: unknown key(s) 'header_lables'"),
    ({"metrics": {"header_labels": ["x-team"]}}, "metrics.header_labels: expected a mapping of strings to strings"),
    ({"metrics": {"header_labels": {"x team": "team"}}}, "'x team' is not an HTTP header name"),
    ({"metrics": {"header_labels": {"Authorization": "who"}}}, "carries credentials"),
    ({"metrics": {"header_labels": {"x-goog-api-key": "key"}}}, "carries credentials"),
    ({"metrics": {"header_labels": {"x-vertex-sidecar-key": "key"}}}, "carries credentials"),
    ({"caller_keys": {"file": "/keys", "header": "x-my-key"}, "metrics": {"header_labels": {"x-my-key": "key"}}},
     "'x-my-key' is the caller-key header"),
    ({"metrics": {"header_labels": {"x-team": "Team"}}}, "'Team' is not a usable label name"),
    ({"metrics": {"header_labels": {"x-team": "route"}}}, "'route' is not a usable label name"),
    ({"metrics": {"header_labels": {"x-team": "gen_ai_team"}}}, "'gen_ai_team' is not a usable label name"),
    ({"metrics": {"header_labels": {"x-team": "__team"}}}, "'__team' is not a usable label name"),
    ({"metrics": {"header_labels": {"x-a": "team", "x-b": "team"}}}, "label 'team' is used twice"),
    ({"metrics": {"header_labels": {f"x-{i}": f"l{i}" for i in range(5)}}}, "at most 4 header labels"),
])
def test_invalid_telemetry_config_names_the_field(document: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(document)
    assert message in str(error.value)
