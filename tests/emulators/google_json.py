"""JSON bodies the way Google's API front end writes them.

Google APIs pretty-print JSON unless the request has the system parameter
`prettyPrint=false`, and send `application/json; charset=UTF-8`. SSE `data:` lines carry
one-line JSON. The emulator can also gzip a body on request, to exercise a proxy's
pass-through of `content-encoding`.
"""

from __future__ import annotations

import gzip
import json
import urllib.parse
from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import Response

__all__ = [
    "GOOGLE_JSON",
    "encode_json",
    "encode_json_line",
    "json_response",
    "wants_gzip",
    "wants_pretty",
]

GOOGLE_JSON = "application/json; charset=UTF-8"


def encode_json(payload: object, *, pretty: bool = True) -> bytes:
    if pretty:
        return json.dumps(payload, indent=2, ensure_ascii=False).encode()
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def encode_json_line(payload: object) -> bytes:
    """One-line JSON as seen in Vertex SSE frames (`{"a": 1,"b": 2}` spacing)."""
    return json.dumps(payload, separators=(",", ": "), ensure_ascii=False).encode()


def wants_pretty(request: Request) -> bool:
    return request.query_params.get("prettyPrint", "true").lower() not in ("false", "0")


def wants_gzip(request: Request) -> bool:
    """Gzip only when asked twice: Google decides by client hints we do not model."""
    accepts = "gzip" in request.headers.get("accept-encoding", "").lower()
    return accepts and request.headers.get("x-emulator-gzip") == "1"


def json_response(
    request: Request,
    payload: object,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = encode_json(payload, pretty=wants_pretty(request))
    out_headers = {"vary": "Origin, X-Origin, Referer", **(headers or {})}
    if wants_gzip(request):
        body = gzip.compress(body)
        out_headers["content-encoding"] = "gzip"
        out_headers["vary"] += ", Accept-Encoding"
    return Response(body, status_code=status_code, headers=out_headers, media_type=GOOGLE_JSON)


async def read_token_request(request: Request) -> dict[str, str]:
    """The parameters of a token-endpoint request: form-encoded (RFC 6749) or, as STS and
    some SDKs also accept, JSON. Repeated form keys: the last wins."""
    body = await request.body()
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    parsed = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[-1] for k, v in parsed.items()}
