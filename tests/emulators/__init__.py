"""Local emulators of the Google endpoints the sidecar talks to, faithful to the real wire
shapes: GCE/GKE metadata server (`metadata`), OAuth token endpoint for service-account keys
(`oauth`), Vertex AI REST + SSE + JSON-array streams and Discovery Engine (`vertex`), all
sharing issued tokens through a `TokenRegistry` (`tokens`). `serve` runs them on loopback
(port 0); `python -m tests.emulators` runs the combined emulator standalone.
"""

from .metadata import create_metadata_app
from .oauth import create_oauth_app, make_service_account_key
from .serve import ServerHandle, async_running_server, create_combined_app, running_server
from .tokens import TokenRegistry
from .vertex import create_vertex_app

__all__ = [
    "ServerHandle",
    "TokenRegistry",
    "async_running_server",
    "create_combined_app",
    "create_metadata_app",
    "create_oauth_app",
    "create_vertex_app",
    "make_service_account_key",
    "running_server",
]
