"""Leader election: the Lease rules (pure), two electors racing on the emulated API server
(with a manual clock), and real operator processes: one leads, SIGKILL/SIGTERM hands over,
no duplicate writes, and the webhook keeps answering from the survivors."""

from __future__ import annotations

import asyncio
import pathlib
import ssl
import time
from typing import Any

import aiohttp
import pytest

from tests.operator import objects as o
from tests.operator.conftest import Cluster, check_requests, eventually, webhook_samples
from tests.operator.harness import KubeEmulator
from tests.operator.processes import OperatorProcess, admit, pod_review, start_process
from vertex_operator.kube import Kube
from vertex_operator.leadership import LeaderElector, LeaseRecord, NotLeader, Timing, decide

HASH = "vertex.passthrough.dev/config-hash"
TIMING = Timing(lease_duration=15, renew_deadline=10, retry_period=2)
# The processes' timings: short, but with room for a loaded CI machine.
LEASE = (3.0, 2.0, 0.3)


# ---------------------------------------------------------------- the rules


def record(holder: str, rv: str | None = "7", transitions: int = 0) -> LeaseRecord:
    return LeaseRecord(holder=holder, duration_seconds=15, acquire_time="t0", renew_time="t1",
                       transitions=transitions, resource_version=rv)


def test_a_held_lease_is_left_alone_until_it_was_seen_unchanged_for_its_duration() -> None:
    assert decide(record("a"), "b", observed_for=14.9, timing=TIMING, wall_time="now").spec is None
    taken = decide(record("a", transitions=3), "b", observed_for=15.0, timing=TIMING, wall_time="now")
    assert taken.spec is not None and taken.spec["holderIdentity"] == "b"
    assert taken.spec["leaseTransitions"] == 4 and taken.spec["acquireTime"] == "now"


def test_a_released_or_missing_lease_is_taken_at_once_and_a_renewal_keeps_the_acquire_time() -> None:
    released = decide(record(""), "b", observed_for=0, timing=TIMING, wall_time="now")
    assert released.spec is not None and released.reason == "acquire"
    created = decide(LeaseRecord(), "b", observed_for=0, timing=TIMING, wall_time="now")
    assert created.spec is not None and created.spec["leaseTransitions"] == 0
    renewed = decide(record("b", transitions=2), "b", observed_for=0, timing=TIMING, wall_time="now")
    assert renewed.spec is not None and renewed.reason == "renew"
    assert (renewed.spec["acquireTime"], renewed.spec["renewTime"], renewed.spec["leaseTransitions"]) == ("t0", "now", 2)


def test_a_longer_duration_in_the_record_is_honoured() -> None:
    longer = LeaseRecord(holder="a", duration_seconds=60, resource_version="1")
    assert decide(longer, "b", observed_for=30, timing=TIMING, wall_time="now").spec is None


def test_the_renew_deadline_must_end_before_the_lease_does() -> None:
    with pytest.raises(ValueError, match="renew deadline < lease duration"):
        Timing(lease_duration=10, renew_deadline=10, retry_period=2)


# ---------------------------------------------------------------- two electors, one API server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_never_two_holders_and_a_standby_takes_over_after_the_lease_duration(
        kube: KubeEmulator, kubeconfig: pathlib.Path) -> None:
    clock = Clock()
    api = Kube()
    try:
        a = LeaderElector(api, "vertex-system", identity="a", timing=TIMING, clock=clock)
        b = LeaderElector(api, "vertex-system", identity="b", timing=TIMING, clock=clock)

        def both_hold() -> bool:
            return a.holds() and b.holds()

        assert await a.try_acquire_or_renew() and not await b.try_acquire_or_renew()
        a.leading = True
        assert a.holds() and not b.holds()
        # a stops renewing (it hangs, or is cut off). Its fence closes at the renew deadline;
        # b may take over only once the record was unchanged for the lease duration.
        for _ in range(int(TIMING.lease_duration / TIMING.retry_period)):
            clock.now += TIMING.retry_period
            took = await b.try_acquire_or_renew()
            b.leading = b.leading or took
            assert not both_hold()
            if clock.now - 1000.0 >= TIMING.renew_deadline:
                assert not a.holds()
                with pytest.raises(NotLeader):
                    a.check()
            if clock.now - 1000.0 < TIMING.lease_duration:
                assert not took, f"taken over after {clock.now - 1000.0} s"
        clock.now += TIMING.retry_period
        assert await b.try_acquire_or_renew()
        b.leading = True
        assert b.holds() and not a.holds()
        # a comes back: it sees b's renewals and stays a standby.
        assert not await a.try_acquire_or_renew()
        lease = await api.read_lease("vertex-system", "vertex-operator-leader")
        assert lease is not None and lease["spec"]["holderIdentity"] == "b"
        assert lease["spec"]["leaseTransitions"] == 1
    finally:
        api.close()


async def test_racing_candidates_for_a_released_lease_exactly_one_wins(
        kube: KubeEmulator, kubeconfig: pathlib.Path) -> None:
    api = Kube()
    try:
        first = LeaderElector(api, "vertex-system", identity="first", timing=TIMING)
        assert await first.try_acquire_or_renew()
        await first.release()
        candidates = [LeaderElector(api, "vertex-system", identity=f"c{i}", timing=TIMING) for i in range(4)]
        won = await asyncio.gather(*(c.try_acquire_or_renew() for c in candidates))
        assert sum(won) == 1, won
        lease = await api.read_lease("vertex-system", "vertex-operator-leader")
        assert lease is not None and lease["spec"]["holderIdentity"] == candidates[won.index(True)].identity
    finally:
        api.close()


# ---------------------------------------------------------------- real processes


def ca_context(tls_files: dict[str, pathlib.Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_files["ca"]))


async def start_replicas(n: int, kubeconfig: pathlib.Path, tls_files: dict[str, pathlib.Path],
                         folder: pathlib.Path, google: Any) -> list[OperatorProcess]:
    extra = ("--iam-endpoint", google.url, "--resource-manager-endpoint", google.url)
    procs = [start_process(kubeconfig, tls_files, folder, f"op-{i}", lease=LEASE, extra=extra) for i in range(n)]

    async def all_ready() -> bool:
        for p in procs:
            assert p.alive, p.output()
        return all(await asyncio.gather(*(p.ready() for p in procs)))

    await eventually(all_ready, timeout=40, interval=0.1)
    return procs


async def the_leader(procs: list[OperatorProcess]) -> OperatorProcess:
    async def one() -> OperatorProcess:
        alive = [p for p in procs if p.alive]
        leading = [p for p, yes in zip(alive, await asyncio.gather(*(p.leading() for p in alive))) if yes]
        assert len(leading) == 1, [p.identity for p in leading]
        return leading[0]
    return await eventually(one, timeout=20, interval=0.05)


class AdmissionProbe:
    """Sends a selected pod's AdmissionReview to every replica every few ms; records the answers."""

    def __init__(self, procs: list[OperatorProcess], ca: ssl.SSLContext) -> None:
        self.procs, self.ca = procs, ca
        self.answers: dict[str, list[tuple[float, bool]]] = {p.identity: [] for p in procs}
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while not self._stop.is_set():
                started = time.monotonic()
                results = await asyncio.gather(*(admit(session, p.webhook_url, self.ca, pod_review(o.NS, {"app": "chat"}))
                                                 for p in self.procs))
                for p, ok in zip(self.procs, results):
                    self.answers[p.identity].append((started, ok))
                await asyncio.sleep(0.02)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    def availability(self, identity: str, since: float = 0.0) -> float:
        got = [ok for t, ok in self.answers[identity] if t >= since]
        return sum(got) / len(got) if got else 0.0

    def any_replica(self, since: float) -> float:
        """As a Service would see it if it still sent to every replica: some replica injected."""
        rounds = list(zip(*(self.answers[p.identity] for p in self.procs)))
        got = [any(ok for _, ok in r) for r in rounds if r[0][0] >= since]
        return sum(got) / len(got) if got else 0.0


async def stop_all(procs: list[OperatorProcess]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        if p.alive:
            try:
                await p.wait(15)
            except Exception:
                p.kill()
                raise AssertionError(f"{p.identity} did not stop on SIGTERM:\n{p.output()}") from None


def writes_by(kube: KubeEmulator, identity: str) -> list[int]:
    """Positions in the request log of the writes made by one replica's own client."""
    return [i for i, r in enumerate(list(kube._requests))
            if f"({identity})" in r.headers.get("User-Agent", "") and r.method.value in ("POST", "PATCH", "PUT", "DELETE")
            and "/leases" not in r.url.path]


def deployment_patches(kube: KubeEmulator, name: str) -> int:
    return sum(1 for r in list(kube._requests)
               if r.method.value == "PATCH" and r.url.path.endswith(f"/deployments/{name}"))


def versions(kube: KubeEmulator, plural: str, name: str) -> int:
    """How many versions of an object were stored: a write that changed nothing makes none."""
    found = [stored for key, stored in list(kube._objects.items()) if key[0].plural == plural and key[2] == name]
    assert len(found) == 1, (plural, name)
    return len({str(v.get("metadata", {}).get("resourceVersion")) for v in found[0].history})


async def test_three_replicas_sigkill_of_the_leader_mid_reconcile(
        kube: KubeEmulator, kubeconfig: pathlib.Path, cluster: Cluster, tls_files: dict[str, pathlib.Path],
        tmp_path: pathlib.Path, google: Any) -> None:
    n_workloads = 10
    # Each workload patch takes a while: the kill lands in the middle of the rollout.
    kube.slow("PATCH", r"/namespaces/team-a/deployments/", 0.15)
    await cluster.create(o.namespace())
    await cluster.create(o.credential())
    for i in range(n_workloads):
        await cluster.create(o.deployment(f"chat-{i}", labels={"app": "chat", "n": str(i)}))
    procs = await start_replicas(3, kubeconfig, tls_files, tmp_path, google)
    try:
        leader = await the_leader(procs)
        # Standbys write nothing of their own (their kopf has no changing handlers either).
        await cluster.create(o.route())
        probe = AdmissionProbe(procs, ca_context(tls_files))

        async def injected_everywhere() -> bool:
            async with aiohttp.ClientSession() as session:
                return all(await asyncio.gather(*(admit(session, p.webhook_url, probe.ca, pod_review(o.NS, {"app": "chat"}))
                                                  for p in procs)))
        try:
            await eventually(injected_everywhere, timeout=10)
        except AssertionError:
            raise AssertionError("\n\n".join(p.output() for p in procs)) from None
        probe.start()

        async def mid_rollout() -> bool:
            return sum(deployment_patches(kube, f"chat-{i}") for i in range(n_workloads)) >= 2
        await eventually(mid_rollout, timeout=15, interval=0.01)
        killed_at = time.monotonic()
        leader.kill()
        survivors = [p for p in procs if p is not leader]
        new_leader = await the_leader(survivors)
        took_over = time.monotonic() - killed_at

        async def converged() -> bool:
            for i in range(n_workloads):
                dep = await cluster.get("Deployment", o.NS, f"chat-{i}")
                assert dep is not None and HASH in (dep["spec"]["template"]["metadata"].get("annotations") or {}), i
            route = await cluster.get("VertexRoute", o.NS, "gemini")
            assert route is not None and (route.get("status") or {}).get("selectedWorkloads") == n_workloads
            return True
        try:
            await eventually(converged, timeout=20)
        except AssertionError:
            raise AssertionError("\n\n".join(p.output() for p in survivors)) from None
        converged_after = time.monotonic() - killed_at
        await asyncio.sleep(0.5)
        await probe.stop()

        # No duplicate writes: each workload rolled exactly once, the ConfigMap written once.
        # (A request that repeats what is there is a no-op for the API server: not counted.)
        assert [versions(kube, "deployments", f"chat-{i}") for i in range(n_workloads)] == [2] * n_workloads
        assert versions(kube, "configmaps", "vertex-sidecar-gemini") == 1
        # Never two writers: the killed leader's writes all came before the new leader's first.
        old, new = writes_by(kube, leader.identity), writes_by(kube, new_leader.identity)
        assert old and new and max(old) < min(new)
        for p in procs:
            if p is not leader and p is not new_leader:
                assert writes_by(kube, p.identity) == [], f"{p.identity} wrote as a standby"
        # The webhook answered from every survivor throughout.
        for p in survivors:
            assert probe.availability(p.identity) == 1.0, (p.identity, probe.availability(p.identity))
        assert probe.any_replica(killed_at) == 1.0
        print(f"\nSIGKILL of the leader: new leader after {took_over:.2f} s (lease {LEASE[0]} s, retry {LEASE[2]} s), "
              f"converged after {converged_after:.2f} s; admission availability from the survivors "
              f"{min(probe.availability(p.identity) for p in survivors):.4f} over "
              f"{len(probe.answers[survivors[0].identity])} reviews each, of the killed replica since the kill "
              f"{probe.availability(leader.identity, killed_at):.4f}")
        # Leadership and webhook metrics, scraped from the survivors' /metrics.
        assert await new_leader.metric("vertex_operator_leader") == 1.0
        assert await new_leader.metric("vertex_operator_leadership_changes_total", {"change": "acquired"}) == 1.0
        for p in survivors:
            if p is not new_leader:
                assert await p.metric("vertex_operator_leader") == 0.0
                assert await p.metric("vertex_operator_leadership_changes_total", {"change": "acquired"}) is None
            # Every review the probe sent it was injected and counted (plus the ones before it started).
            injected = await p.metric("vertex_operator_admissions_total", {"result": "injected"}) or 0
            assert injected >= len(probe.answers[p.identity]), (p.identity, injected)
            assert await p.metric("vertex_operator_admissions_total", {"result": "error"}) is None
    finally:
        await stop_all(procs)
    check_requests(kube)


async def test_two_replicas_a_clean_shutdown_hands_over_at_once(
        kube: KubeEmulator, kubeconfig: pathlib.Path, cluster: Cluster, tls_files: dict[str, pathlib.Path],
        tmp_path: pathlib.Path, google: Any) -> None:
    await cluster.create(o.namespace())
    await cluster.create(o.credential())
    await cluster.create(o.deployment())
    await cluster.create(o.route())
    procs = await start_replicas(2, kubeconfig, tls_files, tmp_path, google)
    try:
        leader = await the_leader(procs)
        # Started without --store-redis-url: each replica says at start that limits count per pod.
        assert all("No store configured (--store-redis-url): rate limits and budgets are counted per pod."
                   in p.log.read_text(errors="replace") for p in procs)

        async def converged() -> bool:
            credential = await cluster.get("VertexCredential", o.NS, "vertex")
            return (await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini") is not None
                    and bool(((credential or {}).get("status") or {}).get("conditions")))
        await eventually(converged, timeout=15)
        await asyncio.sleep(0.5)  # its daemons are running (kopf stops daemons it knows of at once)
        standby = next(p for p in procs if p is not leader)
        probe = AdmissionProbe([standby], ca_context(tls_files))
        probe.start()
        started = time.monotonic()
        leader.terminate()
        await the_leader([standby])
        handover = time.monotonic() - started
        assert await leader.wait(30) == 0, leader.output()
        # Released, not expired: before the lease duration would have run out.
        assert handover < LEASE[0], handover
        await cluster.patch("VertexRoute", o.NS, "gemini", {"spec": {"defaults": {"location": "us-central1"}}})

        async def reconciled_by_the_new_leader() -> bool:
            cm = await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini")
            return cm is not None and "us-central1" in str(cm["data"])
        await eventually(reconciled_by_the_new_leader, timeout=10)
        await probe.stop()
        assert probe.availability(standby.identity) == 1.0
        print(f"\nSIGTERM of the leader: handover after {handover:.2f} s; admission availability of the "
              f"standby {probe.availability(standby.identity):.4f} over {len(probe.answers[standby.identity])} reviews")
    finally:
        await stop_all(procs)
    check_requests(kube)


# ---------------------------------------------------------------- readiness = answers correctly


async def test_a_replica_refuses_to_admit_until_its_indexes_are_complete(
        kube: KubeEmulator, cluster: Cluster, start_operator: Any, tls_files: dict[str, pathlib.Path]) -> None:
    from tests.operator.processes import free_port

    await cluster.create(o.namespace())
    await cluster.create(o.credential())
    await cluster.create(o.route())
    # kopf's initial list of routes arrives late: its index is incomplete meanwhile.
    kube.slow("GET", r"/vertexroutes$", 3.0, user_agent="kopf/")
    port = free_port()
    op = await start_operator(readiness_port=port)
    ca = ca_context(tls_files)
    url = f"{op.webhook_url.rstrip('/')}/inject-vertex-sidecar"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        review = pod_review(o.NS, {"app": "chat"})
        before = webhook_samples()
        async with session.post(url, json=review, ssl=ca) as response:
            answer = (await response.json())["response"]
        # Refused, not admitted without its sidecar ("no VertexRoute selects it").
        assert answer["allowed"] is False and answer["status"]["code"] == 503, answer
        assert "still loading" in answer["status"]["message"]
        # ... and counted as a webhook failure (alert VertexOperatorWebhookErrors); the readiness
        # probe's own reviews, refused too meanwhile, are not counted.
        after = webhook_samples()
        assert (after["error"] - before["error"], after["admission_errors"] - before["admission_errors"],
                after["injected"] - before["injected"]) == (1, 1, 0)
        async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
            assert response.status == 503 and "refused" in (await response.json())["reason"]

        async def ready() -> bool:
            async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                return response.status == 200
        await eventually(ready, timeout=15)
        assert await admit(session, url, ca, pod_review(o.NS, {"app": "chat"}))
        assert webhook_samples()["injected"] - before["injected"] == 1


async def test_a_deposed_leader_writes_nothing_to_kubernetes_or_google(
        kube: KubeEmulator, kubeconfig: pathlib.Path, google: Any) -> None:
    """The fence end to end: the same Kubernetes and IAM clients the reconciling half uses,
    guarded by the elector's check; once the renew deadline passed without a renewal, every
    write is refused before it leaves the process (and counted), while reads still work."""
    from vertex_operator import gcp, metrics
    from vertex_operator.identity import edit_policy

    clock = Clock()
    api = Kube()
    iam = gcp.GoogleIam(google.url, google.url, backoff=gcp.Backoff(first=0.005, attempts=2))
    google.store.add_project("my-vertex", "111")

    def grant(namespace: str) -> gcp.Edit:
        member = f"serviceAccount:my-gke.svc.id.goog[{namespace}/vertex]"
        return lambda policy: edit_policy(policy, add=[("roles/aiplatform.user", member)])

    try:
        leader = LeaderElector(api, "vertex-system", identity="a", timing=TIMING, clock=clock)
        assert await leader.try_acquire_or_renew()
        leader.leading = True
        api.write_guard = iam.write_guard = leader.check
        await api.create_config_map("default", {"metadata": {"name": "while-leading"}, "data": {"k": "v"}})
        assert (await iam.update_policy("project", "my-vertex", grant("team-a"))).changed
        sets_before = [c for c in google.store.calls if c[0] == "setIamPolicy"]

        fenced_before = metrics.FENCED_WRITES._value.get()
        clock.now += TIMING.renew_deadline  # no renewal since: a standby may soon take over
        with pytest.raises(NotLeader):
            await api.create_config_map("default", {"metadata": {"name": "after-deadline"}, "data": {"k": "v"}})
        with pytest.raises(NotLeader):
            await api.patch_config_map("default", "while-leading", {"data": {"k": "changed"}})
        with pytest.raises(NotLeader):
            await iam.update_policy("project", "my-vertex", grant("team-b"))
        assert metrics.FENCED_WRITES._value.get() == fenced_before + 3

        # Nothing reached either server; reads are not fenced.
        assert await api.read_config_map("default", "after-deadline") is None
        kept = await api.read_config_map("default", "while-leading")
        assert kept is not None and kept["data"] == {"k": "v"}
        assert [c for c in google.store.calls if c[0] == "setIamPolicy"] == sets_before
        assert "serviceAccount:my-gke.svc.id.goog[team-b/vertex]" not in google.store.members(
            "projects/my-vertex", "roles/aiplatform.user")
    finally:
        api.close()
        await iam.close()
