"""The Live relay's pure parts: endpoints, the setup message, model completion, routes,
per-turn usage and close codes."""

from __future__ import annotations

import json

import pytest

from vertex_sidecar.config import Config, parse_config_text
from vertex_sidecar.live import (
    LiveDecision,
    LiveEndpoint,
    LiveQuery,
    LiveRefused,
    TurnMeter,
    close_reason,
    decide_live,
    handshake_refusal,
    live_endpoint,
    parse_setup,
    relayable_close,
    setup_frame,
    setup_model,
    split_model,
)

LIVE = LiveEndpoint(None, False)
FULL = "projects/p-one/locations/europe-west4/publishers/google/models/gemini-live-2.5-flash"

ROUTES = parse_config_text("""
defaults: {project: top-proj, location: us-central1}
routes:
  - name: live-eu
    match: {projects: ["eu-proj"], locations: ["europe-*"], models: ["gemini-live-*"]}
    defaults: {project: eu-proj, location: europe-west4}
    aliases: {fast: gemini-live-2.5-flash, pinned: "projects/eu-proj/locations/europe-west1/publishers/google/models/gemini-live-2.5-flash"}
    quota_project: billing-proj
  - name: global-only
    match: {projects: ["*"], locations: ["global"], models: ["gemini-2.5-flash-native-*"]}
    defaults: {location: global}
""")


def decide(model: str | None, query: str = "", config: Config = ROUTES, endpoint: LiveEndpoint = LIVE) -> LiveDecision:
    return decide_live(model, query=LiveQuery.parse(query.encode()), endpoint=endpoint, config=config)


@pytest.mark.parametrize("path, expected", [
    ("/vertex_ai/live", LiveEndpoint(None, False)),
    ("/vertex-ai/live", LiveEndpoint(None, False)),
    ("/vertex_ai/ws/google.cloud.aiplatform.v1.LlmBidiService/BidiGenerateContent", LiveEndpoint("v1", True)),
    ("/vertex_ai/ws/google.cloud.aiplatform.v1beta1.LlmBidiService/BidiGenerateContent",
     LiveEndpoint("v1beta1", True)),
    # google-genai with a base URL ending in "/" sends a doubled slash.
    ("/vertex_ai//ws/google.cloud.aiplatform.v1beta1.LlmBidiService/BidiGenerateContent",
     LiveEndpoint("v1beta1", True)),
    ("/vertex_ai/ws/google.cloud.aiplatform.v2.LlmBidiService/BidiGenerateContent", None),
    ("/vertex_ai/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent", None),
    ("/vertex_ai/v1/projects/p/locations/l/publishers/google/models/m:generateContent", None),
    ("/live", None),
])
def test_live_endpoint(path: str, expected: LiveEndpoint | None) -> None:
    assert live_endpoint(path) == expected


def test_query_first_value_wins_and_blank_is_absent() -> None:
    query = LiveQuery.parse(b"vertex_project=a-proj&vertex_project=b-proj&vertex_location=&model=m")
    assert (query.project, query.location, query.model) == ("a-proj", None, "m")


@pytest.mark.parametrize("frame", ['{"setup": {"model": "m"}}', b'{"setup": {"model": "m"}}'])
def test_setup_text_or_binary(frame: str | bytes) -> None:
    assert setup_model(parse_setup(frame)) == "m"


@pytest.mark.parametrize("frame, words", [
    ("not json", "must be JSON"),
    ('{"clientContent": {}}', "clientContent"),
    ("[1, 2]", "list"),
    (b"\xff\xfe", "must be JSON"),
])
def test_first_message_must_be_setup(frame: str | bytes, words: str) -> None:
    with pytest.raises(LiveRefused) as info:
        parse_setup(frame)
    assert info.value.code == 1007 and words in info.value.reason


def test_setup_model_must_be_a_string() -> None:
    assert setup_model(parse_setup('{"setup": {}}')) is None
    with pytest.raises(LiveRefused):
        setup_model(parse_setup('{"setup": {"model": 7}}'))


@pytest.mark.parametrize("text, expected", [
    ("gemini-live-2.5-flash", (None, None, "google", "gemini-live-2.5-flash")),
    ("models/gemini-live-2.5-flash", (None, None, "google", "gemini-live-2.5-flash")),
    ("publishers/google/models/gemini-live-2.5-flash", (None, None, "google", "gemini-live-2.5-flash")),
    (FULL, ("p-one", "europe-west4", "google", "gemini-live-2.5-flash")),
])
def test_split_model(text: str, expected: tuple) -> None:
    name = split_model(text)
    assert (name.project, name.location, name.publisher, name.model) == expected


@pytest.mark.parametrize("text", [
    "projects/p/locations/l/endpoints/123", "a/b/c", "gemini live", "../../etc", "publishers/Goog/models/m", "",
])
def test_split_model_refuses_other_shapes(text: str) -> None:
    with pytest.raises(LiveRefused) as info:
        split_model(text)
    assert info.value.code == 1007


def test_bare_model_completed_from_route_defaults_and_first_matching_route_wins() -> None:
    decision = decide("gemini-live-2.5-flash")
    assert decision.route.name == "live-eu"
    assert decision.resource == "projects/eu-proj/locations/europe-west4/publishers/google/models/gemini-live-2.5-flash"
    assert decision.url == ("wss://europe-west4-aiplatform.googleapis.com/ws/google.cloud.aiplatform.v1."
                            "LlmBidiService/BidiGenerateContent")


def test_query_overrides_route_defaults() -> None:
    decision = decide("gemini-live-2.5-flash", "vertex_location=europe-west1")
    assert (decision.project, decision.location) == ("eu-proj", "europe-west1")
    assert decision.host == "europe-west1-aiplatform.googleapis.com"


def test_query_model_when_setup_has_none_and_global_only_models_use_the_global_host() -> None:
    decision = decide(None, "model=gemini-2.5-flash-native-audio&vertex_project=any-proj", endpoint=LiveEndpoint(
        "v1beta1", True))
    assert decision.route.name == "global-only"
    assert decision.resource == ("projects/any-proj/locations/global/publishers/google/models/"
                                 "gemini-2.5-flash-native-audio")
    assert decision.url == ("wss://aiplatform.googleapis.com/ws/google.cloud.aiplatform.v1beta1."
                            "LlmBidiService/BidiGenerateContent")


def test_aliases_resolve_per_route() -> None:
    assert decide("fast").model == "gemini-live-2.5-flash"
    pinned = decide("pinned")
    assert (pinned.project, pinned.location) == ("eu-proj", "europe-west1")


def test_full_model_names_keep_their_location() -> None:
    config = parse_config_text("defaults: {project: top-proj, location: us-central1}")
    decision = decide(FULL, "vertex_location=us-east4", config=config)
    assert decision.route.name == "default"
    assert decision.host == "europe-west4-aiplatform.googleapis.com"


def test_multi_region_host() -> None:
    config = parse_config_text("{}")
    decision = decide("projects/p-one/locations/eu/publishers/google/models/gemini-live-2.5-flash", config=config)
    assert decision.host == "aiplatform.eu.rep.googleapis.com"


def test_model_outside_the_allowlist_is_refused_with_a_reason() -> None:
    with pytest.raises(LiveRefused) as info:
        decide("gemini-1.5-pro")
    refused = info.value
    assert refused.code == 1008 and refused.status == 403
    assert "gemini-1.5-pro" in refused.reason and "not allowed" in refused.reason
    assert len(refused.reason.encode()) <= 123
    assert "live-eu" in refused.detail  # the log gets the whole story


def test_project_outside_the_allowlist_is_refused() -> None:
    with pytest.raises(LiveRefused) as info:
        decide("gemini-live-2.5-flash", "vertex_project=other-proj")
    assert info.value.code == 1008


@pytest.mark.parametrize("query", ["vertex_location=evil.example.com", "vertex_location=us-central1.x",
                                   "vertex_project=a/b", "vertex_location=US-CENTRAL1"])
def test_hostile_locations_and_projects_never_build_a_url(query: str) -> None:
    config = parse_config_text("defaults: {project: top-proj, location: us-central1}")
    with pytest.raises(LiveRefused) as info:
        decide("gemini-live-2.5-flash", query, config=config)
    assert info.value.code == 1007


def test_no_project_anywhere() -> None:
    with pytest.raises(LiveRefused) as info:
        decide("gemini-live-2.5-flash", config=parse_config_text("{}"))
    assert "vertex_project" in info.value.reason


def test_no_model_anywhere() -> None:
    with pytest.raises(LiveRefused) as info:
        decide(None)
    assert info.value.code == 1007 and "no model" in info.value.reason


def test_setup_frame_is_the_callers_bytes_unless_completed() -> None:
    original = json.dumps({"setup": {"model": "projects/eu-proj/locations/europe-west4/publishers/google/models/"
                                              "gemini-live-2.5-flash", "generationConfig": {"temperature": 0.5}}},
                          indent=1)
    decision = decide("gemini-live-2.5-flash")
    assert setup_frame(original, parse_setup(original), decision) is original
    short = b'{"setup": {"model": "fast", "tools": []}}'
    rewritten = setup_frame(short, parse_setup(short), decide("fast"))
    assert isinstance(rewritten, bytes)
    assert json.loads(rewritten) == {"setup": {"model": decision.resource, "tools": []}}


def _usage(prompt: int, output: int) -> dict:
    return {"promptTokenCount": prompt, "candidatesTokenCount": output, "totalTokenCount": prompt + output}


def test_turn_meter_reports_each_turn_when_it_completes() -> None:
    meter = TurnMeter()
    audio = json.dumps({"serverContent": {"modelTurn": {"parts": [{"inlineData": {"data": "AAAA"}}]}}})
    assert meter.observe(audio) is None
    assert meter.observe(b'{"setupComplete": {}}') is None
    turn1 = meter.observe(json.dumps({"serverContent": {"turnComplete": True}, "usageMetadata": _usage(10, 5)}))
    assert turn1 is not None and (turn1.input_tokens, turn1.output_tokens) == (10, 5)
    # usage first, turnComplete later; the last usage of a turn wins
    assert meter.observe(json.dumps({"usageMetadata": _usage(20, 1)}).encode()) is None
    assert meter.observe(json.dumps({"usageMetadata": _usage(20, 8)}).encode()) is None
    turn2 = meter.observe(b'{"serverContent": {"turnComplete": true}}')
    assert turn2 is not None and turn2.output_tokens == 8
    # turnComplete first, its usage right after
    assert meter.observe(b'{"serverContent": {"turnComplete": true}}') is None
    turn3 = meter.observe(json.dumps({"usageMetadata": _usage(30, 3)}))
    assert turn3 is not None and turn3.input_tokens == 30
    # a session that ends mid-turn still accounts what it used
    assert meter.observe(json.dumps({"usageMetadata": _usage(40, 2)})) is None
    leftover = meter.flush()
    assert leftover is not None and leftover.output_tokens == 2 and meter.flush() is None


def test_turn_meter_ignores_the_words_inside_text_and_broken_json() -> None:
    meter = TurnMeter()
    assert meter.observe(json.dumps({"serverContent": {"modelTurn": {"parts": [
        {"text": 'say "turnComplete" and "usageMetadata"'}]}}})) is None
    assert meter.observe(b'{"usageMetadata": {"promptTokenCount": 1') is None
    assert meter.flush() is None


def test_close_reason_fits_a_close_frame() -> None:
    long = "é" * 200
    cut = close_reason(long)
    assert len(cut.encode()) <= 123 and cut.endswith("...")
    assert close_reason("short") == "short"


@pytest.mark.parametrize("code, expected", [
    (1000, 1000), (1001, 1001), (1008, 1008), (4000, 4000), (None, 1000), (1005, 1000), (1006, 1001), (1015, 1001),
])
def test_relayable_close(code: int | None, expected: int) -> None:
    assert relayable_close(code, "why")[0] == expected


@pytest.mark.parametrize("status, code, words", [
    (401, 1011, "credentials"),
    (403, 1008, "HTTP 403 PERMISSION_DENIED: Permission"),
    (404, 1008, "HTTP 404 NOT_FOUND"),
    (429, 1013, "HTTP 429"),
    (503, 1014, "HTTP 503"),
])
def test_handshake_refusals(status: int, code: int, words: str) -> None:
    statuses = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                503: "UNAVAILABLE"}
    body = json.dumps({"error": {"code": status, "message": "Permission 'aiplatform.endpoints.predict' denied " * 3,
                                 "status": statuses[status]}}).encode()
    refused = handshake_refusal(status, body, "us-central1-aiplatform.googleapis.com")
    assert refused.code == code and words in refused.reason
    assert len(refused.reason.encode()) <= 123


def test_handshake_refusal_without_json_body() -> None:
    refused = handshake_refusal(502, b"<html>Bad Gateway</html>", "h")
    assert refused.code == 1014 and "HTTP 502" in refused.reason


def test_absurdly_nested_json_is_refused_not_raised() -> None:
    with pytest.raises(LiveRefused) as info:
        parse_setup("[" * 100_000)
    assert info.value.code == 1007
    meter = TurnMeter()
    assert meter.observe('{"usageMetadata": ' + "[" * 100_000) is None
    assert meter.observe(b'{"serverContent": {"turnComplete": true}, "x": ' + b"[" * 100_000) is None


@pytest.mark.parametrize("kind", [str, bytes])
def test_completed_setup_keeps_escaped_lone_surrogates_sendable(kind: type) -> None:
    text = '{"setup": {"model": "fast", "systemInstruction": {"parts": [{"text": "\\ud800 caf\\u00e9"}]}}}'
    frame = text if kind is str else text.encode()
    rewritten = setup_frame(frame, parse_setup(frame), decide("fast"))
    assert isinstance(rewritten, kind)
    data = rewritten.encode("utf-8") if isinstance(rewritten, str) else rewritten  # what the socket sends
    sent = json.loads(data)
    assert sent["setup"]["systemInstruction"]["parts"][0]["text"] == "\ud800 café"
    assert sent["setup"]["model"] == decide("fast").resource


@pytest.mark.parametrize("frame", ['{"\\ud800": 1}', '{"setup": {"model": "x\\ud800y"}}'])
def test_refusal_reasons_quoting_lone_surrogates_can_be_sent(frame: str) -> None:
    with pytest.raises(LiveRefused) as info:
        split_model(setup_model(parse_setup(frame)) or "")
    info.value.reason.encode("utf-8")  # what the close frame carries
    assert info.value.code == 1007
    assert close_reason("\ud800" * 100).encode("utf-8") and len(close_reason("\ud800" * 100).encode()) <= 123


@pytest.mark.parametrize("text", [
    "projects/p1/locations/us-central1/publishers/google/models/gemini-ok/%2e%2e/%2e%2e",
    "projects/p1/locations/us-central1/publishers/google/models/%2E%2E",
    "projects/p1/locations/us-central1/publishers/google/models/.%2e",
    "projects/p1/locations/us-central1/publishers/%252e%252e/models/m",
    "projects/p1/locations/us-central1/publishers/google/models/m%2F..",
])
def test_escaped_dot_segments_in_the_setup_model_are_invalid_paths(text: str) -> None:
    with pytest.raises(LiveRefused) as info:
        split_model(text)
    assert (info.value.code, info.value.status, info.value.error) == (1007, 400, "INVALID_PATH")


def test_a_percent_escape_in_the_setup_model_is_refused_not_decoded() -> None:
    with pytest.raises(LiveRefused) as info:
        split_model("projects/p1/locations/us-central1/publishers/google/models/gemini-2.5-pr%6F")
    assert info.value.error == "INVALID_MODEL"


def test_aliases_apply_to_full_resource_names_keeping_the_callers_project_and_location() -> None:
    decision = decide("projects/eu-proj/locations/europe-west1/publishers/google/models/fast")
    assert decision.route.name == "live-eu"
    assert decision.resource == "projects/eu-proj/locations/europe-west1/publishers/google/models/gemini-live-2.5-flash"
    # A pinned alias does not move a caller who named its own project and location.
    pinned = decide("projects/eu-proj/locations/europe-west4/publishers/google/models/pinned")
    assert (pinned.project, pinned.location, pinned.model) == ("eu-proj", "europe-west4", "gemini-live-2.5-flash")
    assert decide("models/fast").model == "gemini-live-2.5-flash"


@pytest.mark.parametrize("query", ["vertex_location=evil.example.com", "vertex_location=us-central1%2F..",
                                   "vertex_project=a/b", "vertex_location=US-CENTRAL1"])
def test_malformed_query_parameters_are_refused_even_with_a_full_model_name(query: str) -> None:
    config = parse_config_text("defaults: {project: top-proj, location: us-central1}")
    with pytest.raises(LiveRefused) as info:
        decide(FULL, query, config=config)
    assert (info.value.code, info.value.error) == (1007, "INVALID_PATH")
    assert ("vertex_location" in info.value.reason) or ("vertex_project" in info.value.reason)
