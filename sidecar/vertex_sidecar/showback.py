"""Who is spending: namespace, workload and team of the pod, for metrics and the access log.

The operator's webhook injects them as env (the namespace through the downward API, the
workload from the pod's owner, the team from a namespace label the chart names). They are
constant per pod, so they add no series; values that are not sane label values are dropped.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

SHOWBACK_ENV = {
    "namespace": "VERTEX_SIDECAR_NAMESPACE",
    "workload": "VERTEX_SIDECAR_WORKLOAD",
    "team": "VERTEX_SIDECAR_TEAM",
}
SHOWBACK_LABELS = tuple(SHOWBACK_ENV)
_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def showback_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The showback fields that are set and valid (label name → value)."""
    env = os.environ if environ is None else environ
    result: dict[str, str] = {}
    for label, name in SHOWBACK_ENV.items():
        value = env.get(name, "").strip()
        if value and _VALUE.match(value):
            result[label] = value
    return result
