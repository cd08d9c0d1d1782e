"""JSON the sidecar decides on: a key given twice is an error, not "the last one wins". Pure.

Parsers disagree on duplicate keys (Python and most JSON libraries keep the last, others
the first or refuse), so a body whose `"model"` appears twice could be judged by one value
and served by Google with the other. Only bodies the sidecar already parses for a decision
go through here (an OpenAI-compatible request's `model`, a Live setup message); the
check is one dict per JSON object, done in the parse itself.
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(f"the key {key!r} appears twice in one JSON object")
        self.key = key


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return result


def loads_unique(data: str | bytes) -> Any:
    """json.loads, raising DuplicateKey (a ValueError) when an object repeats a key."""
    return json.loads(data, object_pairs_hook=_unique_object)
