"""The TLS listener's files: certificate, key, and the CA bundle app containers trust.

Why: google-genai dials its Live API at the base URL with the scheme switched to
``wss://``, so with a plain-HTTP sidecar it cannot connect. The sidecar therefore also
listens with TLS on localhost, and app containers trust it through ``SSL_CERT_FILE``
pointing at a bundle the sidecar writes: the system roots plus the sidecar's CA (so the
app can still reach every other TLS endpoint).

- The pod-local CA (`localca`) lives in `state_dir` (an emptyDir: the root FS is
  read-only) and is reused across sidecar restarts in the same pod, so apps that loaded
  the bundle keep trusting the sidecar. The leaf certificate is issued anew at each start.
- Or a mounted certificate (`cert_file`/`key_file`, its issuer in `ca_file`) is used.
- With the forward proxy (`proxy_listen`), the pod-local CA also issues one leaf per
  intercepted Google endpoint name (`intercept`), into ``<state_dir>/proxy/<name>.pem``
  (certificate and key, 0600), and its name constraints permit exactly those names.
Keys are written 0600, certificates and the bundle 0644 (other containers read it);
every file is replaced atomically, so a reader never sees half a bundle. The keys never
sit next to an explicit `ca_bundle_path` (its directory is shared with the app
containers), and the default `state_dir`, a predictable name in the shared temp dir, must
be a directory of this user's.

`prepare_tls_isolated` does the work in a short-lived child process (``python -m
vertex_sidecar.tls``): `cryptography` costs ~8 MB resident once imported, and the
long-running sidecar never needs it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import ssl
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .config import TlsSettings

log = logging.getLogger("vertex_sidecar.tls")

# Where distributions keep their CA bundle, after what OpenSSL itself reports.
SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # Alpine, macOS
)
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


class TlsError(OSError):
    """The TLS listener cannot be set up; the message says which file or directory and why."""


@dataclass(frozen=True)
class TlsFiles:
    cert_file: str  # what uvicorn serves
    key_file: str
    ca_bundle_path: str  # system roots + our CA: the apps' SSL_CERT_FILE
    ca_cert_file: str | None  # the pod-local CA (None with a mounted certificate)
    system_roots: str | None  # the system bundle copied into ca_bundle_path
    proxy_cert_dir: str | None = None  # <name>.pem per intercepted host (forward proxy)


def default_state_dir() -> str:
    return os.path.join(tempfile.gettempdir(), f"vertex-sidecar-tls-{os.getuid()}")


def prepare_tls_isolated(settings: TlsSettings, timeout_s: float = 60.0, *,
                         intercept: tuple[str, ...] = ()) -> TlsFiles:
    """`prepare_tls` in a child process, so `cryptography` never loads into the sidecar."""
    request = {"settings": dataclasses.asdict(settings), "intercept": list(intercept)}
    try:
        child = subprocess.run([sys.executable, "-m", "vertex_sidecar.tls"],
                               input=json.dumps(request), capture_output=True, text=True,
                               timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TlsError(f"TLS listener: preparing the certificate failed: {exc}") from None
    if child.returncode == 0:
        for line in child.stderr.splitlines():  # the child's log lines, in the sidecar's log
            level, _, message = line.partition(" ")
            log.log(logging.WARNING if level == "WARNING" else logging.INFO, "%s", message)
    else:
        lines = [line for line in child.stderr.splitlines() if line.strip()]
        raise TlsError(lines[-1] if lines else f"TLS listener: preparation exited with {child.returncode}")
    return TlsFiles(**json.loads(child.stdout))


def prepare_tls(settings: TlsSettings, *, now: dt.datetime | None = None,
                intercept: tuple[str, ...] = ()) -> TlsFiles:
    """Make sure the certificate, key and CA bundle exist; returns their paths.

    `intercept`: the Google endpoint names the forward proxy answers for (one leaf each)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    state_dir = Path(settings.state_dir or default_state_dir())
    bundle_path = Path(settings.ca_bundle_path or state_dir / "ca-bundle.pem")
    mounted = bool(settings.cert_file and settings.key_file)
    if mounted and intercept:
        raise TlsError("the forward proxy (proxy_listen) issues its certificates from the pod-local CA; it cannot "
                       "run with a mounted tls.cert_file/key_file")
    proxy_cert_dir: str | None = None
    if (not mounted and settings.ca_bundle_path
            and os.path.realpath(bundle_path.parent) == os.path.realpath(state_dir)):
        raise TlsError(f"TLS listener: tls.ca_bundle_path {bundle_path} is in tls.state_dir, next to the private "
                       "keys: whatever shares the bundle with app containers would share the keys too. Give the "
                       "bundle a directory of its own")
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if settings.state_dir is None:
            _check_private_dir(state_dir)
        if settings.cert_file and settings.key_file:
            cert_file, key_file = settings.cert_file, settings.key_file
            ca_cert_file = None
            trust = _read_pem(settings.ca_file, "tls.ca_file") if settings.ca_file else b""
        else:
            with _locked(state_dir):  # two sidecars sharing a dir must not issue two CAs
                trust = _ensure_ca(state_dir, now, intercept)
                cert_file, key_file = _issue_leaf(state_dir, now)
                if intercept:
                    proxy_cert_dir = _issue_host_leaves(state_dir, now, intercept)
            ca_cert_file = str(state_dir / "ca.crt")
        system = find_system_roots(settings.system_ca_file, exclude=bundle_path)
        roots = _read_pem(system, "system CA bundle") if system else b""
        if not system:
            log.warning("no system CA bundle found (set tls.system_ca_file): %s holds only the sidecar's CA, so "
                        "apps using it as SSL_CERT_FILE can reach nothing else over TLS", bundle_path)
        if settings.extra_roots_file:
            roots = _joined(roots, _read_pem(settings.extra_roots_file, "tls.extra_roots_file"))
        write_bundle(bundle_path, roots, trust)
        if settings.ca_cert_path and trust:
            write_public(Path(settings.ca_cert_path), trust)
    except TlsError:
        raise
    except OSError as exc:
        where = exc.filename or state_dir
        raise TlsError(f"TLS listener: cannot write {where}: {exc.strerror or exc}. Mount a writable volume "
                       "(an emptyDir) and point tls.state_dir / tls.ca_bundle_path at it") from None
    _check_loadable(cert_file, key_file)
    return TlsFiles(str(cert_file), str(key_file), str(bundle_path), ca_cert_file, system, proxy_cert_dir)


def _check_private_dir(path: Path) -> None:
    """The default state dir has a predictable name in the shared temp dir: it must be a real
    directory of ours (not one another user planted, with a CA of theirs in it) and private."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise TlsError(f"TLS listener: {path} is not a directory owned by uid {os.getuid()} (another user may have "
                       "created it); remove it or set tls.state_dir")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)


def _ensure_ca(state_dir: Path, now: dt.datetime, intercept: tuple[str, ...] = ()) -> bytes:
    """The CA certificate (PEM): the one a previous start left when still good, else a new one."""
    from .localca import Pem, create_ca, usable_ca

    cert_path, key_path = state_dir / "ca.crt", state_dir / "ca.key"
    try:
        existing: Pem | None = Pem(cert_path.read_bytes(), key_path.read_bytes())
    except FileNotFoundError:
        existing = None
    if existing is not None and usable_ca(existing, now, intercept):
        return existing.cert
    if existing is not None:
        log.info("replacing the pod-local CA in %s (unreadable, expiring, not ours, or for other names)", state_dir)
    ca = create_ca(now, intercept)
    write_private(key_path, ca.key)
    write_public(cert_path, ca.cert)
    log.info("created a pod-local CA in %s", state_dir)
    return ca.cert


def _issue_leaf(state_dir: Path, now: dt.datetime) -> tuple[str, str]:
    from .localca import Pem, issue_leaf

    leaf = issue_leaf(Pem((state_dir / "ca.crt").read_bytes(), (state_dir / "ca.key").read_bytes()), now)
    cert_path, key_path = state_dir / "tls.crt", state_dir / "tls.key"
    write_private(key_path, leaf.key)
    write_public(cert_path, leaf.cert)
    return str(cert_path), str(key_path)


def _issue_host_leaves(state_dir: Path, now: dt.datetime, hosts: tuple[str, ...]) -> str:
    from .localca import Pem, issue_host_leaf

    ca = Pem((state_dir / "ca.crt").read_bytes(), (state_dir / "ca.key").read_bytes())
    directory = state_dir / "proxy"
    directory.mkdir(mode=0o700, exist_ok=True)
    for host in hosts:
        leaf = issue_host_leaf(ca, now, host)
        write_private(directory / f"{host}.pem", leaf.cert + leaf.key)
    return str(directory)


# ---------------------------------------------------------------------- the bundle


def find_system_roots(explicit: str | None = None, *, exclude: Path | None = None) -> str | None:
    """The system's CA bundle: `explicit`, else OpenSSL's default file, else a known path.

    `exclude` (our own bundle) is skipped: a sidecar started with SSL_CERT_FILE pointing at
    it must not copy the bundle into itself.
    """
    paths = ssl.get_default_verify_paths()
    candidates = [explicit] if explicit else [paths.cafile, paths.openssl_cafile, *SYSTEM_BUNDLES]
    skip = os.path.realpath(exclude) if exclude is not None else None
    for candidate in candidates:
        if not candidate or (skip is not None and os.path.realpath(candidate) == skip):
            continue
        try:
            with open(candidate, "rb") as file:
                if _PEM_CERT in file.read(64 * 1024):
                    return candidate
        except OSError:
            continue
    if explicit:
        raise TlsError(f"tls.system_ca_file: {explicit} is not a readable PEM CA bundle")
    return None


def _joined(*parts: bytes) -> bytes:
    """PEM files one after the other, each ending in a newline (a PEM file may not)."""
    return b"".join(part if part.endswith(b"\n") else part + b"\n" for part in parts if part)


def write_bundle(path: Path, system_roots: bytes, extra: bytes) -> None:
    """System roots first, then ours."""
    body = _joined(system_roots, extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, body, 0o644)


def write_private(path: Path, data: bytes) -> None:
    _atomic_write(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    _atomic_write(path, data, 0o644)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode (a key is never readable by others, not even briefly).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if _PEM_CERT not in data:
        raise TlsError(f"{what}: {path} holds no PEM certificate")
    return data


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    with open(state_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_loadable(cert_file: str, key_file: str) -> None:
    """Fail at start with a clear message rather than inside uvicorn."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"TLS listener: cannot load certificate {cert_file} with key {key_file}: {exc}") from None


def _main() -> int:
    """The child of `prepare_tls_isolated`: settings as JSON on stdin, `TlsFiles` on stdout."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        request = json.load(sys.stdin)
        files = prepare_tls(TlsSettings(**request["settings"]), intercept=tuple(request.get("intercept", ())))
    except TlsError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(files)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
