"""What a request needs at hand: the config snapshot it runs under, and shared services.

A config reload builds a new `Snapshot` and swaps it in one assignment: requests that
already started keep the snapshot they took, new requests see the new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Config
from .credentials import CredentialRegistry


@dataclass
class Snapshot:
    config: Config
    credentials: CredentialRegistry

    def needed_credentials(self) -> set[str]:
        """Credentials a route uses (readiness waits for their first token)."""
        if self.config.allow_all:
            return {"default"}
        return {route.credential for route in self.config.routes}


@dataclass
class SidecarState:
    snapshot: Snapshot
    draining: bool = False
    extras: dict[str, object] = field(default_factory=dict)

    def swap(self, snapshot: Snapshot) -> Snapshot:
        previous, self.snapshot = self.snapshot, snapshot
        return previous

    @property
    def ready(self) -> bool:
        snapshot = self.snapshot
        return not self.draining and snapshot.credentials.ready(snapshot.needed_credentials())
