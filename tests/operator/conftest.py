"""Fixtures of the operator tests: an emulated API server, a client to arrange and assert
with, the real operator (kopf) in a thread, webhook TLS material, and the RBAC record.

The operator runs in its own thread and event loop, as in production, so that kopf's
task management never touches the emulator's server tasks; the test's `kubernetes`
client is synchronous and runs in worker threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import json
import os
import pathlib
import threading
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import kmock
import kubernetes.client
import kubernetes.config.kube_config
import pytest
import pytest_asyncio
import yaml

from tests.emulators.iam_policy import PolicyStore, create_iam_policy_app
from tests.emulators.oauth import create_oauth_app, make_service_account_key
from tests.emulators.serve import async_running_server
from tests.emulators.tokens import TokenRegistry
from tests.operator.harness import KubeEmulator

HERE = pathlib.Path(__file__).resolve().parent
RBAC_FILE = HERE / "rbac_requests.json"
OPERATOR_AGENTS = ("kopf/", "vertex-operator/")
GROUP, VERSION = "vertex.passthrough.dev", "v1alpha1"
# Set VERTEX_RBAC_UPDATE=1 to rewrite rbac_requests.json from what the tests observed.
UPDATE_RBAC = os.environ.get("VERTEX_RBAC_UPDATE") == "1"
OBSERVED_REQUESTS: set[tuple[str, str, str]] = set()


def pytest_configure(config: pytest.Config) -> None:
    # kmock 0.8 loads its bundled discovery data with a deprecated importlib call.
    config.addinivalue_line("filterwarnings", "ignore:read_binary is deprecated:DeprecationWarning")


def load_rbac_file() -> set[tuple[str, str, str]]:
    if not RBAC_FILE.exists():
        return set()
    return {tuple(item) for item in json.loads(RBAC_FILE.read_text())}  # type: ignore[misc]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if UPDATE_RBAC and OBSERVED_REQUESTS:
        data = sorted(OBSERVED_REQUESTS)  # run the whole operator suite when updating
        RBAC_FILE.write_text(json.dumps([list(t) for t in data], indent=2) + "\n")


# ---------------------------------------------------------------- polling


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Await `check()` until it returns without AssertionError (and not None/False)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = await check()
            if result is not None and result is not False:
                return result
            error: BaseException | None = AssertionError(f"{check} returned {result!r}")
        except AssertionError as exc:
            error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {error}") from error
        await asyncio.sleep(interval)


# ---------------------------------------------------------------- API server


@pytest_asyncio.fixture()
async def kube() -> AsyncIterator[KubeEmulator]:
    async with KubeEmulator() as emulator, kmock.Server(emulator):
        yield emulator


@pytest.fixture()
def kubeconfig(kube: KubeEmulator, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A kubeconfig for the emulator, found by kopf and the operator through KUBECONFIG."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": str(kube.url).rstrip("/")}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(path))
    # The client computed its default location at import time; kopf's login uses that.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return path


# ---------------------------------------------------------------- client


class Cluster:
    """The official client, in threads, with plain dicts in and out."""

    NAMESPACED = {
        "ConfigMap": ("core", "namespaced_config_map"),
        "Pod": ("core", "namespaced_pod"),
        "Secret": ("core", "namespaced_secret"),
        "ServiceAccount": ("core", "namespaced_service_account"),
        "Deployment": ("apps", "namespaced_deployment"),
        "StatefulSet": ("apps", "namespaced_stateful_set"),
        "DaemonSet": ("apps", "namespaced_daemon_set"),
    }
    CUSTOM = {
        "VertexRoute": (GROUP, VERSION, "vertexroutes"),
        "VertexCredential": (GROUP, VERSION, "vertexcredentials"),
        "IAMPolicyMember": ("iam.cnrm.cloud.google.com", "v1beta1", "iampolicymembers"),
    }

    def __init__(self, url: str) -> None:
        configuration = kubernetes.client.Configuration()
        configuration.host = url.rstrip("/")
        self.api_client = kubernetes.client.ApiClient(configuration)
        self.core = kubernetes.client.CoreV1Api(self.api_client)
        self.apps = kubernetes.client.AppsV1Api(self.api_client)
        self.custom = kubernetes.client.CustomObjectsApi(self.api_client)

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        response = await asyncio.to_thread(fn, *args, _preload_content=False, **kwargs)
        return json.loads(response.data) if response.data else None

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind = obj["kind"]
        ns = obj["metadata"].get("namespace")
        if kind == "Namespace":
            return await self._call(self.core.create_namespace, obj)
        if kind in self.CUSTOM:
            return await self._call(self.custom.create_namespaced_custom_object, *self.CUSTOM[kind][:2], ns,
                                    self.CUSTOM[kind][2], obj)
        api, suffix = self.NAMESPACED[kind]
        return await self._call(getattr(getattr(self, api), f"create_{suffix}"), ns, obj)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            if kind in self.CUSTOM:
                return await self._call(self.custom.get_namespaced_custom_object, *self.CUSTOM[kind][:2], namespace,
                                        self.CUSTOM[kind][2], name)
            api, suffix = self.NAMESPACED[kind]
            return await self._call(getattr(getattr(self, api), f"read_{suffix}"), name, namespace)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any],
                    status: bool = False) -> dict[str, Any]:
        merge = "application/merge-patch+json"
        if kind in self.CUSTOM:
            fn = (self.custom.patch_namespaced_custom_object_status if status
                  else self.custom.patch_namespaced_custom_object)
            return await self._call(fn, *self.CUSTOM[kind][:2], namespace, self.CUSTOM[kind][2], name, patch,
                                    _content_type=merge)
        api, suffix = self.NAMESPACED[kind]
        return await self._call(getattr(getattr(self, api), f"patch_{suffix}"), name, namespace, patch,
                                _content_type=merge)

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        if kind in self.CUSTOM:
            await self._call(self.custom.delete_namespaced_custom_object, *self.CUSTOM[kind][:2], namespace,
                             self.CUSTOM[kind][2], name)
            return
        api, suffix = self.NAMESPACED[kind]
        await self._call(getattr(getattr(self, api), f"delete_{suffix}"), name, namespace)

    def close(self) -> None:
        self.api_client.close()


@pytest_asyncio.fixture()
async def cluster(kube: KubeEmulator) -> AsyncIterator[Cluster]:
    client = Cluster(str(kube.url))
    yield client
    client.close()


# ---------------------------------------------------------------- Google


OPERATOR_EMAIL = "vertex-operator@ops-project.iam.gserviceaccount.com"


@dataclasses.dataclass
class Google:
    """Emulated IAM + Resource Manager (one URL), and the operator's ADC key for them."""

    url: str
    store: PolicyStore
    registry: TokenRegistry
    key_file: pathlib.Path

    @property
    def endpoints(self) -> dict[str, str]:
        """Operator options that point it here."""
        return {"iam_endpoint": self.url, "resource_manager_endpoint": self.url}


@pytest_asyncio.fixture()
async def google(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Google]:
    """The emulators, with GOOGLE_APPLICATION_CREDENTIALS set: the operator's real ADC path
    (google-auth signs a JWT with the key and gets its token from the OAuth emulator)."""
    registry = TokenRegistry()
    oauth = create_oauth_app(registry)
    store = PolicyStore()
    apis = create_iam_policy_app(registry, store)

    async def app(scope: Any, receive: Any, send: Any) -> None:  # one server: one shutdown to wait for
        await (oauth if scope.get("path") == "/token" else apis)(scope, receive, send)

    async with async_running_server(app) as server:
        key_file = tmp_path / "operator-key.json"
        make_service_account_key(f"{server.url}/token", key_file, keys=oauth, project_id="ops-project",
                                 client_email=OPERATOR_EMAIL)
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
        yield Google(server.url, store, registry, key_file)


# ---------------------------------------------------------------- webhook TLS


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """A CA and a server certificate for 127.0.0.1/localhost, signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("webhook-tls")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vertex-operator-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = {"ca": folder / "ca.crt", "cert": folder / "tls.crt", "key": folder / "tls.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return files


# ---------------------------------------------------------------- the operator


class OperatorThread:
    """The real operator (`vertex_operator.cli.run`) in its own thread and event loop."""

    def __init__(self, options: Any) -> None:
        from vertex_operator.controller import Controller

        self.options = options
        self.controller = Controller(options)
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="vertex-operator", daemon=True)

    def _main(self) -> None:
        from vertex_operator.cli import run

        try:
            asyncio.run(run(self.options, stop_flag=self.stop_flag, ready_flag=self.ready_flag,
                            controller=self.controller))
        except BaseException as exc:  # surfaced by stop()/wait_ready()
            self.error = exc

    @property
    def webhook_url(self) -> str:
        server = self.controller.webhook_server
        assert server is not None and server.url is not None
        return server.url

    async def start(self) -> "OperatorThread":
        self.thread.start()
        ok = await asyncio.to_thread(self.ready_flag.wait, 20)
        assert ok and self.error is None, f"the operator did not start: {self.error!r}"
        if self.controller.webhook_server is not None:
            ok = await asyncio.to_thread(self.controller.webhook_server.ready.wait, 20)
            assert ok, "the webhook server did not start"
        return self

    async def stop(self) -> None:
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 30)
        assert not self.thread.is_alive(), "the operator did not stop"


@pytest.fixture()
def operator_options(tls_files: dict[str, pathlib.Path]) -> Any:
    from vertex_operator.options import Options

    from tests.operator.policies import TEST_POLICY

    return Options(
        clusterwide=True, standalone=True, sidecar_image="registry.test/vertex-sidecar:test",
        operator_namespace="vertex-system", metrics_addr="127.0.0.1", metrics_port=0,
        webhook_addr="127.0.0.1", webhook_port=None, webhook_host="127.0.0.1",
        webhook_cert=str(tls_files["cert"]), webhook_key=str(tls_files["key"]),
        webhook_ca=str(tls_files["ca"]), resync_seconds=3600,
        # Credential bindings: short waits, so that retries and propagation fit in a test.
        iam_propagation_seconds=0.3, binding_recheck_seconds=0.2, iam_retry_seconds=0.01,
        policy=TEST_POLICY,
    )


@pytest_asyncio.fixture()
async def start_operator(kube: KubeEmulator, kubeconfig: pathlib.Path,
                         operator_options: Any) -> AsyncIterator[Callable[..., Awaitable[OperatorThread]]]:
    """Start (and restart) the operator; on teardown, stop it and check its API requests."""
    running: list[OperatorThread] = []

    async def start(**overrides: Any) -> OperatorThread:
        op = OperatorThread(dataclasses.replace(operator_options, **overrides))
        running.append(op)
        return await op.start()

    yield start
    for op in running:
        if op.thread.is_alive():
            await op.stop()
    check_requests(kube)


def check_requests(kube: KubeEmulator) -> None:
    """Record the operator's API requests; they must all be in the RBAC record."""
    made = set(kube.api_requests(OPERATOR_AGENTS))
    OBSERVED_REQUESTS.update(made)
    if not UPDATE_RBAC:
        allowed = load_rbac_file()
        unexpected = sorted(made - allowed)
        assert not unexpected, (
            f"the operator made API requests not listed in {RBAC_FILE.name} (the chart's RBAC is "
            f"checked against it): {unexpected}. Rerun with VERTEX_RBAC_UPDATE=1 and review the diff.")


@pytest_asyncio.fixture()
async def operator(start_operator: Callable[..., Awaitable[OperatorThread]]) -> OperatorThread:
    return await start_operator()


def webhook_samples() -> dict[str, float]:
    """The webhook's own metrics, as the operator's /metrics serves them (one registry per process)."""
    from vertex_operator import metrics

    def value(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0
    found = {result: value("vertex_operator_admissions_total", result=result)
             for result in ("injected", "skipped", "warned", "error")}
    found["answered"] = value("vertex_operator_admission_duration_seconds_count")
    found["seconds"] = value("vertex_operator_admission_duration_seconds_sum")
    found["patch_ops"] = value("vertex_operator_admission_patch_operations_total")
    found["admission_errors"] = value("vertex_operator_errors_total", stage="admission")
    return found
