"""Request path → upstream target. Pure: no I/O, no configuration loading.

The location segment is the only part of a request that chooses a host, so it is
validated against a strict token grammar before any URL is built (no SSRF): anything with
dots, slashes, percent-escapes, ports, userinfo or uppercase is refused. Every segment is
checked and put in canonical form first (`segments`): dot segments hidden behind
percent-escapes are refused, and the policy sees, and Google is sent, the decoded names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal
from urllib.parse import urlsplit

from .config import API_VERSIONS, Defaults, Upstreams
from .segments import SegmentError, canonical_segment, check_segment

Service = Literal["aiplatform", "discovery"]

LOCATION_RE = re.compile(r"^(?:global|us|eu|[a-z]+(?:-[a-z]+)+[0-9]+)$")
MULTI_REGIONS = ("us", "eu")
MAX_LOCATION_LENGTH = 40
# Project ids, numbers and legacy domain-scoped ids ("example.com:proj").
PROJECT_SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:_-]{0,99}$")


class RoutingError(Exception):
    """The path cannot be routed; `message` tells the caller how to fix it."""

    def __init__(self, message: str, code: int = 400, *, missing_defaults: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.missing_defaults = missing_defaults  # depends on which route's defaults were tried


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a request is sent: scheme, host, port and an optional path prefix."""

    scheme: str
    host: str
    port: int
    prefix: str = ""

    @property
    def host_header(self) -> str:
        return _host_header(self.scheme, self.host, self.port)


@dataclass(frozen=True, slots=True)
class Target:
    service: Service
    origin: Origin
    path: str  # upstream path, starting with "/", segments in canonical form (segments.py)
    api_version: str
    project: str | None
    location: str | None
    publisher: str | None
    model: str | None  # "gemini-2.5-flash", or "endpoints/<id>" for deployed endpoints
    method: str | None  # "generateContent", "chat/completions", ...
    completed_from_defaults: bool = False

    @property
    def url(self) -> str:
        return f"{self.origin.scheme}://{self.origin.host_header}{self.origin.prefix}{self.path}"


@lru_cache(maxsize=256)
def _host_header(scheme: str, host: str, port: int) -> str:
    default_port = 443 if scheme == "https" else 80
    return host if port == default_port else f"{host}:{port}"


def is_valid_location(location: str) -> bool:
    return len(location) <= MAX_LOCATION_LENGTH and LOCATION_RE.match(location) is not None


def upstream_template(service: Service, location: str, upstreams: Upstreams) -> str:
    """The URL template for a location, per the host table of design §3."""
    if service == "discovery":
        return upstreams.discovery if location == "global" else upstreams.discovery_multiregion
    if location == "global":
        return upstreams.aiplatform_global
    if location in MULTI_REGIONS:
        return upstreams.aiplatform_multiregion
    return upstreams.aiplatform


@lru_cache(maxsize=512)
def origin_for(template: str, location: str) -> Origin:
    """Build the origin for a validated location; cached (a handful of locations in practice)."""
    parts = urlsplit(template.replace("{location}", location))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RoutingError(f"upstream URL template {template!r} is not an http(s) URL", code=500)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Origin(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def resolve(path: str, *, service: Service, defaults: Defaults, upstreams: Upstreams) -> Target:
    """Map the part of the request path after ``/vertex_ai/`` (or ``/vertex_ai/discovery/``).

    Accepted shapes (the version may be omitted; it is then taken from defaults):
      ``{v}/projects/{p}/locations/{l}/...``   the full resource path
      ``{v}/projects/{p}/...``                 project-level calls without a location → global
      ``{v}/publishers/...``, ``models/...``   SDK "collection" paths, completed from defaults
    """
    segments = canonical_segments(path)
    api_version: str | None = None
    if segments[0] in API_VERSIONS:
        api_version = segments.pop(0)
    elif re.fullmatch(r"v[0-9]+(?:(?:alpha|beta)[0-9]*)?", segments[0]) and len(segments) > 1:
        raise RoutingError(f"unknown API version {segments[0]!r}; use one of {', '.join(API_VERSIONS)}")
    if not segments:
        raise RoutingError("the path names no resource after the API version")
    completed = False
    if service == "aiplatform" and is_publisher_model_binding(segments):
        return _publisher_model_target(segments, api_version or defaults.api_version or "v1", defaults, upstreams)
    if segments[0] == "projects":
        project, location, rest = _split_project_path(segments)
        if service == "discovery" and location is not None and location not in ("global",) + MULTI_REGIONS:
            raise RoutingError(f"Discovery Engine serves the locations global, us and eu; {location!r} is not one")
    else:
        project, location, rest = _complete_collection_path(segments, defaults, service)
        completed = True
    api_version = api_version or defaults.api_version or "v1"
    host_location = location or "global"
    origin = origin_for(upstream_template(service, host_location, upstreams), host_location)
    resource = ["projects", project] + (["locations", location] if location else []) + rest
    publisher, model, method = describe_resource(rest)
    for kind, name in (("publisher", publisher), ("model", model)):
        if name is not None and "%" in name:  # no real name has a reserved or non-ASCII character
            raise RoutingError(f"the {kind} name {_shorten(name)!r} holds a percent-escape; send the plain name")
    return Target(
        service=service,
        origin=origin,
        path=f"/{api_version}/" + "/".join(resource),
        api_version=api_version,
        project=project,
        location=location,
        publisher=publisher,
        model=model,
        method=method,
        completed_from_defaults=completed,
    )


def is_publisher_model_binding(segments: list[str]) -> bool:
    """``publishers/P/models/M`` (GetPublisherModel) or ``publishers/P/models`` (ListPublisherModels):
    Google serves these without a project (the Vertex SDK's `from_pretrained`, google-genai's
    `models.get`), so they are forwarded as they are, not completed to a project path."""
    return (len(segments) in (3, 4) and segments[0] == "publishers" and segments[2] == "models"
            and (len(segments) == 3 or ":" not in segments[3]))


def _publisher_model_target(segments: list[str], api_version: str, defaults: Defaults,
                            upstreams: Upstreams) -> Target:
    """The host comes from the default location; project and location are recorded (and matched
    by the routes) as the defaults', though the path names neither."""
    if not defaults.location:
        raise RoutingError(
            f"the path {'/'.join(segments)!r} names no location and the sidecar has no default to pick the "
            "host: set defaults.location in the sidecar config", missing_defaults=True)
    location = defaults.location
    origin = origin_for(upstream_template("aiplatform", location, upstreams), location)
    publisher, model, method = describe_resource(segments)
    if model is None:  # the listing: "publishers/P/models"
        publisher = segments[1]
    for kind, name in (("publisher", publisher), ("model", model)):
        if name is not None and "%" in name:
            raise RoutingError(f"the {kind} name {_shorten(name)!r} holds a percent-escape; send the plain name")
    return Target(service="aiplatform", origin=origin, path=f"/{api_version}/" + "/".join(segments),
                  api_version=api_version, project=defaults.project, location=location, publisher=publisher,
                  model=model, method=method, completed_from_defaults=True)


def canonical_segments(path: str) -> list[str]:
    """The path's segments in canonical form (`segments`); dot, empty and slash-hiding segments,
    however encoded, are refused."""
    segments = path.split("/")
    try:
        if "%" not in path and "\\" not in path:  # the common case: no decoding to do
            for segment in segments:
                check_segment(segment)
            return segments
        return [canonical_segment(segment) for segment in segments]
    except SegmentError as exc:
        raise RoutingError(
            f"the path {_shorten(path, 160)!r} is refused: {exc}; send a Vertex AI resource path such as "
            "v1/projects/PROJECT/locations/LOCATION/publishers/google/models/MODEL:generateContent"
        ) from None


def _split_project_path(segments: list[str]) -> tuple[str, str | None, list[str]]:
    if len(segments) < 2:
        raise RoutingError("the path ends after 'projects/'; name the project: projects/PROJECT/...")
    project = segments[1]
    if not PROJECT_SEGMENT_RE.match(project):
        raise RoutingError(f"{project!r} is not a valid Google Cloud project id or number")
    rest = segments[2:]
    if not rest or rest[0] != "locations":
        return project, None, rest
    if len(rest) < 2:
        return project, None, rest  # ".../locations": list locations, served globally
    location = rest[1]
    if not is_valid_location(location):
        raise RoutingError(
            f"{_shorten(location)!r} is not a valid location; use a Google Cloud location such as "
            "us-central1, europe-west4, global, or the multi-regions us and eu"
        )
    return project, location, rest[2:]


def _complete_collection_path(segments: list[str], defaults: Defaults,
                              service: Service) -> tuple[str, str, list[str]]:
    missing = [name for name, value in (("project", defaults.project), ("location", defaults.location))
               if not value]
    if missing:
        settings = " and ".join(f"defaults.{m}" for m in missing)
        raise RoutingError(
            f"the path {'/'.join(segments)!r} has no projects/PROJECT/locations/LOCATION prefix and the "
            f"sidecar has no default to complete it: set {settings} in the sidecar config, or send the "
            "full resource path (with google-genai: pass project= and location= to genai.Client)",
            missing_defaults=True,
        )
    if service == "aiplatform" and segments[0] not in ("publishers", "models", "endpoints", "cachedContents",
                                                        "tuningJobs", "batchPredictionJobs", "operations",
                                                        "ragCorpora", "reasoningEngines", "datasets"):
        raise RoutingError(f"{segments[0]!r} is not a Vertex AI collection; send a resource path such as "
                           "publishers/google/models/MODEL:generateContent")
    assert defaults.project is not None and defaults.location is not None
    if segments[0] == "models":
        # google-genai's collection form for Gemini models omits the publisher.
        segments = ["publishers", "google"] + segments
    return defaults.project, defaults.location, segments


def describe_resource(rest: list[str]) -> tuple[str | None, str | None, str | None]:
    """(publisher, model, method) from the resource part after the location.

    ``publishers/google/models/gemini-2.5-flash:generateContent`` →
    ("google", "gemini-2.5-flash", "generateContent"); ``endpoints/123:predict`` →
    (None, "endpoints/123", "predict"); ``endpoints/openapi/chat/completions`` →
    (None, None, "chat/completions") — the OpenAI-compatible endpoint names its model in the body.
    """
    if not rest:
        return None, None, None
    last_name, _, last_method = rest[-1].partition(":")
    method = last_method or None
    if len(rest) >= 4 and rest[0] == "publishers" and rest[2] == "models":
        return rest[1], rest[3].partition(":")[0], method
    if len(rest) >= 2 and rest[0] == "models":
        return None, rest[1].partition(":")[0], method
    if len(rest) >= 2 and rest[0] == "endpoints":
        endpoint = rest[1].partition(":")[0]
        if endpoint == "openapi":
            return None, None, "/".join(rest[2:]) or method
        return None, f"endpoints/{endpoint}", method
    return None, None, method if last_name else None


def with_model(target: Target, model: str) -> Target:
    """The same call for another model (alias resolution): only the model segment changes."""
    if target.model is None or target.model.startswith("endpoints/"):
        return replace(target, model=model)
    old = f"/models/{target.model}"
    index = target.path.find(old)
    if index < 0:
        return replace(target, model=model)
    end = index + len(old)
    if end < len(target.path) and target.path[end] not in ":/":
        return replace(target, model=model)
    return replace(target, model=model, path=target.path[:index] + f"/models/{model}" + target.path[end:])


def with_location(target: Target, location: str, upstreams: Upstreams) -> Target:
    """The same call in another location (fallback): path segment and host both change."""
    assert target.location is not None and is_valid_location(location)
    old = f"/locations/{target.location}/"
    path = target.path.replace(old, f"/locations/{location}/", 1) if old in target.path else target.path
    origin = origin_for(upstream_template(target.service, location, upstreams), location)
    return replace(target, location=location, path=path, origin=origin)


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
