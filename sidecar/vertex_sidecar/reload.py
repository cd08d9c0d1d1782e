"""Hot reload: watch the config file (and the caller-keys file) and apply valid changes.

Kubernetes updates a mounted ConfigMap by swapping a `..data` symlink, so the files are
compared by content, and the check runs when inotify reports a change in their
directories (`file_events`), with a slow poll as a safety net; where inotify is
unavailable they are polled every `reload_interval_seconds`. A new valid config is
applied atomically (in-flight requests finish on the old snapshot); an invalid one is
refused with one log line, and the running config stays.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Protocol

from .config import Config, ConfigError, parse_config_text
from .file_events import DirectoryEvents

log = logging.getLogger("vertex_sidecar.reload")

SAFETY_POLL_S = 300.0  # with inotify: a check this often anyway, should an event be missed

ReloadObserver = Callable[[str], None]  # "success" | "failure"


class Reloadable(Protocol):
    @property
    def config(self) -> Config: ...

    def apply_config(self, config: Config) -> None: ...


def _digest(path: Path) -> bytes | None:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None


def _link_directories(path: Path, max_hops: int = 8) -> list[Path]:
    """The directories of every hop of a symlink chain: a swap in any of them changes the file
    (a pod's `config.yaml -> ..data/config.yaml`, `..data -> ..2026_12_07...`)."""
    path = Path(os.path.abspath(path))
    directories = [path.parent]
    for _ in range(max_hops):
        try:
            target = os.readlink(path)
        except OSError:  # not a link (or gone)
            break
        path = Path(os.path.abspath(path.parent / target))
        directories.append(path.parent)
    return directories


class ConfigWatcher:
    def __init__(self, path: str, target: Reloadable, observer: ReloadObserver | None = None) -> None:
        self.path = Path(path)
        self.target = target
        self.observer = observer
        self._seen = self._fingerprint()

    def _fingerprint(self) -> tuple[bytes | None, bytes | None]:
        keys = self.target.config.caller_keys
        return _digest(self.path), _digest(Path(keys.file)) if keys is not None else None

    def check(self) -> str | None:
        """Apply the file if it changed; returns "success", "failure" or None (unchanged)."""
        fingerprint = self._fingerprint()
        if fingerprint == self._seen:
            return None
        self._seen = fingerprint
        if fingerprint[0] is None:
            return self._refuse(f"cannot read {self.path}; keeping the running config")
        try:
            config = parse_config_text(self.path.read_text(encoding="utf-8"), str(self.path))
            previous = self.target.config
            self.target.apply_config(config)
        except (ConfigError, OSError) as exc:
            return self._refuse(f"refused the new config, keeping the running one: {exc}")
        self._seen = self._fingerprint()  # the keys file may be a new one now
        restart_only = [name for name in ("listen", "admin_listen", "tls_listen", "tls")
                        if getattr(config, name) != getattr(previous, name)]
        if restart_only:
            log.warning("config reloaded, but %s only change on restart", ", ".join(restart_only))
        log.info("config reloaded from %s: %d route(s), %d credential(s)", self.path, len(config.routes),
                 len(config.credentials))
        self._observe("success")
        return "success"

    def _refuse(self, message: str) -> str:
        log.error("%s", message)
        self._observe("failure")
        return "failure"

    def _observe(self, result: str) -> None:
        if self.observer is not None:
            self.observer(result)

    def _directories(self) -> list[Path]:
        keys = self.target.config.caller_keys
        files = [self.path] + ([Path(keys.file)] if keys is not None else [])
        return sorted({directory for file in files for directory in _link_directories(file)})

    async def run(self, poll_interval_s: float) -> None:
        """Check on every change inotify reports (and every SAFETY_POLL_S), or poll."""
        watched: list[Path] = []
        events: DirectoryEvents | None = None
        try:
            while True:
                if watched != self._directories():  # the keys file may have moved on reload
                    if events is not None:
                        events.close()
                    watched = self._directories()
                    events = DirectoryEvents.open(watched)
                if events is None:
                    await asyncio.sleep(poll_interval_s)
                else:
                    try:
                        await asyncio.wait_for(events.changed(), max(SAFETY_POLL_S, poll_interval_s))
                    except asyncio.TimeoutError:
                        pass
                try:
                    self.check()
                except Exception:  # never let the watcher die: the sidecar must keep serving
                    log.exception("config watcher failed; will retry")
        finally:
            if events is not None:
                events.close()
