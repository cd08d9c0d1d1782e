"""Discovery Engine (Vertex AI Search) `servingConfigs/{config}:search`.

Paths: `{v1|v1alpha|v1beta}/projects/P/locations/L/collections/C/engines/E/servingConfigs/S:search`
and the `dataStores/D` forms (with or without `collections/C`). Results are deterministic
in the query: min(pageSize or 10, 3) documents, a `totalSize`, an `attributionToken`, and
a `summary` when `contentSearchSpec.summarySpec` is present.
"""

from __future__ import annotations

import hashlib
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from . import google_errors
from .google_json import json_response
from .model_call import BadBody, error_response, parse_json_body

__all__ = ["DISCOVERY_VERSIONS", "handle_search"]

DISCOVERY_VERSIONS = frozenset({"v1", "v1alpha", "v1beta"})
_RESULTS = 3


def _documents_parent(project: str, location: str, collection: str, kind: str, name: str) -> str:
    # Engines search their data stores; name a deterministic one for documents.
    store = name if kind == "dataStores" else f"{name}-datastore"
    parent = f"projects/{project}/locations/{location}/collections/{collection}"
    return f"{parent}/dataStores/{store}/branches/0/documents"


def search_response(
    body: dict[str, Any], project: str, location: str, collection: str, kind: str, name: str
) -> dict[str, Any]:
    query = str(body.get("query", ""))
    page_size = body.get("pageSize")
    count = min(page_size if isinstance(page_size, int) and page_size > 0 else 10, _RESULTS)
    parent = _documents_parent(project, location, collection, kind, name)
    digest = hashlib.sha256(query.encode()).hexdigest()
    results = []
    for i in range(count):
        doc_id = f"{digest[:12]}-{i}"
        results.append(
            {
                "id": doc_id,
                "document": {
                    "name": f"{parent}/{doc_id}",
                    "id": doc_id,
                    "derivedStructData": {
                        "title": f"Result {i + 1} for {query}",
                        "link": f"gs://emu-bucket/docs/{doc_id}.html",
                        "snippets": [{"snippet": f"... {query} ...", "snippet_status": "SUCCESS"}],
                    },
                },
            }
        )
    response: dict[str, Any] = {
        "results": results,
        "totalSize": _RESULTS,
        "attributionToken": digest[:40],
        "guidedSearchResult": {},
    }
    spec = body.get("contentSearchSpec") or {}
    if "summarySpec" in spec:
        response["summary"] = {
            "summaryText": f"Summary of {count} results for {query}.",
            "summaryWithMetadata": {"summary": f"Summary of {count} results for {query}."},
        }
    return response


async def handle_search(request: Request) -> Response:
    p = request.path_params
    action_ok = p["config_action"].endswith(":search")
    if p["version"] not in DISCOVERY_VERSIONS or not action_ok:
        return error_response(request, google_errors.not_found())
    try:
        body = await parse_json_body(request)
    except BadBody as exc:
        return error_response(request, exc.body)
    request.app.state.calls["search"] += 1
    kind = "engines" if "engine" in p else "dataStores"
    name = p.get("engine") or p["data_store"]
    collection = p.get("collection", "default_collection")
    return json_response(request, search_response(body, p["project"], p["location"], collection, kind, name))
