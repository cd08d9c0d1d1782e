"""Google IAM and Resource Manager over HTTP, as the operator's own Google identity.

The operator authenticates with Application Default Credentials (google-auth): on GKE its
own Workload Identity, elsewhere `GOOGLE_APPLICATION_CREDENTIALS`. Token refresh is
blocking I/O and runs in a worker thread; the API calls themselves are aiohttp (kopf's
own HTTP client). Endpoints are overridable (tests, Private Service Connect).

IAM policies are changed by read-modify-write: get the policy (version 3, so conditional
bindings come back intact), apply a pure edit, set it with the etag that was read. A
concurrent writer makes the set fail with 409 ABORTED; then the whole cycle is repeated
after a jittered, growing delay, on the fresh policy, so the other writer's change is
kept. Errors keep what the operator needs to explain them: `describe` turns them into a
condition reason and a message naming the missing permission or object.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import urllib.parse
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator, Literal, Mapping, Protocol

import aiohttp

from vertex_operator import __version__
from vertex_operator.identity import POLICY_VERSION, ResourceKind, service_account_project
from vertex_operator.options import DEFAULT_IAM_ENDPOINT, DEFAULT_RESOURCE_MANAGER_ENDPOINT

logger = logging.getLogger(__name__)

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
USER_AGENT = f"vertex-operator/{__version__}"

Method = Literal["get", "getIamPolicy", "setIamPolicy"]

# What each call needs, and a predefined role that has it: for messages on 403.
PERMISSIONS: Mapping[tuple[ResourceKind, Method], tuple[str, str]] = {
    ("project", "get"): ("resourcemanager.projects.get", "roles/browser"),
    ("project", "getIamPolicy"): ("resourcemanager.projects.getIamPolicy", "roles/resourcemanager.projectIamAdmin"),
    ("project", "setIamPolicy"): ("resourcemanager.projects.setIamPolicy", "roles/resourcemanager.projectIamAdmin"),
    ("serviceAccount", "getIamPolicy"): ("iam.serviceAccounts.getIamPolicy", "roles/iam.serviceAccountAdmin"),
    ("serviceAccount", "setIamPolicy"): ("iam.serviceAccounts.setIamPolicy", "roles/iam.serviceAccountAdmin"),
}


class NoCredentials(Exception):
    """The operator has no usable Application Default Credentials."""


class GoogleApiError(Exception):
    """A failed call; `code` 0 means the request got no HTTP answer at all."""

    def __init__(self, code: int, status: str, message: str, *, kind: ResourceKind, target: str,
                 method: Method, permission: str | None = None) -> None:
        super().__init__(f"{method} {kind} {target}: {code} {status}: {message}")
        self.code, self.status, self.message = code, status, message
        self.kind, self.target, self.method = kind, target, method
        self.permission = permission  # from Google's ErrorInfo, when it names one

    @property
    def transient(self) -> bool:
        return self.code in (0, 429) or self.code >= 500


class ConcurrentModification(GoogleApiError):
    """Every attempt of a read-modify-write met a concurrent change (409 ABORTED)."""


# ------------------------------------------------------------------ tokens


class TokenSource(Protocol):
    async def token(self) -> str: ...

    def invalidate(self) -> None: ...


class AdcTokenSource:
    """Access tokens from google-auth's Application Default Credentials, refreshed ahead of expiry."""

    def __init__(self, scopes: tuple[str, ...] = (CLOUD_PLATFORM,)) -> None:
        self.scopes = scopes
        self._credentials: Any = None
        self._lock = asyncio.Lock()

    def _load(self) -> Any:
        try:
            import google.auth
            import google.auth.exceptions
        except ImportError as exc:  # the image must ship google-auth for backend iamApi
            raise NoCredentials(f"google-auth is not installed ({exc})") from None
        try:
            credentials, _project = google.auth.default(scopes=list(self.scopes))
        except google.auth.exceptions.DefaultCredentialsError as exc:
            raise NoCredentials(str(exc)) from None
        return credentials

    def _refresh(self) -> None:
        import google.auth.exceptions
        import google.auth.transport.urllib3
        import urllib3

        try:
            self._credentials.refresh(google.auth.transport.urllib3.Request(urllib3.PoolManager()))
        except google.auth.exceptions.GoogleAuthError as exc:
            raise NoCredentials(f"cannot get a token: {exc}") from None

    async def token(self) -> str:
        async with self._lock:
            if self._credentials is None:
                self._credentials = await asyncio.to_thread(self._load)
            if not self._credentials.valid:  # also false within google-auth's refresh margin
                await asyncio.to_thread(self._refresh)
            return str(self._credentials.token)

    def invalidate(self) -> None:
        if self._credentials is not None:
            self._credentials.token = None


# ------------------------------------------------------------------ retries


@dataclass(frozen=True)
class Backoff:
    """Delays between read-modify-write attempts: full jitter over a growing ceiling."""

    first: float = 0.5
    factor: float = 2.0
    maximum: float = 8.0
    attempts: int = 6

    def delays(self) -> Iterator[float]:
        ceiling = self.first
        for _ in range(self.attempts - 1):
            yield random.uniform(ceiling / 2, ceiling)
            ceiling = min(self.maximum, ceiling * self.factor)


@dataclass(frozen=True)
class PolicyUpdate:
    changed: bool
    attempts: int
    policy: dict[str, Any]


Edit = Callable[[dict[str, Any]], tuple[dict[str, Any], bool]]
BeforeWrite = Callable[[dict[str, Any], dict[str, Any]], Awaitable[None]]


# ------------------------------------------------------------------ the client


class GoogleIam:
    """IAM (service-account policies) and Resource Manager (project policies, numbers)."""

    def __init__(self, iam_endpoint: str = DEFAULT_IAM_ENDPOINT,
                 resource_manager_endpoint: str = DEFAULT_RESOURCE_MANAGER_ENDPOINT,
                 tokens: TokenSource | None = None, backoff: Backoff = Backoff(),
                 timeout: float = 30.0) -> None:
        self.iam_endpoint = iam_endpoint.rstrip("/")
        self.resource_manager_endpoint = resource_manager_endpoint.rstrip("/")
        self.tokens: TokenSource = tokens if tokens is not None else AdcTokenSource()
        self.backoff = backoff
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        # The leader-election fence: called before every policy write (raises to refuse).
        self.write_guard: Callable[[], None] | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, kind: ResourceKind, target: str, method: Method) -> str:
        if kind == "project":
            base = f"{self.resource_manager_endpoint}/v1/projects/{urllib.parse.quote(target, safe='')}"
        else:
            project = service_account_project(target)
            base = (f"{self.iam_endpoint}/v1/projects/{project}/serviceAccounts/"
                    f"{urllib.parse.quote(target, safe='@')}")
        return base if method == "get" else f"{base}:{method}"

    async def _call(self, kind: ResourceKind, target: str, method: Method,
                    body: Mapping[str, Any] | None = None, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                                  headers={"User-Agent": USER_AGENT})
        url = self._url(kind, target, method)
        for attempt in (1, 2):
            token = await self.tokens.token()
            headers = {"Authorization": f"Bearer {token}"}
            try:
                if method == "get":
                    request = self._session.get(url, headers=headers, params=params)
                else:
                    request = self._session.post(url, headers=headers, params=params, json=dict(body or {}))
                async with request as response:
                    text = await response.text()
                    status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise GoogleApiError(0, "UNAVAILABLE", f"no answer from {url}: {exc!r}", kind=kind,
                                     target=target, method=method) from None
            if status == 401 and attempt == 1:
                self.tokens.invalidate()  # revoked or expired early: one fresh token
                continue
            break
        data = _json(text)
        if status >= 400:
            raise _error(status, data, text, kind=kind, target=target, method=method)
        return data

    # -- calls

    async def project_number(self, project_id: str) -> str:
        data = await self._call("project", project_id, "get")
        number = data.get("projectNumber")
        if not number:
            raise GoogleApiError(500, "INTERNAL", f"no projectNumber in {data!r}", kind="project",
                                 target=project_id, method="get")
        return str(number)

    async def get_policy(self, kind: ResourceKind, target: str) -> dict[str, Any]:
        if kind == "project":
            return await self._call(kind, target, "getIamPolicy",
                                    {"options": {"requestedPolicyVersion": POLICY_VERSION}})
        # IAM takes the option as a query parameter, and no body.
        return await self._call(kind, target, "getIamPolicy",
                                params={"options.requestedPolicyVersion": str(POLICY_VERSION)})

    async def set_policy(self, kind: ResourceKind, target: str, policy: Mapping[str, Any]) -> dict[str, Any]:
        if self.write_guard is not None:
            self.write_guard()
        return await self._call(kind, target, "setIamPolicy", {"policy": dict(policy)})

    async def update_policy(self, kind: ResourceKind, target: str, edit: Edit,
                            before_write: BeforeWrite | None = None) -> PolicyUpdate:
        """Read-modify-write with the etag; the edit is re-applied to a fresh read after a 409.

        `before_write(old, new)` runs before each set: the caller records what it is about
        to add before it exists, so a crash right after the set cannot lose track of it.
        """
        delays = self.backoff.delays()
        attempt = 0
        while True:
            attempt += 1
            current = await self.get_policy(kind, target)
            updated, changed = edit(current)
            if not changed:
                return PolicyUpdate(False, attempt, current)
            if before_write is not None:
                await before_write(current, updated)
            try:
                written = await self.set_policy(kind, target, updated)
                return PolicyUpdate(True, attempt, written)
            except GoogleApiError as exc:
                if exc.code != 409:
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise ConcurrentModification(exc.code, exc.status, exc.message, kind=kind, target=target,
                                                 method="setIamPolicy") from None
                logger.info("The IAM policy of %s %s changed concurrently (attempt %d); retrying in %.2fs.",
                            kind, target, attempt, delay)
                await asyncio.sleep(delay)


def _json(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _error(code: int, data: Mapping[str, Any], text: str, *, kind: ResourceKind, target: str,
           method: Method) -> GoogleApiError:
    found = data.get("error")
    error: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    message = str(error.get("message") or text.strip()[:300] or f"HTTP {code}")
    permission = None
    for detail in error.get("details") or []:
        if isinstance(detail, Mapping) and isinstance(detail.get("metadata"), Mapping):
            permission = detail["metadata"].get("permission") or permission
    return GoogleApiError(code, str(error.get("status") or ""), message, kind=kind, target=target,
                          method=method, permission=permission)


# ------------------------------------------------------------------ explaining errors


def _resource(kind: ResourceKind, target: str) -> str:
    return f"project {target}" if kind == "project" else f"Google service account {target}"


def describe(exc: BaseException) -> tuple[str, str]:
    """A condition (reason, message) for a failed Google call: what is missing, how to fix it."""
    if isinstance(exc, NoCredentials):
        return ("GoogleCredentialsUnavailable",
                f"The operator has no usable Google credentials (Application Default Credentials): {exc}. "
                "Give the operator's pod a Google identity (GKE Workload Identity, or "
                "GOOGLE_APPLICATION_CREDENTIALS), or set spec.binding.backend to manual or configConnector.")
    if not isinstance(exc, GoogleApiError):
        return "BindingFailed", f"Applying the IAM bindings failed: {exc!r}"
    where = _resource(exc.kind, exc.target)
    said = f" Google said: {exc.message}"
    if isinstance(exc, ConcurrentModification):
        return ("ConcurrentModification",
                f"The IAM policy of {where} kept changing under other writers (409 ABORTED on every "
                f"attempt); the operator tries again later.{said}")
    if exc.code == 401:
        return ("GoogleCredentialsRejected",
                f"Google rejected the operator's credentials while reading {where}.{said}")
    if exc.code == 403:
        needed, role = PERMISSIONS.get((exc.kind, exc.method), ("", ""))
        permission = exc.permission or needed
        missing = f"permission {permission}" if permission else f"permission to call {exc.method}"
        exists = ("the project does not exist" if exc.kind == "project" else "the service account does not exist")
        return ("PermissionDenied",
                f"The operator's Google identity lacks {missing} on {where} (or {exists}). Grant it "
                f"{role or 'a role with that permission'} there, or set spec.binding.backend to manual and "
                f"run the commands yourself.{said}")
    if exc.code == 404:
        if exc.kind == "serviceAccount":
            project = service_account_project(exc.target)
            name = exc.target.split("@")[0]
            return ("ServiceAccountNotFound",
                    f"Google service account {exc.target} does not exist. Create it (gcloud iam "
                    f"service-accounts create {name} --project={project}) or correct "
                    f"spec.workloadIdentity.gcpServiceAccount.{said}")
        return ("ProjectNotFound", f"Project {exc.target} was not found: check spec.binding.projects "
                                   f"and spec.workloadIdentity.projectId.{said}")
    if exc.code == 400:
        return "InvalidArgument", f"Google refused the request for {where}.{said}"
    return ("GoogleUnavailable",
            f"Calling {exc.method} for {where} failed ({exc.code or 'no answer'} {exc.status}); the operator "
            f"tries again later.{said}")
