"""Google API error bodies: `{"error": {"code", "message", "status", "details"}}`.

Messages and detail payloads follow what Vertex AI and Google's front end return, so SDKs
(google-genai maps them to ClientError / ServerError) and the sidecar's error handling see
the real thing.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "STATUS_BY_CODE",
    "api_key_rejected",
    "bad_request",
    "canned_error",
    "error_body",
    "insufficient_scopes",
    "invalid_credentials",
    "invalid_json",
    "missing_credentials",
    "not_found",
    "permission_denied",
    "publisher_model_not_found",
    "unknown_field",
]

STATUS_BY_CODE: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    412: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
_SIGN_IN_HINT = "See https://developers.google.com/identity/sign-in/web/devconsole-project."
_CREDENTIAL_HINT = (
    "Expected OAuth 2 access token, login cookie or other valid authentication credential. " + _SIGN_IN_HINT
)


def error_body(
    code: int,
    message: str,
    status: str | None = None,
    details: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "code": code,
        "message": message,
        "status": status or STATUS_BY_CODE.get(code, "UNKNOWN"),
    }
    if details:
        error["details"] = details
    return {"error": error}


def _error_info(reason: str, domain: str, metadata: dict[str, str]) -> dict[str, Any]:
    return {"@type": _ERROR_INFO, "reason": reason, "domain": domain, "metadata": metadata}


def _rpc_metadata(method: str, service: str) -> dict[str, str]:
    return {"method": method, "service": service}


def missing_credentials(method: str, service: str) -> dict[str, Any]:
    return error_body(
        401,
        "Request is missing required authentication credential. " + _CREDENTIAL_HINT,
        details=[_error_info("CREDENTIALS_MISSING", "googleapis.com", _rpc_metadata(method, service))],
    )


def invalid_credentials(method: str, service: str, *, expired: bool) -> dict[str, Any]:
    # Expired tokens say so in ErrorInfo; unknown/garbage tokens get ACCESS_TOKEN_TYPE_UNSUPPORTED.
    reason = "ACCESS_TOKEN_EXPIRED" if expired else "ACCESS_TOKEN_TYPE_UNSUPPORTED"
    return error_body(
        401,
        "Request had invalid authentication credentials. " + _CREDENTIAL_HINT,
        details=[_error_info(reason, "googleapis.com", _rpc_metadata(method, service))],
    )


def api_key_rejected(method: str, service: str) -> dict[str, Any]:
    return error_body(
        401,
        "API keys are not supported by this API. Expected OAuth2 access token or other "
        "authentication credentials that assert a principal. "
        "See https://cloud.google.com/docs/authentication",
        details=[_error_info("CREDENTIALS_MISSING", "googleapis.com", _rpc_metadata(method, service))],
    )


def insufficient_scopes(method: str, service: str) -> dict[str, Any]:
    return error_body(
        403,
        "Request had insufficient authentication scopes.",
        details=[
            _error_info("ACCESS_TOKEN_SCOPE_INSUFFICIENT", "googleapis.com", _rpc_metadata(method, service))
        ],
    )


def permission_denied(permission: str, resource: str, service: str) -> dict[str, Any]:
    full_resource = f"//{service}/{resource}"
    return error_body(
        403,
        f"Permission '{permission}' denied on resource '{full_resource}' (or it may not exist).",
        details=[
            _error_info(
                "IAM_PERMISSION_DENIED",
                service,
                {"permission": permission, "resource": resource},
            )
        ],
    )


def bad_request(message: str, field: str | None = None) -> dict[str, Any]:
    violation: dict[str, str] = {"description": message}
    if field is not None:
        violation = {"field": field, **violation}
    return error_body(400, message, details=[{"@type": _BAD_REQUEST, "fieldViolations": [violation]}])


def invalid_json(error: json.JSONDecodeError) -> dict[str, Any]:
    """Google quotes the offending line and points at the column with a caret."""
    line = error.doc.splitlines()[error.lineno - 1] if error.doc else ""
    column = error.colno - 1
    start = max(0, column - 40)
    snippet = line[start : column + 40]
    caret = " " * (column - start) + "^"
    return bad_request(f"Invalid JSON payload received. Unexpected token.\n{snippet}\n{caret}")


def unknown_field(name: str) -> dict[str, Any]:
    return bad_request(f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.')


def not_found(message: str = "Requested entity was not found.") -> dict[str, Any]:
    return error_body(404, message)


def publisher_model_not_found(resource: str) -> dict[str, Any]:
    return error_body(
        404,
        f"Publisher Model `{resource}` was not found or your project does not have access to it. "
        "Please ensure you are using a valid model version. For more information, see: "
        "https://cloud.google.com/vertex-ai/generative-ai/docs/learn/model-versions",
    )


_CANNED_MESSAGES: dict[int, str] = {
    400: "Request contains an invalid argument.",
    409: "The operation was aborted.",
    429: (
        "Resource exhausted. Please try again later. Please refer to "
        "https://cloud.google.com/vertex-ai/generative-ai/docs/error-code-429 for more details."
    ),
    499: "The operation was cancelled.",
    500: "Internal error encountered.",
    501: "Operation is not implemented, or supported, or enabled.",
    503: "The service is currently unavailable.",
    504: "The request timed out. Please try again.",
}


def canned_error(code: int, *, resource: str, method: str, service: str) -> dict[str, Any]:
    """The realistic body Vertex returns for `code` on a model call."""
    if code == 401:
        return invalid_credentials(method, service, expired=False)
    if code == 403:
        return permission_denied("aiplatform.endpoints.predict", resource, service)
    if code == 404:
        return publisher_model_not_found(resource)
    message = _CANNED_MESSAGES.get(code, f"Emulated error {code}.")
    return error_body(code, message)
