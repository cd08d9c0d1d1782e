"""VertexCredential lifecycle: service account, IAM grants, status (see `credential_controller`).

The handlers only touch the credential itself (its status, kopf's finalizer) and what the
credential owns; user workloads are never handled here. Google errors do not make these
handlers fail: they become conditions, and the credential's daemon retries with a growing
delay. Kubernetes API errors do raise, so kopf retries the handler (with a growing delay).
"""

from __future__ import annotations

from typing import Any

import kopf

from vertex_operator.controller import RETRY_BACKOFF, Controller, describe_error, retry_delay
from vertex_operator.credential_controller import CleanupPending
from vertex_operator.crd import CREDENTIAL_PLURAL, GROUP, VERSION


@kopf.on.resume(GROUP, VERSION, CREDENTIAL_PLURAL, backoff=RETRY_BACKOFF)
@kopf.on.create(GROUP, VERSION, CREDENTIAL_PLURAL, backoff=RETRY_BACKOFF)
@kopf.on.update(GROUP, VERSION, CREDENTIAL_PLURAL, backoff=RETRY_BACKOFF)
async def credential_reconcile(body: kopf.Body, retry: int, memo: Any, logger: kopf.Logger, **_: Any) -> None:
    controller: Controller = memo.controller
    try:
        await controller.credentials.reconcile(body, trigger="credential", log=logger)
    except Exception as exc:
        raise kopf.TemporaryError(f"Reconciling the credential failed: {describe_error(exc)}",
                                  delay=retry_delay(retry)) from exc


@kopf.on.delete(GROUP, VERSION, CREDENTIAL_PLURAL, backoff=RETRY_BACKOFF)
async def credential_finalize(body: kopf.Body, retry: int, memo: Any, logger: kopf.Logger, **_: Any) -> None:
    # Routes that still refer to the credential report it (CredentialDeleted) through the
    # index; the finalizer only undoes what the credential made.
    controller: Controller = memo.controller
    try:
        await controller.credentials.finalize(body, log=logger)
    except CleanupPending as exc:
        raise kopf.TemporaryError(str(exc), delay=exc.delay) from None
    except Exception as exc:
        raise kopf.TemporaryError(f"Cleaning up the credential failed: {describe_error(exc)}",
                                  delay=retry_delay(retry)) from exc


# Cancelled 1 s after a stop request at the latest (a leader that steps down must not
# linger: a standby takes over only after it stopped); re-checks are level-based.
@kopf.daemon(GROUP, VERSION, CREDENTIAL_PLURAL, cancellation_timeout=1.0)
async def credential_recheck(stopped: kopf.DaemonStopped, body: kopf.Body, uid: str, memo: Any,
                             logger: kopf.Logger, **_: Any) -> None:
    """Re-converge when due: grants propagated, Config Connector progress, retries, resync."""
    controller: Controller = memo.controller
    while not stopped:
        await controller.credentials.wait_due(uid, stopped)
        if stopped or (body.get("metadata") or {}).get("deletionTimestamp"):
            break
        try:
            await controller.credentials.reconcile(body, trigger="credential-recheck", log=logger)
        except Exception as exc:  # kopf would stop the daemon; the next round retries
            logger.warning("Re-checking the credential failed: %s", exc)
            controller.credentials.retry_later(uid)
