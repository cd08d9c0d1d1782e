"""One `vertexai.generative_models` call (google-cloud-aiplatform, REST transport), as an app
would make it: the code names project, location and model; everything else — proxy, CA
bundle, the app's own ADC — comes from the environment. Prints one JSON line on stdout, an
SDK error included, so the test can assert on what the app would see.

    python generative_models_call.py '{"project": "p", "location": "us-central1",
                                       "model": "gemini-2.5-flash", "prompt": "hi", "stream": false}'

Runs on .tools/aiplatform-venv's python (scripts/get-aiplatform-client.sh), not the project's.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import vertexai
from google.api_core import exceptions
from vertexai.generative_models import GenerativeModel


def call(request: dict[str, Any]) -> dict[str, Any]:
    init: dict[str, Any] = {"project": request["project"], "location": request["location"], "api_transport": "rest"}
    if request.get("api_endpoint"):
        init["api_endpoint"] = request["api_endpoint"]
    vertexai.init(**init)
    model = GenerativeModel(request.get("model", "gemini-2.5-flash"))
    prompt = request.get("prompt", "hello")
    if request.get("stream"):
        chunks = [chunk.text for chunk in model.generate_content(prompt, stream=True)]
        return {"ok": True, "text": "".join(chunks), "chunks": chunks}
    return {"ok": True, "text": model.generate_content(prompt).text, "chunks": None}


def main() -> None:
    try:
        result = call(json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}"))
    except exceptions.GoogleAPICallError as error:  # what an HTTP error status becomes
        result = {"ok": False, "error": {"name": type(error).__name__, "code": error.code, "message": error.message}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
