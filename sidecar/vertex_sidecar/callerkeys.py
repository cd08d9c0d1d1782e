"""Caller keys: an optional shared secret in a request header, checked against hashes.

Only SHA-256 hashes are stored (a ConfigMap or file listing never reveals a usable key);
the presented key is hashed and compared in constant time against every entry.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from .config import CallerKeys, ConfigError
from .headers import header_value

_LINE = re.compile(r"^(?:(?P<name>[A-Za-z0-9_.-]+)\s*:\s*)?sha256:(?P<hash>[0-9a-fA-F]{64})$")


@dataclass(frozen=True)
class KeyCheck:
    header: bytes
    hashes: tuple[tuple[str, bytes], ...]  # (name, sha256 digest)

    def identify(self, presented: bytes | None) -> str | None:
        """The name of the matching key, or None."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.strip()).digest()
        found = None
        for name, expected in self.hashes:
            if hmac.compare_digest(digest, expected):  # no early exit: timing says nothing
                found = name
        return found

    def identify_request(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The name of the key in the request's header, or None (missing or wrong)."""
        return self.identify(header_value(headers, self.header))

    @property
    def refusal(self) -> str:
        return (f"this sidecar requires a caller key in the {self.header.decode()} header; "
                "ask your platform team for one")


def parse_key_file(text: str, source: str) -> tuple[tuple[str, bytes], ...]:
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if not match:
            raise ConfigError(f"{source}:{number}: expected 'sha256:<64 hex digits>' (optionally 'name: ' in "
                              "front); store hashes, never plain keys")
        entries.append((match.group("name") or f"key-{number}", bytes.fromhex(match.group("hash"))))
    if not entries:
        raise ConfigError(f"{source}: no key hashes; remove caller_keys from the config to turn the check off")
    return tuple(entries)


def load_key_check(spec: CallerKeys | None) -> KeyCheck | None:
    if spec is None:
        return None
    try:
        text = Path(spec.file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"caller_keys.file: cannot read {spec.file}: {exc.strerror}") from None
    return KeyCheck(spec.header.encode("latin-1"), parse_key_file(text, spec.file))


def hash_key(key: str) -> str:
    """The line to put in the keys file for `key` (used by docs and tests)."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()
