"""Vertex AI REST emulator (plus Discovery Engine search), assembled from one module per API.

Paths (`v1` and `v1beta1`, `projects/{p}/locations/{l}/...`):
- `publishers/google/models/{m}:generateContent | streamGenerateContent | countTokens |
  predict | embedContent | batchEmbedContents`            → google_models
- `publishers/anthropic/models/{m}:rawPredict | streamRawPredict` → anthropic
- `endpoints/openapi/chat/completions`                     → openai_compat
- `[.../]operations/{id}` (GET)                            → a finished operation
- `/{v}/publishers/{p}/models/{m}` (GET, no project), v1beta1 list → publisher_models
- Discovery Engine `.../servingConfigs/{s}:search`         → discovery
- `/_emulator/...` test endpoints                          → emulator_paths
- anything else                                            → 404 NOT_FOUND, Google's shape

With a TokenRegistry every request needs a valid bearer token (vertex_auth); a leading
`/_upstream/<host>` path prefix is stripped and recorded (upstream).

app.state knobs: `requests` (RequestLog), `stream_chunk_delay_s`, `stream_chunks`,
`first_byte_delay_s`, `fail_next` (deque of status codes), `fail_locations`
({location: status}), `denied_projects` (set), `known_models` ({publisher: glob patterns}),
`emulator_paths_require_auth`; counters `calls` (Counter by action) and `auth_failures`.
"""

from __future__ import annotations

import collections
import datetime as dt
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import google_errors
from .anthropic import handle_anthropic_model
from .discovery import handle_search
from .emulator_paths import emulator_routes
from .live import live_routes
from .google_json import json_response
from .google_models import handle_google_model
from .model_call import ModelCall, error_response
from .openai_compat import handle_chat_completions
from .publisher_models import publisher_model_routes
from .streams import quiet_emulated_failures
from .tokens import TokenRegistry
from .upstream import RequestLog, UpstreamPrefix
from .vertex_auth import BearerAuth

__all__ = ["DEFAULT_KNOWN_MODELS", "VERTEX_VERSIONS", "create_vertex_app"]

VERTEX_VERSIONS = frozenset({"v1", "v1beta1"})
DEFAULT_KNOWN_MODELS: dict[str, tuple[str, ...]] = {
    "google": (
        "gemini-*",
        "text-embedding-*",
        "text-multilingual-embedding-*",
        "multimodalembedding*",
        "imagen-*",
    ),
    "anthropic": ("claude-*",),
}
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_LOCATION_PATH = "/{version}/projects/{project}/locations/{location}"


def _not_found(request: Request) -> Response:
    return error_response(request, google_errors.not_found())


async def _publisher_model(request: Request) -> Response:
    p = request.path_params
    model, sep, action = p["model_action"].partition(":")
    if p["version"] not in VERTEX_VERSIONS or not sep:
        return _not_found(request)
    call = ModelCall(
        p["version"], p["project"], p["location"], p["publisher"], model, action, request.url.path
    )
    if call.publisher == "google":
        return await handle_google_model(request, call)
    if call.publisher == "anthropic":
        return await handle_anthropic_model(request, call)
    return error_response(request, google_errors.publisher_model_not_found(call.resource))


async def _chat_completions(request: Request) -> Response:
    p = request.path_params
    if p["version"] not in VERTEX_VERSIONS:
        return _not_found(request)
    return await handle_chat_completions(request, p["version"], p["project"], p["location"])


async def _operation(request: Request) -> Response:
    p = request.path_params
    if p["version"] not in VERTEX_VERSIONS:
        return _not_found(request)
    name = request.url.path.split("/", 2)[2]
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    operation: dict[str, Any] = {
        "name": name,
        "metadata": {
            "@type": f"type.googleapis.com/google.cloud.aiplatform.{p['version']}.GenericOperationMetadata",
            "genericMetadata": {"createTime": now, "updateTime": now},
        },
        "done": True,
        "response": {"@type": "type.googleapis.com/google.protobuf.Empty"},
    }
    return json_response(request, operation)


async def _catch_all(request: Request) -> Response:
    return _not_found(request)


def create_vertex_app(registry: TokenRegistry | None) -> Starlette:
    quiet_emulated_failures()
    log = RequestLog()
    routes = [
        Route(
            _LOCATION_PATH + "/publishers/{publisher}/models/{model_action}",
            _publisher_model,
            methods=["POST"],
        ),
        Route(_LOCATION_PATH + "/endpoints/openapi/chat/completions", _chat_completions, methods=["POST"]),
        Route(_LOCATION_PATH + "/operations/{operation}", _operation, methods=["GET"]),
        Route(_LOCATION_PATH + "/{parent:path}/operations/{operation}", _operation, methods=["GET"]),
        Route(
            _LOCATION_PATH + "/collections/{collection}/engines/{engine}/servingConfigs/{config_action}",
            handle_search,
            methods=["POST"],
        ),
        Route(
            _LOCATION_PATH
            + "/collections/{collection}/dataStores/{data_store}/servingConfigs/{config_action}",
            handle_search,
            methods=["POST"],
        ),
        Route(
            _LOCATION_PATH + "/dataStores/{data_store}/servingConfigs/{config_action}",
            handle_search,
            methods=["POST"],
        ),
        *publisher_model_routes(),
        *emulator_routes(),
        *live_routes(),
        # Last: a full match here beats a method mismatch above, so wrong methods get Google's 404.
        Route("/{rest:path}", _catch_all, methods=_ALL_METHODS),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(UpstreamPrefix, log=log), Middleware(BearerAuth, registry=registry)],
    )
    state = app.state
    state.registry = registry
    state.requests = log
    state.stream_chunk_delay_s = 0.0
    state.stream_chunks = 4
    state.first_byte_delay_s = 0.0
    state.fail_next = collections.deque()
    state.fail_locations = {}
    state.denied_projects = set()
    state.known_models = {k: tuple(v) for k, v in DEFAULT_KNOWN_MODELS.items()}
    state.emulator_paths_require_auth = False
    state.anthropic_prompt_cache = set()
    state.calls = collections.Counter()
    state.auth_failures = 0
    state.allowed_principals = None  # set of principals with a Vertex role; None: every valid token
    return app
