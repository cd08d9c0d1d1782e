"""`render`: route + credential → the sidecar config, validated by the sidecar's schema."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import yaml

from tests.operator import objects as o
from vertex_operator import render
from vertex_operator.crd import parse_credential, parse_route
from vertex_sidecar.config import parse_config, parse_config_text


def rendered(route_extra: dict[str, Any] | None = None, credential_spec: dict[str, Any] | None = None,
             name: str = "vertex") -> render.Rendered:
    route = parse_route(o.route(**(route_extra or {})))
    return render.render(route, parse_credential(o.credential(name, **(credential_spec or {}))))


def test_minimal_route() -> None:
    result = rendered()
    assert result.config == {
        "listen": "127.0.0.1:4000",
        "admin_listen": "127.0.0.1:9464",
        "defaults": {"project": "my-project", "location": "europe-west4", "api_version": "v1"},
        "credentials": {"vertex": {"type": "adc"}},
        "routes": [{
            "name": "gemini",
            "match": {"projects": ["my-project"], "locations": ["*"], "models": ["gemini-*"]},
            "credential": "vertex",
        }],
    }
    # What is written is what was validated, and the sidecar reads it back the same.
    assert yaml.safe_load(result.text) == result.config
    config = parse_config_text(result.text)
    assert config.routes[0].match.projects == ("my-project",)
    assert config.defaults.location == "europe-west4"
    assert result.text.startswith("# Rendered by vertex-operator from VertexRoute team-a/gemini")


def test_rules_inherit_route_level_values() -> None:
    result = rendered({
        "match": {"projects": ["my-project", "shared-*"], "locations": ["europe-*"], "models": ["gemini-*"]},
        "aliases": {"fast": "gemini-2.5-flash"},
        "fallbackLocations": ["europe-west1"],
        "quotaProject": "billing-project",
        "limits": {"requestsPerMinute": 600, "maxBodyBytes": 1048576},
        "timeouts": {"firstByteSeconds": 60},
        "rules": [
            {"name": "claude", "match": {"models": ["claude-*"]}, "location": "us-east5",
             "limits": {"tokensPerMinute": 100000}},
            {"name": "rest", "aliases": {}, "timeouts": {"totalSeconds": 600}},
        ],
    })
    claude, rest = result.config["routes"]
    assert claude == {
        "name": "claude",
        "match": {"projects": ["my-project", "shared-*"], "locations": ["europe-*"], "models": ["claude-*"]},
        "credential": "vertex",
        "defaults": {"location": "us-east5"},
        "aliases": {"fast": "gemini-2.5-flash"},
        "fallback_locations": ["europe-west1"],
        "quota_project": "billing-project",
        "limits": {"requests_per_minute": 600, "tokens_per_minute": 100000, "max_body_bytes": 1048576},
        "timeouts": {"first_byte": 60.0},
    }
    assert rest["match"]["models"] == ["gemini-*"]  # inherited from the route
    assert "aliases" not in rest  # an explicit empty map overrides the route's aliases
    assert rest["timeouts"] == {"first_byte": 60.0, "total": 600.0}
    parsed = parse_config(result.config)
    assert [r.name for r in parsed.routes] == ["claude", "rest"]
    assert parsed.routes[0].limits.tokens_per_minute == 100000


@pytest.mark.parametrize(("spec", "entry"), [
    ({"workloadIdentity": {"projectId": "my-project", "gcpServiceAccount": "vertex-app@my-project.iam.gserviceaccount.com"}},
     {"type": "adc"}),
    ({"federation": {"audience": "aud", "credentialConfig": {"configMapName": "wif"}}},
     {"type": "external_account_file", "path": "/var/run/secrets/vertex/federation/credential-configuration.json"}),
    ({"secretRef": {"name": "key"}},
     {"type": "service_account_file", "path": "/var/run/secrets/vertex/key/key.json"}),
])
def test_credential_modes(spec: dict[str, Any], entry: dict[str, Any]) -> None:
    result = rendered(credential_spec=spec)
    assert result.config["credentials"] == {"vertex": entry}
    assert parse_config(result.config).credentials["vertex"].type == entry["type"]


def test_long_credential_names_fall_back_to_default() -> None:
    result = rendered(name="a" * 70)
    assert list(result.config["credentials"]) == ["default"]
    assert result.config["routes"][0]["credential"] == "default"


def test_upstream_overrides_and_ports() -> None:
    result = rendered({"upstreams": {"aiplatform": "https://{location}-aiplatform.p.googleapis.com"},
                       "sidecar": {"port": 5000, "adminPort": 9500}})
    assert result.config["upstreams"] == {"aiplatform": "https://{location}-aiplatform.p.googleapis.com"}
    assert result.config["listen"] == "127.0.0.1:5000"
    assert parse_config(result.config).admin_listen.port == 9500


def test_hash_is_stable_and_follows_content() -> None:
    assert rendered().hash == rendered().hash
    assert rendered().hash != rendered({"limits": {"requestsPerMinute": 1}}).hash


def test_tls_settings() -> None:
    route = parse_route(o.route(sidecar={"tls": {"enabled": True, "port": 4443}}))
    assert render.tls_settings(route) == {"tls_listen": "127.0.0.1:4443", "tls": {
        "ca_bundle_path": "/var/run/vertex-sidecar/tls/ca.crt", "ca_cert_path": "/var/run/vertex-sidecar/tls/pod-ca.crt"}}
    assert render.tls_settings(parse_route(o.route())) == {}
    trusted = parse_route(o.route(sidecar={"tls": {"enabled": True, "trustBundle": {"configMapName": "corp-roots"}}}))
    assert render.tls_settings(trusted)["tls"]["extra_roots_file"] == "/etc/vertex-sidecar/trust/roots.pem"
    assert parse_config(render.render(trusted, parse_credential(o.credential())).config).tls.extra_roots_file


def test_tls_route_renders_listener_and_ca_bundle() -> None:
    route = parse_route(o.route(sidecar={"tls": {"enabled": True}}))
    result = render.render(route, parse_credential(o.credential()))
    config = parse_config(result.config)
    assert config.tls_listen is not None and config.tls_listen.port == 4443
    assert config.tls.ca_bundle_path == "/var/run/vertex-sidecar/tls/ca.crt"
    # The CA's private key stays in the sidecar's own /tmp, not in the volume apps mount.
    assert config.tls.state_dir is None


def test_invalid_values_are_caught_by_the_sidecar_schema() -> None:
    # The CRD schema and `crd` parsing refuse this; a route built around them still cannot
    # produce a config the sidecar would refuse.
    route = parse_route(o.route())
    bad = dataclasses.replace(route, base=dataclasses.replace(route.base, fallback_locations=("moon",)))
    with pytest.raises(render.RenderError, match="fallback_locations"):
        render.render(bad, parse_credential(o.credential()))


def test_interception_renders_a_config_the_sidecar_accepts() -> None:
    result = rendered({"sidecar": {"interception": True}})
    config = parse_config_text(result.text)
    assert config.proxy_listen is not None and str(config.proxy_listen) == "127.0.0.1:4080"
    assert config.tls_listen is None and config.tls.ca_bundle_path == render.TLS_CA_PATH
    assert config.proxy.other_hosts == "tunnel"
    denied = parse_config_text(rendered({"sidecar": {"interception": True, "proxyOtherHosts": "deny"}}).text)
    assert denied.proxy.other_hosts == "deny"
