"""Errors the sidecar itself answers, in Google's JSON error shape.

SDKs (google-genai, the Vertex SDKs, google-api-core) parse
``{"error": {"code": 403, "message": "...", "status": "PERMISSION_DENIED"}}`` into their
own exception types, so callers see a proper ClientError/ServerError rather than a
decoding failure. Messages say what was wrong and how to fix it; they never carry tokens.
"""

from __future__ import annotations

import json
from typing import Any

# google.rpc.Code names for the HTTP statuses the sidecar produces (AIP-193).
STATUS_BY_CODE = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

ERROR_DOMAIN = "vertex-passthrough.sidecar"


def error_body(code: int, message: str, status: str | None = None, reason: str | None = None,
               metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a Google error; `reason` adds a google.rpc.ErrorInfo detail."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status or STATUS_BY_CODE.get(code, "UNKNOWN")}
    if reason:
        error["details"] = [{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": reason,
            "domain": ERROR_DOMAIN,
            "metadata": metadata or {},
        }]
    return json.dumps({"error": error}, separators=(",", ":")).encode("utf-8")


def error_headers(body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", b"application/json; charset=UTF-8"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"x-vertex-sidecar-error", b"1"),
    ]
    return headers + (extra or [])


class SidecarError(Exception):
    """An error the sidecar answers itself (as opposed to one relayed from Google)."""

    def __init__(self, code: int, message: str, *, status: str | None = None, reason: str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.reason = reason
        self.headers = headers or []

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.status, self.reason)
