"""Path → upstream target, the host table, and SSRF refusal (pure)."""

from __future__ import annotations

import pytest

from vertex_sidecar.config import Defaults, Upstreams
from vertex_sidecar.routing import RoutingError, resolve

UP = Upstreams()
DEFAULTS = Defaults(project="dflt-proj", location="europe-west4", api_version="v1")
GEN = "publishers/google/models/gemini-2.5-flash:generateContent"


def url_of(path: str, service: str = "aiplatform", defaults: Defaults = DEFAULTS) -> str:
    return resolve(path, service=service, defaults=defaults, upstreams=UP).url  # type: ignore[arg-type]


@pytest.mark.parametrize(("location", "host"), [
    ("us-central1", "us-central1-aiplatform.googleapis.com"),
    ("europe-west4", "europe-west4-aiplatform.googleapis.com"),
    ("asia-northeast1", "asia-northeast1-aiplatform.googleapis.com"),
    ("northamerica-northeast2", "northamerica-northeast2-aiplatform.googleapis.com"),
    ("global", "aiplatform.googleapis.com"),
    ("us", "aiplatform.us.rep.googleapis.com"),
    ("eu", "aiplatform.eu.rep.googleapis.com"),
])
def test_host_table(location: str, host: str) -> None:
    url = url_of(f"v1/projects/p1/locations/{location}/{GEN}")
    assert url == f"https://{host}/v1/projects/p1/locations/{location}/{GEN}"


@pytest.mark.parametrize(("location", "host"), [
    ("global", "discoveryengine.googleapis.com"),
    ("us", "us-discoveryengine.googleapis.com"),
    ("eu", "eu-discoveryengine.googleapis.com"),
])
def test_discovery_hosts(location: str, host: str) -> None:
    path = f"v1/projects/p1/locations/{location}/collections/default_collection/engines/e/servingConfigs/default_search:search"
    assert url_of(path, "discovery") == f"https://{host}/{path}"


@pytest.mark.parametrize("location", [
    "evil.com", "us-central1.evil.com", "us-central1:443", "user@us-central1", "US-CENTRAL1",
    "us-central1%2Fevil", "%2575s-central1", "localhost", "127.0.0.1", "us-central", "-central1",
    "us_central1", "us-central1#", "us-central1?x", "a" * 30 + "-b" * 10 + "1", "", "global.",
])
def test_location_that_is_not_a_token_is_refused(location: str) -> None:
    with pytest.raises(RoutingError) as info:
        url_of(f"v1/projects/p1/locations/{location}/{GEN}")
    assert info.value.code == 400


@pytest.mark.parametrize("path", [
    f"v1/projects/p1/locations/us-central1/../../x/{GEN}",
    f"v1/projects/p1/locations/us-central1/./{GEN}",
    f"v1//projects/p1/locations/us-central1/{GEN}",
    "v1/projects/p1\\evil/locations/us-central1/x",
])
def test_dot_segments_and_empty_segments_are_refused(path: str) -> None:
    with pytest.raises(RoutingError):
        url_of(path)


ESCAPED_CLIMBS = ["%2e%2e", "%2E%2E", ".%2e", "%2e.", "%252e%252e", "%252E.", "%25252e%25252e", "%2e"]


@pytest.mark.parametrize("climb", ESCAPED_CLIMBS)
def test_percent_encoded_dot_segments_are_refused(climb: str) -> None:
    # The allowlist bypass of issue 15: matched as written this is p1/gemini-ok, normalised it is p2/gemini-bad.
    path = ("v1/projects/p1/locations/us-central1/publishers/google/models/gemini-ok/" + f"{climb}/" * 6
            + "projects/p2/locations/us-central1/publishers/google/models/gemini-bad:generateContent")
    with pytest.raises(RoutingError) as info:
        url_of(path)
    assert info.value.code == 400 and "dot or empty segment" in info.value.message


@pytest.mark.parametrize("segment", ["a%2Fb", "a%2fb", "a%5Cb", "a%255Cb", "%252F", "%", "a%zz", "%2", ""])
def test_segments_hiding_slashes_or_with_bad_escapes_are_refused(segment: str) -> None:
    with pytest.raises(RoutingError):
        url_of(f"v1/projects/p1/locations/us-central1/operations/{segment}")


def test_segments_encoded_more_than_a_few_times_are_refused() -> None:
    with pytest.raises(RoutingError, match="more than"):
        url_of("v1/projects/p1/locations/us-central1/operations/%2525252525252e")


@pytest.mark.parametrize(("path", "model", "forwarded"), [
    # Escapes of unreserved characters are decoded: matched, priced and forwarded as the real name.
    (f"v1/projects/p1/locations/us-central1/publishers/google/models/gemini-2.5-pr%6F:generateContent",
     "gemini-2.5-pro", "/v1/projects/p1/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent"),
    ("v1/%70rojects/p1/locations/%75s-central1/publishers/google/models/gemini-2.5-flash:countTokens",
     "gemini-2.5-flash",
     "/v1/projects/p1/locations/us-central1/publishers/google/models/gemini-2.5-flash:countTokens"),
    ("v1/projects/p1/locations/us-central1/operations/op%7e1%2a", None,
     "/v1/projects/p1/locations/us-central1/operations/op~1%2A"),
])
def test_paths_are_forwarded_in_canonical_form(path: str, model: str | None, forwarded: str) -> None:
    target = resolve(path, service="aiplatform", defaults=DEFAULTS, upstreams=UP)
    assert (target.model, target.path) == (model, forwarded)
    assert target.origin.host == "us-central1-aiplatform.googleapis.com"


@pytest.mark.parametrize("path", [
    "v1/projects/p1/locations/us-central1/publishers/google/models/gemini%2D2.5%2Bpro:generateContent",
    "v1/projects/p1/locations/us-central1/publishers/google/models/gemini-2.5-pro%3AgenerateContent",
    "v1/projects/p1/locations/us-central1/publishers/goo%25gle/models/gemini-2.5-pro:generateContent",
    "v1/projects/p1/locations/us-central1/endpoints/4%2B2:predict",
    "v1/projects/p%31%3Ax/locations/us-central1/publishers/google/models/m:generateContent",
])
def test_names_the_policy_matches_keep_no_escape(path: str) -> None:
    with pytest.raises(RoutingError):
        url_of(path)


def test_discovery_paths_get_the_same_checks() -> None:
    with pytest.raises(RoutingError, match="dot or empty"):
        url_of("v1/projects/p1/locations/global/collections/default_collection/engines/e/%2e%2e/%2e%2e/"
               "engines/other/servingConfigs/default_search:search", "discovery")


def test_upstream_override_with_prefix_and_port() -> None:
    up = Upstreams(aiplatform="http://127.0.0.1:8080/_upstream/{location}-aiplatform.googleapis.com")
    target = resolve(f"v1beta1/projects/p/locations/us-east4/{GEN}", service="aiplatform", defaults=DEFAULTS,
                     upstreams=up)
    assert target.origin.host == "127.0.0.1" and target.origin.port == 8080
    assert target.url == f"http://127.0.0.1:8080/_upstream/us-east4-aiplatform.googleapis.com/v1beta1/projects/p/locations/us-east4/{GEN}"


@pytest.mark.parametrize(("path", "expected"), [
    (GEN, f"v1/projects/dflt-proj/locations/europe-west4/{GEN}"),
    (f"v1beta1/{GEN}", f"v1beta1/projects/dflt-proj/locations/europe-west4/{GEN}"),
    ("models/gemini-2.5-flash:countTokens",
     "v1/projects/dflt-proj/locations/europe-west4/publishers/google/models/gemini-2.5-flash:countTokens"),
    ("v1/endpoints/123:predict", "v1/projects/dflt-proj/locations/europe-west4/endpoints/123:predict"),
])
def test_collection_paths_are_completed_from_defaults(path: str, expected: str) -> None:
    target = resolve(path, service="aiplatform", defaults=DEFAULTS, upstreams=UP)
    assert target.path == "/" + expected
    assert target.completed_from_defaults
    assert target.origin.host == "europe-west4-aiplatform.googleapis.com"


def test_collection_path_without_defaults_says_which_setting_to_add() -> None:
    with pytest.raises(RoutingError) as info:
        resolve(GEN, service="aiplatform", defaults=Defaults(location="us-central1"), upstreams=UP)
    assert "defaults.project" in info.value.message and "defaults.location" not in info.value.message
    assert info.value.missing_defaults


def test_unknown_api_version() -> None:
    with pytest.raises(RoutingError, match="API version"):
        url_of(f"v2/projects/p/locations/us-central1/{GEN}")


def test_version_missing_uses_default_version() -> None:
    target = resolve(f"projects/p/locations/us-central1/{GEN}", service="aiplatform",
                     defaults=Defaults(api_version="v1beta1"), upstreams=UP)
    assert target.path.startswith("/v1beta1/projects/p/")


@pytest.mark.parametrize(("rest", "publisher", "model", "method"), [
    (GEN, "google", "gemini-2.5-flash", "generateContent"),
    ("publishers/anthropic/models/claude-sonnet-4@20250514:streamRawPredict", "anthropic",
     "claude-sonnet-4@20250514", "streamRawPredict"),
    ("endpoints/4567:predict", None, "endpoints/4567", "predict"),
    ("endpoints/openapi/chat/completions", None, None, "chat/completions"),
    ("operations/123", None, None, None),
    ("cachedContents", None, None, None),
])
def test_model_and_method_are_read_from_every_shape(rest: str, publisher: str | None, model: str | None,
                                                    method: str | None) -> None:
    target = resolve(f"v1/projects/p/locations/us-central1/{rest}", service="aiplatform", defaults=DEFAULTS,
                     upstreams=UP)
    assert (target.publisher, target.model, target.method) == (publisher, model, method)


def test_project_without_location_goes_to_the_global_host() -> None:
    target = resolve("v1/projects/p/locations", service="aiplatform", defaults=DEFAULTS, upstreams=UP)
    assert target.origin.host == "aiplatform.googleapis.com" and target.location is None


def test_bad_project_segment() -> None:
    with pytest.raises(RoutingError, match="project"):
        url_of(f"v1/projects/p%2F..%2Fx/locations/us-central1/{GEN}")


def test_discovery_engine_only_serves_global_and_multi_regions() -> None:
    with pytest.raises(RoutingError, match="global, us and eu"):
        url_of("v1/projects/p1/locations/europe-west4/collections/default_collection/engines/e/servingConfigs/"
               "default_search:search", "discovery")


@pytest.mark.parametrize(("path", "forwarded", "model"), [
    ("v1/publishers/google/models/gemini-2.5-flash", "/v1/publishers/google/models/gemini-2.5-flash",
     "gemini-2.5-flash"),
    ("v1beta1/publishers/google/models/gemini-2.5-flash@001", "/v1beta1/publishers/google/models/gemini-2.5-flash@001",
     "gemini-2.5-flash@001"),
    ("v1beta1/publishers/google/models", "/v1beta1/publishers/google/models", None),
    ("publishers/anthropic/models/claude-sonnet-4", "/v1/publishers/anthropic/models/claude-sonnet-4",
     "claude-sonnet-4"),
])
def test_publisher_model_bindings_are_forwarded_without_a_project(path: str, forwarded: str,
                                                                   model: str | None) -> None:
    target = resolve(path, service="aiplatform", defaults=DEFAULTS, upstreams=UP)
    assert target.path == forwarded and target.model == model
    assert target.origin.host == "europe-west4-aiplatform.googleapis.com"  # from the default location
    assert (target.project, target.location) == ("dflt-proj", "europe-west4")  # what the routes match


def test_publisher_model_binding_needs_a_default_location_for_its_host() -> None:
    with pytest.raises(RoutingError) as info:
        resolve("v1/publishers/google/models/m", service="aiplatform", defaults=Defaults(), upstreams=UP)
    assert info.value.missing_defaults and "defaults.location" in info.value.message
    # Calls with a method are still completed to the project path Google serves them on.
    target = resolve("v1/publishers/google/models/m:generateContent", service="aiplatform", defaults=DEFAULTS,
                     upstreams=UP)
    assert target.path.startswith("/v1/projects/dflt-proj/locations/europe-west4/")
