"""kopf wiring: importing this package registers every handler with kopf's default registry.

Each module is thin and delegates to `vertex_operator.controller.Controller` (found in
the operator's memo as `memo.controller`):

* `setup`   — operator settings (finalizer, storage prefixes, webhook server), API login.
* `indexes` — in-memory indexes of routes, credentials and workloads (by namespace).
* `routes`  — VertexRoute lifecycle, and the credential/workload events that affect routes.
* `credentials` — VertexCredential lifecycle: service accounts, IAM grants, status.
* `pods`    — the Pod CREATE mutating webhook that injects the sidecar.
* `serving` — the registry of the serving half (every replica): webhook + its indexes;
  everything else is the reconciling half (the default registry, the Lease holder only).
"""

from vertex_operator.handlers import credentials, indexes, pods, routes, serving, setup

__all__ = ["credentials", "indexes", "pods", "routes", "serving", "setup"]
