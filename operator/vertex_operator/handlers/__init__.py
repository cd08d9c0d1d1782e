"""kopf wiring: importing this package registers every handler with kopf's default registry.

Each module is thin and delegates to `vertex_operator.controller.Controller` (found in
the operator's memo as `memo.controller`):

* `setup`   — operator settings (finalizer, storage prefixes, webhook server), API login.
* `indexes` — in-memory indexes of routes, credentials and workloads (by namespace).
* `routes`  — VertexRoute lifecycle, and the credential/workload events that affect routes.
* `pods`    — the Pod CREATE mutating webhook that injects the sidecar.

VertexCredential reconciliation (service accounts, IAM bindings) gets its own module
(`credentials`) registered here the same way.
"""

from vertex_operator.handlers import indexes, pods, routes, setup

__all__ = ["indexes", "pods", "routes", "setup"]
