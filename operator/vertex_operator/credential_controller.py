"""Applies a VertexCredential: service account, federation ConfigMap, IAM grants, status.

One reconciliation per credential at a time (a lock per uid), whatever triggered it: the
kopf create/update/resume handlers, or the credential's daemon, which re-checks when a
grant has propagated, while Config Connector has not applied its objects yet, after
errors (with a growing delay), and every `resync_seconds`.

What the operator granted is recorded in `status.bindings` before it is granted (see
`credential_reconcile`); the freshest copy of that ledger lives here, in memory, because
the `body` a handler sees can lag behind our own last status write.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import time
from typing import Any, Iterable, Mapping

from kubernetes.client.exceptions import ApiException

from vertex_operator import conditions as cond
from vertex_operator import isolation, metrics, policy
from vertex_operator.credential_reconcile import (
    KCC_GROUP, KCC_PLURAL, KCC_VERSION, SECRET_WARNING, AccountDecision, CredentialStatus, Identity, Ledger,
    bound_condition, config_connector_condition, decide_service_account, federation_config_map,
    identity_of, ledger_from_status, ledger_to_status, manual_condition, policy_member_body,
    policy_member_name, project_to_look_up, propagating_condition, ready_condition, release_service_account,
)
from vertex_operator.crd import CREDENTIAL_KIND, MANAGED_BY, MANAGED_BY_LABEL, Credential, SpecError, parse_credential
from vertex_operator.gcp import Backoff, GoogleApiError, GoogleIam, NoCredentials, describe
from vertex_operator.identity import Grant, edit_policy, gcloud_commands, has_member
from vertex_operator.kube import Kube
from vertex_operator.options import Options

logger = logging.getLogger(__name__)


class CleanupPending(Exception):
    """Deletion cannot finish yet; retry after `delay` seconds (the message says why)."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


def _meta(body: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = body.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or "", meta.get("uid") or ""


def _by_resource(grants: Iterable[Grant]) -> dict[tuple[str, str], list[Grant]]:
    groups: dict[tuple[str, str], list[Grant]] = collections.defaultdict(list)
    for grant in sorted(grants):
        groups[(grant.kind, grant.target)].append(grant)
    return groups


def _parse_time(value: Any) -> float | None:
    try:
        return datetime.datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.timezone.utc).timestamp()
    except ValueError:
        return None


class CredentialController:
    def __init__(self, options: Options, kube: Kube | None = None, google: GoogleIam | None = None) -> None:
        self.options = options
        self.kube = kube
        self._google = google
        self._locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._ledgers: dict[str, Ledger] = {}  # uid → the grants we made (freshest copy)
        self._statuses: dict[str, dict[str, Any]] = {}  # uid → the status last written
        self._numbers: dict[str, str] = {}  # project id → number (never changes)
        self._granted_at: dict[str, float] = {}  # uid → wall time of our last grant (propagation)
        self._failures: dict[str, int] = collections.defaultdict(int)
        self._due: dict[str, float] = {}  # uid → monotonic time of the next re-check
        self._wakeups: dict[str, asyncio.Event] = {}

    @property
    def google(self) -> GoogleIam:
        if self._google is None:
            self._google = GoogleIam(self.options.iam_endpoint, self.options.resource_manager_endpoint,
                                     backoff=Backoff(first=self.options.iam_retry_seconds))
        return self._google

    async def close(self) -> None:
        if self._google is not None:
            await self._google.close()

    def forget(self, uid: str) -> None:
        for cache in (self._ledgers, self._statuses, self._granted_at, self._failures, self._due, self._wakeups):
            cache.pop(uid, None)

    # ---------------------------------------------------------------- scheduling

    def _schedule(self, uid: str, seconds: float) -> None:
        self._due[uid] = time.monotonic() + max(0.0, seconds)
        event = self._wakeups.get(uid)
        if event is not None:
            event.set()

    async def wait_due(self, uid: str, stopped: Any) -> None:
        """Sleep until the credential's next re-check is due (or `stopped`); for its daemon."""
        event = self._wakeups.setdefault(uid, asyncio.Event())
        while not stopped:
            event.clear()
            due = self._due.setdefault(uid, time.monotonic() + self.options.resync_seconds)
            delay = due - time.monotonic()
            if delay <= 0:
                return
            waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stopped.wait())]
            try:
                await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    def _next_delay(self, uid: str) -> float:
        """One more failure in a row: binding_recheck_seconds, doubled each time up to resync_seconds."""
        self._failures[uid] += 1
        delay = self.options.binding_recheck_seconds * 2.0 ** min(self._failures[uid] - 1, 10)
        return min(self.options.resync_seconds, delay)

    def retry_later(self, uid: str) -> None:
        """After an unexpected failure: the same growing delay as for a failed condition."""
        self._schedule(uid, self._next_delay(uid))

    def _after(self, uid: str, binding: cond.Condition, ready: cond.Condition) -> None:
        """When to look again, from the outcome of a reconciliation."""
        options = self.options
        if binding["reason"] == "Propagating":
            remaining = options.iam_propagation_seconds - (time.time() - self._granted_at.get(uid, time.time()))
            self._schedule(uid, min(options.resync_seconds, max(0.05, remaining)))
        elif binding["reason"] == "Waiting":
            self._schedule(uid, options.binding_recheck_seconds)
        elif ready["status"] == "False":
            self.retry_later(uid)
        else:
            self._failures.pop(uid, None)
            self._schedule(uid, options.resync_seconds)

    # ---------------------------------------------------------------- the ledger

    def _ledger(self, uid: str, status: Mapping[str, Any] | None) -> Ledger:
        if uid not in self._ledgers:
            self._ledgers[uid] = ledger_from_status(status)
        return self._ledgers[uid]

    async def _save_ledger(self, namespace: str, name: str, uid: str) -> None:
        assert self.kube is not None
        bindings = ledger_to_status(self._ledgers[uid])
        await self.kube.patch_credential_status(namespace, name, {"bindings": bindings})
        if uid in self._statuses:
            self._statuses[uid]["bindings"] = bindings

    # ---------------------------------------------------------------- reconciling

    async def reconcile(self, body: Mapping[str, Any], trigger: str = "credential",
                        log: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> dict[str, Any]:
        """Converge one credential; returns the status it wrote (or would have)."""
        _, _, uid = _meta(body)
        async with self._locks[uid]:
            if (body.get("metadata") or {}).get("deletionTimestamp"):
                # Being deleted (a daemon round may have waited for the lock while `finalize`
                # held it): whatever is granted or created now would outlive the credential.
                return dict(self._statuses.get(uid) or body.get("status") or {})
            with metrics.reconciling(trigger):
                return await self._reconcile(body, log or logger)

    async def _reconcile(self, body: Mapping[str, Any], log: Any) -> dict[str, Any]:
        assert self.kube is not None, "Controller.start() was not called"
        namespace, name, uid = _meta(body)
        status = dict(body.get("status") or {})
        try:
            credential = parse_credential(body)
        except SpecError as exc:
            message = f"The credential's spec is invalid: {exc}. Nothing was changed."
            problem = cond.condition("BindingReady", False, "InvalidSpec", message)
            result = CredentialStatus(
                generation=int((body.get("metadata") or {}).get("generation") or 0),
                service_account=status.get("serviceAccountName") or "", member=status.get("member"),
                ledger=self._ledger(uid, status), binding=problem,
                ready=cond.condition("Ready", False, "InvalidSpec", message))
            await self._write_status(namespace, name, uid, status, result)
            self._after(uid, problem, result.ready)
            return result.to_dict()
        ledger = self._ledger(uid, status)

        # The platform team's bounds first: out of them, nothing is created or granted.
        refusal = policy.spec_refusal(self.options.policy, credential, self.options.excluded_namespaces,
                                      writable=self.options.may_write(namespace))
        identity, lookup_error = (Identity(None), None) if refusal else await self._identity(credential)
        refusal = refusal or policy.grant_refusal(self.options.policy, credential, identity.grants)
        if refusal:
            return await self._refuse(credential, status, ledger, refusal, log)

        # The service account; a renamed one is released first.
        previous = status.get("serviceAccountName")
        if previous and previous != credential.service_account_name:
            await self._release_account(namespace, previous, credential.name, uid, log)
        account_problem = await self._ensure_account(credential, log)
        account_problem = account_problem or await self._ensure_federation(credential, log)

        # The grants.
        commands: list[str]
        if account_problem is not None and account_problem[0] == "ServiceAccountConflict":
            # Its member would name an account that is not this credential's: grant nothing.
            binding, commands = cond.condition("BindingReady", False, *account_problem), []
        elif lookup_error is not None:
            binding, commands = cond.condition("BindingReady", False, *describe(lookup_error)), []
        else:
            binding, commands = await self._bind(credential, identity, ledger, status, log)
        warnings = [SECRET_WARNING] if credential.mode == "secretRef" else []
        extra: list[cond.Condition] = []
        if credential.sidecar_pool is not None:
            isolated, more = await self._isolation(credential)
            extra.append(isolated)
            commands = [*more[:2], *commands, *more[2:]]  # pool setup, grants, then the check
            if isolated["status"] == "False":
                warnings.append(isolated["message"])
        ready = ready_condition(binding, account_problem, credential.service_account_name,
                                identity.member, warnings)
        result = CredentialStatus(
            generation=credential.generation, service_account=credential.service_account_name,
            member=identity.member, ledger=ledger, binding=binding, ready=ready,
            commands=commands, warnings=warnings, extra=extra)
        before = cond.find((self._statuses.get(uid) or status).get("conditions"), "Ready")
        await self._write_status(namespace, name, uid, status, result)
        if ready["status"] == "False" and ready["reason"] not in ("Propagating", "Waiting"):  # those are no errors
            metrics.ERRORS.labels("binding").inc()
            news = before is None or (before.get("reason"), before.get("message")) != (ready["reason"], ready["message"])
            # A warning (and so a Kubernetes Event) when the problem is new, not at every retry.
            (log.warning if news else log.debug)("VertexCredential %s/%s is not Ready (%s): %s", namespace, name,
                                                 ready["reason"], ready["message"])
        self._after(uid, binding, ready)
        return result.to_dict()

    async def _refuse(self, credential: Credential, status: Mapping[str, Any], ledger: Ledger,
                      refusal: policy.Refusal, log: Any) -> dict[str, Any]:
        """Out of the policy's bounds: undo what we granted earlier, grant and create nothing."""
        ns, name, uid = credential.namespace, credential.name, credential.uid
        message = refusal.message
        try:
            await self._revoke(ns, name, uid, dict(ledger), log)
        except (GoogleApiError, NoCredentials) as exc:
            message += f" Removing earlier grants failed (retried): {describe(exc)[1]}"
        problem = cond.condition("BindingReady", False, "NotAllowed", message)
        result = CredentialStatus(
            generation=credential.generation, service_account=credential.service_account_name, member=None,
            ledger=ledger, binding=problem, ready=cond.condition("Ready", False, "NotAllowed", message))
        before = cond.find((self._statuses.get(uid) or status).get("conditions"), "Ready")
        await self._write_status(ns, name, uid, status, result)
        if before is None or before.get("message") != message:
            log.warning("VertexCredential %s/%s is refused by the policy: %s", ns, name, message)
        metrics.ERRORS.labels("binding").inc()
        self._after(uid, problem, result.ready)
        return result.to_dict()

    async def _identity(self, credential: Credential) -> tuple[Identity, BaseException | None]:
        project = project_to_look_up(credential)
        number = None
        if project is not None:
            number = self._numbers.get(project)
            if number is None:
                try:
                    number = self._numbers[project] = await self.google.project_number(project)
                except (GoogleApiError, NoCredentials) as exc:
                    return identity_of(credential), exc
        return identity_of(credential, number), None

    async def _isolation(self, credential: Credential) -> tuple[cond.Condition, list[str]]:
        """sidecarOnly: the Isolated condition and, for manual, the setup and check commands."""
        pool = credential.sidecar_pool
        assert pool is not None
        wi = credential.workload_identity
        ns, ksa = credential.namespace, credential.service_account_name
        if wi is None:
            return cond.condition(
                "Isolated", True, "NoMetadataIdentity",
                "federation outside GKE: pods have no metadata-server identity, and the pool's principal is "
                "reachable only with the token mounted into the sidecar."), []
        gsa = wi.gcp_service_account
        projects = sorted(set(credential.binding_projects or ()) | {wi.project_id})
        if credential.binding_backend != "iamApi":
            return (isolation.manual_isolated_condition(),
                    [*isolation.setup_commands(pool, wi.project_id),
                     *isolation.check_commands(projects, gsa, wi.project_id, ns, ksa)])
        found: list[isolation.Exposure] = []
        checked: list[str] = []
        targets = [("project", p) for p in projects] + ([("serviceAccount", gsa)] if gsa else [])
        for kind, target in targets:
            try:
                policy = await self.google.get_policy(kind, target)  # type: ignore[arg-type]
            except (GoogleApiError, NoCredentials) as exc:
                reason, message = describe(exc)
                return cond.condition("Isolated", "Unknown", reason, f"Cannot read the IAM policy: {message}"), []
            resource = Grant(kind, target, "", "").resource  # type: ignore[arg-type]
            checked.append(resource)
            found += isolation.exposures(policy, resource, wi.project_id, ns, ksa, act_as=kind == "serviceAccount")
        return isolation.isolated_condition(found, checked), []

    # -- service account

    async def _ensure_account(self, credential: Credential, log: Any) -> tuple[str, str] | None:
        assert self.kube is not None
        ns, ksa = credential.namespace, credential.service_account_name
        current = await self.kube.read_service_account(ns, ksa)
        decision: AccountDecision = decide_service_account(credential, current)
        if decision.action == "conflict":
            return "ServiceAccountConflict", decision.message
        if decision.action == "create":
            assert decision.body is not None
            try:
                await self.kube.create_service_account(ns, decision.body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                # Created meanwhile (by a user, or our own earlier attempt): decide again.
                decision = decide_service_account(credential, await self.kube.read_service_account(ns, ksa))
                if decision.action == "conflict":
                    return "ServiceAccountConflict", decision.message
            else:
                metrics.WRITES.labels("ServiceAccount", "create").inc()
                log.info("Created ServiceAccount %s/%s for VertexCredential %s.", ns, ksa, credential.name)
                return None
        if decision.action == "patch":
            assert decision.body is not None
            await self.kube.patch_service_account(ns, ksa, decision.body)
            metrics.WRITES.labels("ServiceAccount", "update").inc()
            log.info("Updated ServiceAccount %s/%s (%s) for VertexCredential %s.", ns, ksa,
                     "owned" if decision.owned else "adopted", credential.name)
        return None

    async def _release_account(self, namespace: str, ksa: str, credential_name: str, uid: str, log: Any) -> None:
        assert self.kube is not None
        action, patch = release_service_account(credential_name, uid, await self.kube.read_service_account(namespace, ksa))
        if action == "delete":
            await self.kube.delete_service_account(namespace, ksa)
            metrics.WRITES.labels("ServiceAccount", "delete").inc()
            log.info("Deleted ServiceAccount %s/%s of VertexCredential %s.", namespace, ksa, credential_name)
        elif action == "patch":
            assert patch is not None
            await self.kube.patch_service_account(namespace, ksa, patch)
            metrics.WRITES.labels("ServiceAccount", "release").inc()
            log.info("Released ServiceAccount %s/%s (not ours: only our annotations were removed).", namespace, ksa)

    # -- federation

    async def _ensure_federation(self, credential: Credential, log: Any) -> tuple[str, str] | None:
        assert self.kube is not None
        fed = credential.federation
        if fed is None:
            return None
        ns = credential.namespace
        current = await self.kube.read_config_map(ns, fed.config_map_name)
        desired = federation_config_map(credential)
        if desired is None:
            # The user's own ConfigMap: only check that it is there.
            if current is None or fed.config_map_key not in (current.get("data") or {}):
                what = "does not exist" if current is None else f"has no key {fed.config_map_key!r}"
                return ("CredentialConfigNotFound",
                        f"ConfigMap {fed.config_map_name} {what}: create it with the output of gcloud iam "
                        "workload-identity-pools create-cred-config ... --credential-source-file="
                        "/var/run/secrets/vertex/federation/token, or drop spec.federation.credentialConfig "
                        "to let the operator render it.")
            return None
        if current is None:
            await self.kube.create_config_map(ns, desired)
            metrics.WRITES.labels("ConfigMap", "create").inc()
            log.info("Created ConfigMap %s/%s (federation credential configuration).", ns, fed.config_map_name)
            return None
        meta = current.get("metadata") or {}
        if not any(r.get("uid") == credential.uid for r in meta.get("ownerReferences") or []):
            return ("ConfigMapConflict",
                    f"ConfigMap {fed.config_map_name} exists and was not rendered for this credential; rename "
                    "or delete it, or point spec.federation.credentialConfig at it.")
        if current.get("data") != desired["data"]:
            await self.kube.patch_config_map(ns, fed.config_map_name, {"data": desired["data"]})
            metrics.WRITES.labels("ConfigMap", "update").inc()
        return None

    # -- bindings

    async def _bind(self, credential: Credential, identity: Identity, ledger: Ledger,
                    status: Mapping[str, Any], log: Any) -> tuple[cond.Condition, list[str]]:
        """Apply the grants with the spec's backend; returns BindingReady and manual commands."""
        backend = credential.binding_backend
        desired = set(identity.grants)
        if identity.problem is not None:
            return cond.condition("BindingReady", False, *identity.problem), []
        # What we granted that is no longer wanted, or was granted by another backend, goes first.
        stale = {g: b for g, b in ledger.items() if b != backend or g not in desired}
        try:
            await self._revoke(credential.namespace, credential.name, credential.uid, stale, log)
        except (GoogleApiError, NoCredentials) as exc:
            return cond.condition("BindingReady", False, *describe(exc)), []
        if credential.mode == "secretRef":
            return cond.condition("BindingReady", True, "NotApplicable",
                                  "A service account key is its own identity: nothing to bind."), []
        if backend == "manual":
            return manual_condition(identity.grants), gcloud_commands(identity.grants)
        if backend == "configConnector":
            return await self._bind_config_connector(credential, desired, ledger, log), []
        return await self._bind_iam(credential, desired, ledger, status, log), []

    async def _bind_iam(self, credential: Credential, desired: set[Grant], ledger: Ledger,
                        status: Mapping[str, Any], log: Any) -> cond.Condition:
        ns, name, uid = credential.namespace, credential.name, credential.uid
        granted = False
        error: BaseException | None = None
        for (kind, target), grants in _by_resource(desired).items():
            recorded: list[Grant] = []  # what this update wrote ahead into the ledger

            def edit(policy: dict[str, Any], grants: list[Grant] = grants) -> tuple[dict[str, Any], bool]:
                return edit_policy(policy, add=[(g.role, g.member) for g in grants])

            async def before_write(old: dict[str, Any], new: dict[str, Any], grants: list[Grant] = grants,
                                   recorded: list[Grant] = recorded) -> None:
                adding = [g for g in grants if not has_member(old, g.role, g.member) and ledger.get(g) != "iamApi"]
                if adding:
                    ledger.update({g: "iamApi" for g in adding})
                    recorded.extend(adding)
                    await self._save_ledger(ns, name, uid)

            try:
                result = await self.google.update_policy(kind, target, edit, before_write)  # type: ignore[arg-type]
            except (GoogleApiError, NoCredentials) as exc:
                if recorded and not (isinstance(exc, GoogleApiError) and exc.transient):
                    for g in recorded:  # refused for sure: nothing of it was written
                        ledger.pop(g, None)
                    await self._save_ledger(ns, name, uid)
                error = error or exc
                continue
            if result.changed:
                granted = True
                metrics.WRITES.labels("IAMPolicy", "grant").inc()
                log.info("Granted %s (after %d attempt(s)).", "; ".join(g.describe() for g in grants), result.attempts)
        if error is not None:
            return cond.condition("BindingReady", False, *describe(error))
        if granted:
            self._granted_at[uid] = time.time()
        started = self._granted_at.get(uid)
        if started is None:
            # After a restart: the transition time of a Propagating condition we wrote.
            previous = cond.find((self._statuses.get(uid) or status).get("conditions"), "BindingReady")
            if previous is not None and previous.get("reason") == "Propagating":
                started = _parse_time(previous.get("lastTransitionTime"))
                if started is not None:
                    self._granted_at[uid] = started
        remaining = self.options.iam_propagation_seconds - (time.time() - started) if started else 0
        if remaining > 0:
            return propagating_condition(desired, remaining)
        return bound_condition(desired)

    async def _bind_config_connector(self, credential: Credential, desired: set[Grant], ledger: Ledger,
                                     log: Any) -> cond.Condition:
        assert self.kube is not None
        ns, name, uid = credential.namespace, credential.name, credential.uid
        objects: list[tuple[Grant, Mapping[str, Any] | None]] = []
        for grant in sorted(desired):
            object_name = policy_member_name(name, grant)
            obj = await self.kube.read_custom(KCC_GROUP, KCC_VERSION, KCC_PLURAL, ns, object_name)
            if obj is None:
                if ledger.get(grant) != "configConnector":
                    ledger[grant] = "configConnector"
                    await self._save_ledger(ns, name, uid)
                try:
                    obj = await self.kube.create_custom(KCC_GROUP, KCC_VERSION, KCC_PLURAL, ns,
                                                        policy_member_body(credential, grant))
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                    ledger.pop(grant, None)
                    await self._save_ledger(ns, name, uid)
                    return cond.condition(
                        "BindingReady", False, "ConfigConnectorMissing",
                        "Config Connector is not installed in this cluster (no iampolicymembers."
                        f"{KCC_GROUP} resource): install it, or set spec.binding.backend to iamApi or manual.")
                metrics.WRITES.labels("IAMPolicyMember", "create").inc()
                log.info("Created IAMPolicyMember %s/%s: %s.", ns, object_name, grant.describe())
            elif grant not in ledger and (obj.get("metadata", {}).get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY:
                ledger[grant] = "configConnector"  # ours, from before a lost status write
                await self._save_ledger(ns, name, uid)
            objects.append((grant, obj))
        if not objects:
            return bound_condition(())
        return config_connector_condition(objects)

    async def _revoke(self, namespace: str, name: str, uid: str, grants: Mapping[Grant, str], log: Any) -> None:
        """Remove exactly these grants (each by the backend that made it) and forget them."""
        assert self.kube is not None
        ledger = self._ledgers[uid]
        for grant in sorted(g for g, b in grants.items() if b == "configConnector"):
            object_name = policy_member_name(name, grant)
            found = await self.kube.read_custom(KCC_GROUP, KCC_VERSION, KCC_PLURAL, namespace, object_name)
            if found is not None and not (found.get("metadata") or {}).get("deletionTimestamp"):
                await self.kube.delete_custom(KCC_GROUP, KCC_VERSION, KCC_PLURAL, namespace, object_name)
                metrics.WRITES.labels("IAMPolicyMember", "delete").inc()
                log.info("Deleted IAMPolicyMember %s/%s (%s).", namespace, object_name, grant.describe())
                found = await self.kube.read_custom(KCC_GROUP, KCC_VERSION, KCC_PLURAL, namespace, object_name)
            # Config Connector removes the binding before the object goes: ours until then.
            if found is None and ledger.get(grant) == "configConnector":
                ledger.pop(grant)
                await self._save_ledger(namespace, name, uid)
        iam = [g for g, b in grants.items() if b == "iamApi"]
        for (kind, target), items in _by_resource(iam).items():
            def edit(policy: dict[str, Any], items: list[Grant] = items) -> tuple[dict[str, Any], bool]:
                return edit_policy(policy, remove=[(g.role, g.member) for g in items])

            try:
                result = await self.google.update_policy(kind, target, edit)  # type: ignore[arg-type]
            except GoogleApiError as exc:
                if not (exc.code == 404 and kind == "serviceAccount"):
                    raise
                # The Google service account is gone, and its policy with it.
            else:
                if result.changed:
                    metrics.WRITES.labels("IAMPolicy", "revoke").inc()
                    log.info("Revoked %s.", "; ".join(g.describe() for g in items))
            for g in items:
                ledger.pop(g, None)
            await self._save_ledger(namespace, name, uid)

    # -- status

    async def _write_status(self, namespace: str, name: str, uid: str, current: Mapping[str, Any],
                            result: CredentialStatus) -> None:
        assert self.kube is not None
        desired = result.to_dict()
        last = self._statuses.get(uid)
        if cond.same_status(last if last is not None else current, desired):
            return
        status = dict(desired)
        base = last if last is not None else current
        status["conditions"] = cond.merge(base.get("conditions"), desired["conditions"])
        for key in set(current) | set(last or {}):  # merge patches keep what they do not mention
            if key not in status:
                status[key] = None
        if await self.kube.patch_credential_status(namespace, name, status):
            metrics.WRITES.labels(CREDENTIAL_KIND, "status").inc()
            self._statuses[uid] = {k: v for k, v in status.items() if v is not None}

    # ---------------------------------------------------------------- deletion

    async def finalize(self, body: Mapping[str, Any],
                       log: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> None:
        """Remove the grants we made, then release the service account; raises CleanupPending."""
        namespace, name, uid = _meta(body)
        log = log or logger
        async with self._locks[uid]:
            assert self.kube is not None
            status = dict(body.get("status") or {})
            ledger = self._ledger(uid, status)
            try:
                await self._revoke(namespace, name, uid, dict(ledger), log)
            except (GoogleApiError, NoCredentials) as exc:
                reason, message = describe(exc)
                await self._report_blocked(namespace, name, uid, status, reason, message)
                raise CleanupPending(f"cannot remove the IAM grants yet: {message}", self._next_delay(uid)) from None
            if ledger:
                left = ", ".join(policy_member_name(name, g) for g in sorted(ledger))
                message = (f"Waiting for Config Connector to delete IAMPolicyMember {left} (it removes their IAM "
                           "bindings first; kubectl describe iampolicymember shows why it has not).")
                await self._report_blocked(namespace, name, uid, status, "ConfigConnectorDeleting", message)
                raise CleanupPending(message, self._next_delay(uid))
            try:
                ksa = parse_credential(body).service_account_name
            except SpecError:
                ksa = status.get("serviceAccountName") or ""
            for account in {ksa, status.get("serviceAccountName") or ""} - {""}:
                await self._release_account(namespace, account, name, uid, log)
        self.forget(uid)
        self._locks.pop(uid, None)

    async def _report_blocked(self, namespace: str, name: str, uid: str, status: Mapping[str, Any],
                              reason: str, message: str) -> None:
        blocked = (f"Deleting this credential waits until the IAM grants it made are removed: {message} "
                   "To give up and leave them in place, remove the finalizer: kubectl patch "
                   f"vertexcredential {name} -n {namespace} --type=merge -p "
                   "'{\"metadata\":{\"finalizers\":null}}'")
        conditions = [cond.condition("Ready", False, "DeletionBlocked", blocked),
                      cond.condition("BindingReady", False, reason, message)]
        base = self._statuses.get(uid) or status
        if cond.same_status({"conditions": base.get("conditions")}, {"conditions": conditions}):
            return  # said already: a retry that changes nothing writes nothing
        merged = cond.merge(base.get("conditions"), conditions)
        if await self.kube.patch_credential_status(namespace, name, {"conditions": merged}):  # type: ignore[union-attr]
            self._statuses[uid] = {**base, "conditions": merged}
