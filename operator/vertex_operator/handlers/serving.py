"""The serving half of the operator, run by every replica: the webhook and what it reads.

kopf runs one registry per operator. Every replica runs this one (`SERVING`): indexes of
routes and credentials (all the webhook needs) and the Pod mutating webhook; it never
writes to the cluster (no changing handlers, no finalizers, no Events). Reconciliation
(the default registry: the other modules of this package) runs only in the replica that
holds the leader Lease, as a second kopf operator (see `vertex_operator.cli.run`).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from vertex_operator.controller import Controller
from vertex_operator.crd import CREDENTIAL_PLURAL, GROUP, ROUTE_PLURAL, VERSION
from vertex_operator.reconcile import CredentialRecord, RouteRecord, credential_record, route_record

SERVING = kopf.OperatorRegistry()


@kopf.index(GROUP, VERSION, ROUTE_PLURAL, id="vertexroute_index", registry=SERVING)
def vertexroute_index(body: kopf.Body, namespace: str | None, **_: Any) -> dict[str, RouteRecord]:
    return {namespace or "": route_record(body)}


@kopf.index(GROUP, VERSION, CREDENTIAL_PLURAL, id="vertexcredential_index", registry=SERVING)
def vertexcredential_index(body: kopf.Body, namespace: str | None, **_: Any) -> dict[str, CredentialRecord]:
    return {namespace or "": credential_record(body)}


@kopf.on.login(registry=SERVING)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # As the default registry does: the kubernetes client's configuration (in-cluster or KUBECONFIG).
    return kopf.login_via_client(**kwargs)


@kopf.on.startup(registry=SERVING)
async def configure_serving(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    controller: Controller = memo.controller
    settings.scanning.disabled = True
    # Nothing of kopf's own is ever written by the serving half.
    settings.posting.enabled = False
    settings.admission.server = controller.webhook_server
    settings.admission.managed = controller.options.webhook_managed
    logging.getLogger(__name__).debug("Serving the webhook (every replica).")
