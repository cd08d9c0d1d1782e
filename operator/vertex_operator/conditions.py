"""Status conditions in the `metav1.Condition` shape; pure.

`lastTransitionTime` changes only when a condition's status flips, so re-applying the
same state writes nothing new (and `same_status` lets callers skip the write entirely).
"""

from __future__ import annotations

import datetime
from typing import Any, Iterable, Mapping

Condition = dict[str, Any]


def now() -> str:
    return datetime.datetime.now(tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, status: bool | str, reason: str, message: str = "",
              observed_generation: int | None = None) -> Condition:
    value = status if isinstance(status, str) else ("True" if status else "False")
    result: Condition = {"type": type_, "status": value, "reason": reason, "message": message}
    if observed_generation is not None:
        result["observedGeneration"] = observed_generation
    return result


def find(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> bool:
    found = find(conditions, type_)
    return found is not None and found.get("status") == "True"


def merge(old: Iterable[Mapping[str, Any]] | None, new: Iterable[Condition],
          timestamp: str | None = None) -> list[Condition]:
    """The `new` conditions, keeping each one's transition time when its status is unchanged.

    Conditions of types not in `new` are dropped: the caller states the full set.
    """
    stamp = timestamp or now()
    previous = {c.get("type"): c for c in old or []}
    merged: list[Condition] = []
    for cond in new:
        before = previous.get(cond["type"])
        keep = before is not None and before.get("status") == cond["status"] and before.get("lastTransitionTime")
        merged.append({**cond, "lastTransitionTime": before["lastTransitionTime"] if keep else stamp})  # type: ignore[index]
    return merged


def same_status(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Whether `current` already holds `desired` (transition times aside), so writing it would change nothing.

    Keys of `current` that `desired` does not mention are not compared.
    """
    current = dict(current or {})

    def strip(status: Mapping[str, Any]) -> dict[str, Any]:
        result = {k: v for k, v in status.items() if k != "conditions"}
        result["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or []
        ]
        return result

    return all(strip(current).get(k) == v for k, v in strip(desired).items())
