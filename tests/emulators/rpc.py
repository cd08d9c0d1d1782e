"""The gRPC method and service a REST path maps to.

Google error details (`ErrorInfo.metadata.method/service`) name the RPC behind a REST call,
e.g. `google.cloud.aiplatform.v1.PredictionService.GenerateContent`.
"""

from __future__ import annotations

import re

__all__ = ["AIPLATFORM", "DISCOVERY", "rpc_for_path"]

AIPLATFORM = "aiplatform.googleapis.com"
DISCOVERY = "discoveryengine.googleapis.com"

_ACTIONS: dict[str, str] = {
    "generateContent": "PredictionService.GenerateContent",
    "streamGenerateContent": "PredictionService.StreamGenerateContent",
    "predict": "PredictionService.Predict",
    "rawPredict": "PredictionService.RawPredict",
    "streamRawPredict": "PredictionService.StreamRawPredict",
    "embedContent": "PredictionService.EmbedContent",
    "countTokens": "LlmUtilityService.CountTokens",
    "computeTokens": "LlmUtilityService.ComputeTokens",
    "search": "SearchService.Search",
}
_VERSION = re.compile(r"^/(v1(?:beta1|alpha|beta)?)/")


def rpc_for_path(path: str) -> tuple[str, str]:
    """(method, service) for a Vertex or Discovery Engine REST path; best effort."""
    match = _VERSION.match(path)
    version = match.group(1) if match else "v1"
    is_discovery = "/collections/" in path or "/dataStores/" in path or "/engines/" in path
    package, service = (
        (f"google.cloud.discoveryengine.{version}", DISCOVERY)
        if is_discovery
        else (f"google.cloud.aiplatform.{version}", AIPLATFORM)
    )
    action = path.rsplit(":", 1)[1] if ":" in path.rsplit("/", 1)[-1] else ""
    if action in _ACTIONS:
        return f"{package}.{_ACTIONS[action]}", service
    if path.endswith("/chat/completions"):
        return f"{package}.PredictionService.ChatCompletions", service
    if "/operations/" in path:
        return "google.longrunning.Operations.GetOperation", service
    return f"{package}.PredictionService.Unknown", service
