"""What every Vertex model call shares: its identity, JSON body parsing, and the
fault-injection knobs checked before a model answers.

Knobs on the Vertex app.state, checked in this order:
- `denied_projects: set[str]` → 403 PERMISSION_DENIED (IAM_PERMISSION_DENIED ErrorInfo);
- `fail_locations: dict[str, int]` → that status for calls in a location (fallback tests);
- `fail_next: deque[int]` → the next calls fail with these statuses, one each;
- model `error-<code>` → the realistic body for that code;
- unknown model → 404 "Publisher Model ... was not found ...".
`first_byte_delay_s` (or header `x-emulator-first-byte-delay`) delays the answer.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from . import google_errors
from .google_json import json_response
from .rpc import AIPLATFORM, rpc_for_path
from .streams import first_byte_delay

__all__ = ["BadBody", "ModelCall", "error_response", "parse_json_body", "preflight"]


@dataclass(frozen=True)
class ModelCall:
    version: str
    project: str
    location: str
    publisher: str
    model: str
    action: str
    path: str

    @property
    def resource(self) -> str:
        location = f"projects/{self.project}/locations/{self.location}"
        return f"{location}/publishers/{self.publisher}/models/{self.model}"

    @property
    def rpc(self) -> tuple[str, str]:
        return rpc_for_path(self.path)


class BadBody(Exception):
    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body["error"]["message"])
        self.body = body


def error_response(request: Request, body: dict[str, Any]) -> Response:
    return json_response(request, body, status_code=body["error"]["code"])


async def parse_json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; an empty body counts as `{}` as on Google's front end."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadBody(google_errors.invalid_json(exc)) from exc
    except UnicodeDecodeError as exc:
        raise BadBody(google_errors.bad_request("Invalid JSON payload received. Invalid UTF-8.")) from exc
    if not isinstance(data, dict):
        raise BadBody(
            google_errors.bad_request(
                'Invalid JSON payload received. Unknown name "": Root element must be a message.'
            )
        )
    return data


def _model_known(state: Any, publisher: str, model: str) -> bool:
    patterns = state.known_models.get(publisher, ())
    return any(fnmatch.fnmatchcase(model, p) for p in patterns)


async def preflight(request: Request, call: ModelCall) -> dict[str, Any] | None:
    """The Google error body a knob or the model name calls for, else None."""
    state = request.app.state
    state.calls[call.action] += 1
    delay = first_byte_delay(request)
    if delay:
        await asyncio.sleep(delay)
    method, service = call.rpc
    if call.project in state.denied_projects:
        return google_errors.permission_denied("aiplatform.endpoints.predict", call.resource, AIPLATFORM)
    code = state.fail_locations.get(call.location)
    if code is None and state.fail_next:
        code = state.fail_next.popleft()
    if code is None and call.model.startswith("error-") and call.model[6:].isdigit():
        code = int(call.model[6:])
    if code is not None:
        return google_errors.canned_error(code, resource=call.resource, method=method, service=service)
    if not _model_known(state, call.publisher, call.model):
        return google_errors.publisher_model_not_found(call.resource)
    return None
