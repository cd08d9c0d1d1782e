"""The forward proxy's pure decisions: CONNECT targets, intercepted hosts, forbidden addresses."""

from __future__ import annotations

import pytest

from vertex_sidecar.config import ConfigError, ProxySettings, parse_config_text
from vertex_sidecar.proxy_hosts import (AuthorityError, InterceptedHost, classify, forbidden_address,
                                        intercepted_names, looks_like_google_endpoint, parse_authority,
                                        path_location_mismatch)

NAMES = frozenset(intercepted_names())


@pytest.mark.parametrize("text, host, port, is_ip", [
    ("aiplatform.googleapis.com:443", "aiplatform.googleapis.com", 443, False),
    ("US-Central1-AIPlatform.googleapis.com:443", "us-central1-aiplatform.googleapis.com", 443, False),
    ("example.com.:8443", "example.com", 8443, False),
    ("10.1.2.3:443", "10.1.2.3", 443, True),
    ("[::1]:443", "::1", 443, True),
    ("[0:0:0:0:0:ffff:7f00:1]:443", "::ffff:7f00:1", 443, True),
])
def test_parse_authority(text: str, host: str, port: int, is_ip: bool) -> None:
    authority = parse_authority(text)
    assert (authority.host, authority.port, authority.is_ip) == (host, port, is_ip)


@pytest.mark.parametrize("text", ["example.com", "example.com:0", "example.com:70000", ":443", "[::1]443",
                                  "exa mple.com:443", "user@example.com:443", "example.com:443/x", "[zz]:443",
                                  "a..b:443", "127.1:443", "-bad.com:443", "example.com:+443"])
def test_parse_authority_refuses(text: str) -> None:
    with pytest.raises(AuthorityError):
        parse_authority(text)


def test_classify_each_google_host_family() -> None:
    assert classify("aiplatform.googleapis.com", NAMES) == InterceptedHost("aiplatform.googleapis.com", "aiplatform",
                                                                          "global")
    assert classify("europe-west4-aiplatform.googleapis.com", NAMES) == InterceptedHost(
        "europe-west4-aiplatform.googleapis.com", "aiplatform", "europe-west4")
    assert classify("aiplatform.eu.rep.googleapis.com", NAMES).location == "eu"  # type: ignore[union-attr]
    assert classify("discoveryengine.googleapis.com", NAMES) == InterceptedHost(
        "discoveryengine.googleapis.com", "discovery", "global")
    assert classify("us-discoveryengine.googleapis.com", NAMES).service == "discovery"  # type: ignore[union-attr]
    for other in ("storage.googleapis.com", "googleapis.com", "x.aiplatform.googleapis.com",
                  "mars-north1-aiplatform.googleapis.com", "aiplatform.asia.rep.googleapis.com", "example.com"):
        assert classify(other, NAMES) is None
    assert looks_like_google_endpoint("mars-north1-aiplatform.googleapis.com")
    assert looks_like_google_endpoint("aiplatform.asia.rep.googleapis.com")
    assert not looks_like_google_endpoint("storage.googleapis.com")
    assert "mars-north1-aiplatform.googleapis.com" in intercepted_names(("mars-north1",))


@pytest.mark.parametrize("address", ["127.0.0.1", "127.9.9.9", "::1", "169.254.169.254", "169.254.169.252",
                                     "fe80::1", "0.0.0.0", "::", "0.1.2.3", "224.0.0.1", "ff02::1",
                                     "::ffff:127.0.0.1", "::ffff:169.254.169.254", "64:ff9b::7f00:1",
                                     "2002:7f00:1::1", "240.0.0.1", "255.255.255.255"])
def test_forbidden_addresses(address: str) -> None:
    assert forbidden_address(address) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "10.0.0.5", "192.168.1.1", "2001:4860:4860::8888",
                                     "64:ff9b::808:808"])
def test_allowed_addresses(address: str) -> None:
    assert forbidden_address(address) is None


def test_location_mismatch() -> None:
    regional = InterceptedHost("us-central1-aiplatform.googleapis.com", "aiplatform", "us-central1")
    world = InterceptedHost("aiplatform.googleapis.com", "aiplatform", "global")
    assert path_location_mismatch(regional, "us-central1") is None
    assert "europe-west4" in (path_location_mismatch(regional, "europe-west4") or "")
    assert path_location_mismatch(regional, None) is not None
    assert path_location_mismatch(world, None) is None and path_location_mismatch(world, "global") is None
    assert path_location_mismatch(world, "us-central1") is not None


def test_proxy_config_section() -> None:
    config = parse_config_text("proxy_listen: 127.0.0.1:4080\nproxy:\n  other_hosts: deny\n  tunnel_ports: [443, 8443]\n"
                               "  resolve: {'Api.Example.com:443': '10.0.0.9:443'}\n  extra_locations: [mars-north1]\n")
    assert config.proxy_listen is not None and config.proxy_listen.port == 4080
    assert config.proxy == ProxySettings(other_hosts="deny", tunnel_ports=(443, 8443),
                                         resolve={"api.example.com:443": "10.0.0.9:443"},
                                         extra_locations=("mars-north1",))
    assert parse_config_text("{}").proxy == ProxySettings() and parse_config_text("{}").proxy_listen is None
    for bad, where in (("proxy: {other_hosts: maybe}", "proxy.other_hosts"),
                       ("proxy: {tunnel_ports: [0]}", "proxy.tunnel_ports"),
                       ("proxy: {tunnel_ports: 443}", "proxy.tunnel_ports"),
                       ("proxy: {resolve: {example.com: '1.2.3.4:443'}}", "proxy.resolve"),
                       ("proxy: {resolve: {'example.com:443': 'other.com:443'}}", "proxy.resolve"),
                       ("proxy: {extra_locations: [Mars]}", "proxy.extra_locations"),
                       ("proxy: {bogus: 1}", "proxy")):
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            parse_config_text(bad)
