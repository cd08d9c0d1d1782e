"""What the forward proxy does with a CONNECT target. Pure: no I/O.

- `parse_authority`: the ``host:port`` of a CONNECT request, strictly (a DNS name or an IP
  literal, a port), lower-cased.
- `classify`: whether the host is one of Google's Vertex AI / Discovery Engine endpoints the
  sidecar intercepts, and which service and location it serves.
- `intercepted_names`: every such name, for the pod-local CA's name constraints and the
  leaf certificates (exact names, nothing broader: no wildcard, no ``googleapis.com``).
- `forbidden_address`: why an address must never be a tunnel's destination (loopback,
  link-local with the metadata server, unspecified, multicast, ...), so the proxy cannot be
  used to reach the pod's own ports or the node's metadata server (SSRF).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable

from .routing import Service

# Vertex AI regions (https://cloud.google.com/vertex-ai/docs/general/locations); `proxy.extra_locations`
# adds new ones. Each becomes `{location}-aiplatform.googleapis.com` in the CA's name constraints.
VERTEX_LOCATIONS: tuple[str, ...] = (
    "us-central1", "us-east1", "us-east4", "us-east5", "us-south1", "us-west1", "us-west2", "us-west3", "us-west4",
    "northamerica-northeast1", "northamerica-northeast2", "southamerica-east1", "southamerica-west1",
    "europe-central2", "europe-north1", "europe-southwest1", "europe-west1", "europe-west2", "europe-west3",
    "europe-west4", "europe-west6", "europe-west8", "europe-west9", "europe-west10", "europe-west12",
    "me-central1", "me-central2", "me-west1", "africa-south1",
    "asia-east1", "asia-east2", "asia-northeast1", "asia-northeast2", "asia-northeast3", "asia-south1",
    "asia-south2", "asia-southeast1", "asia-southeast2", "australia-southeast1", "australia-southeast2",
)
MULTI_REGIONS = ("us", "eu")
INTERCEPT_PORT = 443

_DNS_NAME_RE = re.compile(r"^(?=.{1,253}$)(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                          r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.?$")


class AuthorityError(ValueError):
    """The CONNECT target is not a host:port."""


@dataclass(frozen=True, slots=True)
class Authority:
    host: str  # a lower-case DNS name without trailing dot, or an IP address in canonical text form
    port: int
    is_ip: bool

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class InterceptedHost:
    """A Google endpoint the sidecar answers itself: which service, and the location its name
    stands for (the path's location must be the same)."""

    name: str
    service: Service
    location: str


def parse_authority(text: str) -> Authority:
    """``host:port`` or ``[v6]:port`` as a CONNECT request line carries it."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise AuthorityError(f"{text[:80]!r} is not [IPv6]:port")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise AuthorityError(f"{host[:60]!r} is not an IPv6 address") from None
        is_ip = True
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise AuthorityError(f"{text[:80]!r} is not host:port (CONNECT needs both)")
        host = host.lower()
        try:
            host = str(ipaddress.IPv4Address(host))
            is_ip = True
        except ValueError:
            if not _DNS_NAME_RE.match(host) or host.replace(".", "").isdigit():
                raise AuthorityError(f"{host[:80]!r} is not a host name") from None
            host = host.rstrip(".")
            is_ip = False
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise AuthorityError(f"{port_text[:10]!r} is not a port")
    return Authority(host, int(port_text), is_ip)


def intercepted_names(extra_locations: Iterable[str] = ()) -> tuple[str, ...]:
    """Every host name the proxy intercepts, in a stable order."""
    locations = list(VERTEX_LOCATIONS) + [loc for loc in extra_locations if loc not in VERTEX_LOCATIONS]
    names = ["aiplatform.googleapis.com"]
    names += [f"{location}-aiplatform.googleapis.com" for location in locations]
    names += [f"aiplatform.{region}.rep.googleapis.com" for region in MULTI_REGIONS]
    names += ["discoveryengine.googleapis.com"]
    names += [f"{region}-discoveryengine.googleapis.com" for region in MULTI_REGIONS]
    return tuple(names)


def classify(host: str, names: frozenset[str]) -> InterceptedHost | None:
    """The intercepted endpoint `host` names, or None when it is not one of `names`."""
    if host not in names:
        return None
    if host == "aiplatform.googleapis.com":
        return InterceptedHost(host, "aiplatform", "global")
    if host == "discoveryengine.googleapis.com":
        return InterceptedHost(host, "discovery", "global")
    if host.endswith("-discoveryengine.googleapis.com"):
        return InterceptedHost(host, "discovery", host[: -len("-discoveryengine.googleapis.com")])
    if host.startswith("aiplatform.") and host.endswith(".rep.googleapis.com"):
        return InterceptedHost(host, "aiplatform", host[len("aiplatform."): -len(".rep.googleapis.com")])
    return InterceptedHost(host, "aiplatform", host[: -len("-aiplatform.googleapis.com")])


def looks_like_google_endpoint(host: str) -> bool:
    """A Vertex AI / Discovery Engine host name outside the intercepted set (a region the CA does
    not cover): tunnelling it would let the app's own credentials past the sidecar."""
    return host.endswith(("-aiplatform.googleapis.com", "-discoveryengine.googleapis.com")) or (
        host.startswith("aiplatform.") and host.endswith(".rep.googleapis.com"))


def forbidden_address(address: str) -> str | None:
    """Why a tunnel must not go to `address` (None: it may)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return forbidden_address(str(mapped))
        if ip in _NAT64:  # 64:ff9b::a.b.c.d reaches a.b.c.d
            return forbidden_address(str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    if ip.is_loopback:
        return "a loopback address (the pod itself)"
    if ip.is_link_local:
        return "a link-local address (the node's metadata server lives there)"
    if ip.is_unspecified:
        return "the unspecified address (the pod itself)"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _IPV4_THIS_NETWORK:
        return "a 'this network' address"
    if ip.is_reserved:
        return "a reserved address"
    return None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def path_location_mismatch(host: InterceptedHost, path_location: str | None) -> str | None:
    """The refusal message when a request's location is not the one its host name stands for."""
    location = path_location or "global"
    if location == host.location:
        return None
    if path_location is None:
        return (f"{host.name} serves location {host.location}, and this path names no location (it would be sent "
                "to the global endpoint); send it to aiplatform.googleapis.com or name the location in the path")
    return (f"the path names location {path_location} but was sent to {host.name}, which serves "
            f"{host.location}; use the host of that location (the SDK does so when its location is {path_location})")
