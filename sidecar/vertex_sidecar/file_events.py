"""Wake up when a watched directory changes: inotify where the kernel offers it.

The config watcher used to poll the mounted files every couple of seconds; multiplied by
every pod of a fleet that is real CPU spent doing nothing. Kubernetes updates a mounted
ConfigMap or Secret by swapping a `..data` symlink inside the mount directory, so watching
the *directory* (not the file's inode) sees every update. When inotify is unavailable
(another OS, or the node's `fs.inotify.max_user_instances` is used up) `open()` returns
None and the caller polls instead.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from asyncinotify import Inotify

log = logging.getLogger("vertex_sidecar.reload")

QUIET_S = 0.05  # changes come in bursts (create, write, rename, delete): wait for the last one
MAX_BURST_S = 1.0


class DirectoryEvents:
    """`changed()` returns when something in one of the directories changed."""

    def __init__(self, inotify: "Inotify") -> None:
        self._inotify = inotify

    @classmethod
    def open(cls, directories: Iterable[Path]) -> "DirectoryEvents | None":
        try:
            from asyncinotify import Inotify, Mask
        except (ImportError, OSError) as exc:  # not Linux, or no libc inotify symbols
            log.warning("inotify unavailable (%s): the config files are polled instead", exc)
            return None
        mask = (Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.CREATE | Mask.DELETE
                | Mask.ATTRIB | Mask.DELETE_SELF | Mask.MOVE_SELF)
        try:
            inotify = Inotify()
        except OSError as exc:
            log.warning("inotify unavailable (%s): the config files are polled instead", exc)
            return None
        try:
            for directory in set(directories):
                inotify.add_watch(directory, mask)
        except OSError as exc:
            inotify.close()
            log.warning("cannot watch the config directory (%s): the config files are polled instead", exc)
            return None
        return cls(inotify)

    async def changed(self) -> None:
        get = self._inotify.get
        await get()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MAX_BURST_S
        while loop.time() < deadline:
            try:
                await asyncio.wait_for(get(), QUIET_S)
            except asyncio.TimeoutError:
                return

    def close(self) -> None:
        self._inotify.close()
