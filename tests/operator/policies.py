"""The operator policy (`vertex_operator.policy`) the operator tests run with: it allows the
projects, Google service accounts and pools their credentials use, in their namespace."""

from __future__ import annotations

from tests.operator import objects as o
from vertex_operator.policy import Policy, parse_policy

TEST_POLICY: Policy = parse_policy({
    "allowedRoles": ["roles/aiplatform.user"],
    "workloadIdentity": {"projectId": "my-gke"},
    "federationPools": [
        "projects/42/locations/global/workloadIdentityPools/k8s",
        "projects/123456789012/locations/global/workloadIdentityPools/vertex-sidecar",
    ],
    "namespaces": [{
        "namespaces": [o.NS],
        "projects": ["my-gke", "my-vertex", "other-vertex", "my-project"],
        "serviceAccounts": ["*@my-vertex.iam.gserviceaccount.com", "*@my-gke.iam.gserviceaccount.com"],
    }],
    "routes": {"sidecarImages": ["registry.test/"]},
})
