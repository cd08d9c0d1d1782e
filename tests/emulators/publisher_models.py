"""Model Garden's publisher-model bindings, served without a project as Google does:

- ``GET /{v1|v1beta1}/publishers/{publisher}/models/{model}`` → a PublisherModel
  (GetPublisherModel; the Vertex SDK's `from_pretrained`, google-genai's `models.get`)
- ``GET /v1beta1/publishers/{publisher}/models`` → ListPublisherModels (v1beta1 only)

Models are "known" by the app's `known_models` globs; a ``@version`` suffix names a version.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import google_errors
from .google_json import json_response
from .model_call import error_response

__all__ = ["publisher_model", "publisher_model_routes"]

VERSIONS = frozenset({"v1", "v1beta1"})
_LISTED = {"google": ("gemini-2.5-flash", "gemini-2.5-pro", "text-embedding-005"),
           "anthropic": ("claude-sonnet-4",)}


def publisher_model(publisher: str, model: str, version_id: str = "default") -> dict[str, Any]:
    """A PublisherModel as GetPublisherModel returns it in the default (BASIC) view."""
    model_json: dict[str, Any] = {
        "name": f"publishers/{publisher}/models/{model}",
        "versionId": version_id,
        "openSourceCategory": "PROPRIETARY",
        "launchStage": "GA",
        "versionState": "VERSION_STATE_STABLE",
        "publisherModelTemplate": (f"projects/{{project}}/locations/{{location}}/publishers/{publisher}/models/"
                                   f"{model}@{version_id}"),
    }
    if "embedding" in model:  # the Vertex SDK's from_pretrained picks the model class by this schema
        schema = "text_embedding_1.0.0.yaml"
        model_json["predictSchemata"] = {
            f"{kind}SchemaUri": f"gs://google-cloud-aiplatform/schema/predict/{folder}/{schema}"
            for kind, folder in (("instance", "instance"), ("parameters", "params"), ("prediction", "prediction"))
        }
    return model_json


def _known(request: Request, publisher: str, model: str) -> bool:
    patterns = request.app.state.known_models.get(publisher, ())
    return any(fnmatch.fnmatchcase(model, p) for p in patterns)


async def _get(request: Request) -> Response:
    p = request.path_params
    if p["version"] not in VERSIONS:
        return error_response(request, google_errors.not_found())
    model, _, version_id = p["model"].partition("@")
    if ":" in model or not _known(request, p["publisher"], model):
        return error_response(request, google_errors.publisher_model_not_found(
            f"publishers/{p['publisher']}/models/{p['model']}"))
    request.app.state.calls["getPublisherModel"] += 1
    return json_response(request, publisher_model(p["publisher"], model, version_id or "default"))


async def _list(request: Request) -> Response:
    p = request.path_params
    if p["version"] != "v1beta1":  # ListPublisherModels exists in v1beta1 only
        return error_response(request, google_errors.not_found())
    models = [publisher_model(p["publisher"], m) for m in _LISTED.get(p["publisher"], ())
              if _known(request, p["publisher"], m)]
    request.app.state.calls["listPublisherModels"] += 1
    return json_response(request, {"publisherModels": models})


def publisher_model_routes() -> list[Route]:
    return [
        Route("/{version}/publishers/{publisher}/models/{model}", _get, methods=["GET"]),
        Route("/{version}/publishers/{publisher}/models", _list, methods=["GET"]),
    ]
