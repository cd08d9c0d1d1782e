"""The operator's own settings (from the command line), one frozen dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from vertex_operator import __version__
from vertex_operator.policy import Policy
from vertex_operator.tracing import TracingDefaults
from vertex_operator.fleet import StoreSettings

DEFAULT_SIDECAR_IMAGE = os.environ.get("VERTEX_SIDECAR_IMAGE") or f"vertex-passthrough-sidecar:{__version__}"
SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})
DEFAULT_IAM_ENDPOINT = "https://iam.googleapis.com"
DEFAULT_RESOURCE_MANAGER_ENDPOINT = "https://cloudresourcemanager.googleapis.com"


@dataclass(frozen=True)
class Options:
    clusterwide: bool = True
    namespaces: tuple[str, ...] = ()
    standalone: bool | None = None
    liveness: str | None = None
    sidecar_image: str = DEFAULT_SIDECAR_IMAGE
    # Never injected: the system namespaces and the operator's own (a broken operator
    # must not be able to block its own pods through its webhook).
    operator_namespace: str | None = None
    metrics_addr: str = "0.0.0.0"
    metrics_port: int | None = 8081  # None: no metrics endpoint
    webhook: bool = True
    webhook_addr: str = "0.0.0.0"
    webhook_port: int | None = 9443  # None: a free port (tests)
    webhook_host: str | None = None
    webhook_cert: str | None = None
    webhook_key: str | None = None
    webhook_ca: str | None = None
    webhook_managed: str | None = None  # let kopf own a MutatingWebhookConfiguration of this name
    resync_seconds: float = 300.0
    # VertexCredential bindings (backend iamApi): Google endpoints, and timings.
    iam_endpoint: str = DEFAULT_IAM_ENDPOINT
    resource_manager_endpoint: str = DEFAULT_RESOURCE_MANAGER_ENDPOINT
    iam_propagation_seconds: float = 120.0  # BindingReady stays Propagating this long after a grant
    binding_recheck_seconds: float = 10.0  # first retry after an error; Config Connector polling
    iam_retry_seconds: float = 0.5  # first delay after a 409 ABORTED (read-modify-write conflict)
    extra_excluded_namespaces: frozenset[str] = field(default_factory=frozenset)
    # The platform team's bounds (--policy-file); the defaults refuse every automatic grant.
    policy: Policy = field(default_factory=Policy)
    # --write-namespace: where the operator's RBAC lets it write (ConfigMaps, ServiceAccounts,
    # workload patches) when it watches every namespace; None: everywhere it watches.
    write_namespaces: frozenset[str] | None = None

    # --injection-label: the namespace label the webhook configuration requires (key, value);
    # routes in namespaces without it report so instead of rolling workloads. None: no label.
    injection_label: tuple[str, str] | None = None

    def may_write(self, namespace: str) -> bool:
        return self.write_namespaces is None or namespace in self.write_namespaces
    # Tracing for routes whose spec.sidecar.tracing does not say (chart sidecar.tracing.*).
    tracing: TracingDefaults = field(default_factory=TracingDefaults)
    # Fleet-wide limits and budgets (issue 11): the store sidecars share, and the showback team.
    store: StoreSettings | None = None
    team_label: str | None = None  # the Namespace label whose value is the pod's showback team
    # Leader election (off with standalone=True): the Lease, its namespace (default: the
    # operator's own) and client-go's timings; this replica's identity (default: pod name).
    lease_name: str = "vertex-operator-leader"
    lease_namespace: str | None = None
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    identity: str | None = None
    # GET /readyz (a real AdmissionReview to the own webhook), /healthz, /leader; None: off.
    readiness_addr: str = "0.0.0.0"
    readiness_port: int | None = None
    # After SIGTERM: unready at once, reconciling stopped and the Lease released, but the
    # webhook keeps answering this long (until the Service stops sending requests here).
    shutdown_delay: float = 0.0
    # The repair loop: how often running pods are checked, and how long a workload it
    # restarted is left alone (so that a webhook outage does not restart it over and over).
    repair_seconds: float = 60.0
    repair_backoff_seconds: float = 600.0

    @property
    def leader_election(self) -> bool:
        return not self.standalone

    @property
    def excluded_namespaces(self) -> frozenset[str]:
        own = {self.operator_namespace} if self.operator_namespace else set()
        return SYSTEM_NAMESPACES | own | self.extra_excluded_namespaces
