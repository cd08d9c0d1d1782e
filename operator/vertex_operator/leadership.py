"""Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it.

Every replica serves the webhook; only the holder of the Lease reconciles. The rules
(client-go's `leaderelection`):

* A candidate may take the Lease when nobody holds it, or when the record it last saw has
  not changed for `lease_duration` seconds *by its own clock*: it times the observation,
  never trusts the timestamps in the record, so clock skew between nodes does not matter.
* Every write is a `replace` with the `resourceVersion` read just before: of two
  candidates racing for an expired Lease exactly one succeeds, the other gets 409.
* The leader renews every `retry_period`. It counts as leader (`holds()`) only until
  `renew_deadline` after the start of its last successful renewal, and `renew_deadline <
  lease_duration`: a leader cut off from the API server stops writing before any standby
  may take over, which is what keeps two leaders from ever writing at once.
* On shutdown the leader releases the Lease (empty holder), so a standby takes over at its
  next attempt instead of waiting for the Lease to expire.

`decide` is the pure part (what to write, given a record and what was observed); the
`LeaderElector` does the reads and writes and keeps the time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import os
import socket
import time
import uuid
from typing import Any, Awaitable, Callable, Mapping, Protocol

from kubernetes.client.exceptions import ApiException

from vertex_operator import metrics

logger = logging.getLogger(__name__)

DEFAULT_LEASE_NAME = "vertex-operator-leader"


@dataclasses.dataclass(frozen=True)
class Timing:
    """client-go's defaults: a standby takes over at most lease_duration + retry_period after
    the leader's last renewal (17 s); on a graceful shutdown within one retry_period (2 s)."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("leader election needs 0 < retry period < renew deadline < lease duration "
                             f"(got {self.retry_period}, {self.renew_deadline}, {self.lease_duration})")

    @property
    def takeover_seconds(self) -> float:
        """Longest time without a leader after the leader died (not counting API latency)."""
        return self.lease_duration + self.retry_period


@dataclasses.dataclass(frozen=True)
class LeaseRecord:
    """The spec of a Lease, and its resourceVersion (None: the Lease does not exist)."""

    holder: str = ""
    duration_seconds: int = 0
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0
    resource_version: str | None = None

    @classmethod
    def from_lease(cls, lease: Mapping[str, Any] | None) -> LeaseRecord:
        if lease is None:
            return cls()
        spec = lease.get("spec") or {}
        return cls(
            holder=spec.get("holderIdentity") or "",
            duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
            resource_version=(lease.get("metadata") or {}).get("resourceVersion"),
        )

    @property
    def exists(self) -> bool:
        return self.resource_version is not None

    def key(self) -> tuple[str, str | None, str | None]:
        """What identifies one renewal: a changed key means the holder is alive."""
        return (self.holder, self.renew_time, self.resource_version)


def micro_time(now: datetime.datetime | None = None) -> str:
    """A `metav1.MicroTime` (RFC 3339 with microseconds, UTC)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclasses.dataclass(frozen=True)
class Decision:
    """What a candidate does with the Lease now: nothing (`spec` None), or write `spec`."""

    spec: dict[str, Any] | None
    reason: str


def decide(record: LeaseRecord, identity: str, *, observed_for: float, timing: Timing,
           wall_time: str) -> Decision:
    """Take or renew the Lease, or leave it to its holder.

    `observed_for`: seconds since this candidate first saw `record` unchanged (its own clock).
    """
    ours = record.holder == identity
    if record.exists and record.holder and not ours and observed_for < record_duration(record, timing):
        return Decision(None, f"held by {record.holder}")
    spec: dict[str, Any] = {
        "holderIdentity": identity,
        "leaseDurationSeconds": max(1, round(timing.lease_duration)),
        "renewTime": wall_time,
        "acquireTime": record.acquire_time if ours and record.acquire_time else wall_time,
        "leaseTransitions": record.transitions if ours or not record.exists else record.transitions + 1,
    }
    if ours:
        return Decision(spec, "renew")
    return Decision(spec, "acquire" if not record.holder else f"take over from {record.holder} (expired)")


def record_duration(record: LeaseRecord, timing: Timing) -> float:
    """How long a holder's record stays valid: what it says, never less than ours."""
    return max(float(record.duration_seconds), timing.lease_duration)


class LeaseApi(Protocol):
    async def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    async def create_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]: ...
    async def replace_lease(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]: ...


def default_identity() -> str:
    """The pod name (unique among replicas) plus a random part (a restarted container is a
    new candidate, never mistaken for the old holder)."""
    base = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{base}_{uuid.uuid4().hex[:8]}"


class NotLeader(Exception):
    """A write was attempted by a replica that does not (or no longer surely) hold the Lease."""


class LeaderElector:
    def __init__(self, api: LeaseApi, namespace: str, name: str = DEFAULT_LEASE_NAME, *,
                 identity: str | None = None, timing: Timing = Timing(),
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[bool], Awaitable[None] | None] | None = None) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.timing = timing
        self.clock = clock
        self.on_change = on_change
        self.leading = False
        self._changed = asyncio.Condition()
        self._renewed_at: float | None = None  # clock() at the start of the last successful write
        self._observed: tuple[tuple[str, str | None, str | None], float] | None = None
        self.leader: str = ""  # the holder last seen (for logs and metrics)

    # ------------------------------------------------------------------ state

    def holds(self) -> bool:
        """Whether this replica may write now: it leads, and its last renewal is recent enough
        that no standby can have taken over yet."""
        return (self.leading and self._renewed_at is not None
                and self.clock() < self._renewed_at + self.timing.renew_deadline)

    def check(self) -> None:
        """The write fence: raises NotLeader unless `holds()`."""
        if not self.holds():
            metrics.FENCED_WRITES.inc()
            raise NotLeader(f"{self.identity} does not hold the Lease {self.namespace}/{self.name}")

    async def _set_leading(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        metrics.LEADER.set(1 if leading else 0)
        metrics.LEADERSHIP_CHANGES.labels("acquired" if leading else "lost").inc()
        logger.info("%s %s the Lease %s/%s.", self.identity, "acquired" if leading else "lost",
                    self.namespace, self.name)
        async with self._changed:
            self._changed.notify_all()
        if self.on_change is not None:
            result = self.on_change(leading)
            if result is not None:
                await result

    async def wait_until(self, leading: bool) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.leading == leading)

    # ------------------------------------------------------------------ one attempt

    async def try_acquire_or_renew(self) -> bool:
        started = self.clock()
        try:
            current = await self.api.read_lease(self.namespace, self.name)
        except Exception as exc:
            logger.warning("Reading the Lease %s/%s failed: %s", self.namespace, self.name, exc)
            return False
        record = LeaseRecord.from_lease(current)
        self.leader = record.holder
        if self._observed is None or self._observed[0] != record.key():
            self._observed = (record.key(), started)
        decision = decide(record, self.identity, observed_for=started - self._observed[1],
                          timing=self.timing, wall_time=micro_time())
        if decision.spec is None:
            return False
        body: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": decision.spec,
        }
        try:
            if record.exists:
                body["metadata"]["resourceVersion"] = record.resource_version
                await self.api.replace_lease(self.namespace, self.name, body)
            else:
                await self.api.create_lease(self.namespace, body)
        except ApiException as exc:
            if exc.status in (409, 422):  # someone else wrote first (or created it first)
                logger.debug("Lost the race for the Lease %s/%s (%s).", self.namespace, self.name, exc.status)
            else:
                logger.warning("Writing the Lease %s/%s failed: %s %s", self.namespace, self.name,
                               exc.status, exc.reason)
            return False
        except Exception as exc:
            logger.warning("Writing the Lease %s/%s failed: %s", self.namespace, self.name, exc)
            return False
        if decision.reason != "renew":
            logger.info("%s: %s the Lease %s/%s.", self.identity, decision.reason, self.namespace, self.name)
        self._renewed_at = started
        self.leader = self.identity
        return True

    # ------------------------------------------------------------------ the loop

    async def run(self, stopped: asyncio.Event) -> None:
        """Take part in the election until `stopped`; release the Lease when leading."""
        try:
            while not stopped.is_set():
                try:
                    # A leader's attempt must end before its deadline, so that it steps down in time.
                    budget = (self._renewed_at + self.timing.renew_deadline - self.clock()
                              if self.leading and self._renewed_at is not None else None)
                    ok = await asyncio.wait_for(self.try_acquire_or_renew(),
                                                timeout=max(0.05, budget) if budget is not None else None)
                except asyncio.TimeoutError:
                    ok = False
                if ok:
                    await self._set_leading(True)
                elif self.leading and not self.holds():
                    logger.warning("%s could not renew the Lease within %.1f s: stepping down.",
                                   self.identity, self.timing.renew_deadline)
                    await self._set_leading(False)
                elif self.leading and self.leader and self.leader != self.identity:
                    await self._set_leading(False)  # someone else holds it now
                pause = self.timing.retry_period
                if self.leading and self._renewed_at is not None:
                    pause = min(pause, max(0.0, self._renewed_at + self.timing.renew_deadline - self.clock()))
                await _wait(stopped, pause)
        finally:
            was_leading = self.leading
            await self._set_leading(False)
            if was_leading:
                await self.release()

    async def release(self) -> None:
        """Give the Lease up (if still ours), so that a standby need not wait for it to expire."""
        try:
            record = LeaseRecord.from_lease(await self.api.read_lease(self.namespace, self.name))
            if record.holder != self.identity:
                return
            spec = {"holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": micro_time(),
                    "acquireTime": record.acquire_time, "leaseTransitions": record.transitions}
            await self.api.replace_lease(self.namespace, self.name, {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": record.resource_version},
                "spec": spec})
            logger.info("%s released the Lease %s/%s.", self.identity, self.namespace, self.name)
        except Exception as exc:  # it expires on its own
            logger.warning("Releasing the Lease %s/%s failed: %s", self.namespace, self.name, exc)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass
