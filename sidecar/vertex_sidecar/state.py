"""What a request needs at hand: the config snapshot it runs under, and shared services.

A config reload builds a new `Snapshot` and swaps it in one assignment: requests that
already started keep the snapshot they took, new requests see the new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .callerkeys import KeyCheck, load_key_check
from .config import Config
from .credentials import CredentialRegistry, RefreshObserver
from .limits import Limiters
from .policy import Decision, decide
from .routing import Service


DECISION_CACHE_SIZE = 1024


@dataclass
class Snapshot:
    config: Config
    credentials: CredentialRegistry
    keys: KeyCheck | None = None
    # Route decisions are pure in (path, service) for a given config, and apps call the same
    # few paths over and over: remember them (bounded) instead of resolving every request.
    _decisions: dict[tuple[str, str], Decision] = field(default_factory=dict)

    def decide(self, subpath: str, service: Service, body_model: str | None = None) -> Decision:
        """policy.decide, cached; errors are not cached (they are cheap and rare)."""
        if body_model is not None:
            return decide(subpath, service, self.config, body_model)
        key = (subpath, service)
        decision = self._decisions.get(key)
        if decision is None:
            decision = decide(subpath, service, self.config)
            if len(self._decisions) >= DECISION_CACHE_SIZE:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    @classmethod
    def build(cls, config: Config, refresh_observer: RefreshObserver | None = None) -> "Snapshot":
        """Everything a config implies; reads the caller-keys file (raises ConfigError)."""
        return cls(config, CredentialRegistry(config.credentials, refresh_observer), load_key_check(config.caller_keys))

    def needed_credentials(self) -> set[str]:
        """Credentials a route uses (readiness waits for their first token)."""
        if self.config.allow_all:
            return {"default"}
        return {route.credential for route in self.config.routes}


@dataclass
class SidecarState:
    snapshot: Snapshot
    draining: bool = False
    limiters: Limiters = field(default_factory=Limiters)  # outlive snapshots: a reload keeps the counts
    extras: dict[str, object] = field(default_factory=dict)
    governor: Any = None  # governor.Governor: fleet-wide limits and budgets, when wired (cli.build_sidecar)

    def swap(self, snapshot: Snapshot) -> Snapshot:
        previous, self.snapshot = self.snapshot, snapshot
        return previous

    @property
    def ready(self) -> bool:
        snapshot = self.snapshot
        return not self.draining and snapshot.credentials.ready(snapshot.needed_credentials())
