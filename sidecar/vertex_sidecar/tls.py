"""The TLS listener's certificate: a pod-local CA, a localhost certificate, a CA bundle.

Why: google-genai dials its Live API at the base URL with the scheme switched to
``wss://``, so with a plain-HTTP sidecar it cannot connect. The sidecar therefore also
listens with TLS on localhost, and app containers trust it through ``SSL_CERT_FILE``
pointing at a bundle the sidecar writes: the system roots plus the sidecar's CA (so the
app can still reach every other TLS endpoint).

- The CA lives in `state_dir` (an emptyDir: the root FS is read-only). It is reused
  across sidecar restarts in the same pod, so apps that loaded the bundle keep trusting
  the sidecar. It carries critical name constraints (localhost, 127.0.0.0/8, ::1): even
  a leaked key cannot vouch for any other host.
- The leaf certificate (localhost, 127.0.0.1, ::1) is issued anew at every start.
- Or a mounted certificate (`cert_file`/`key_file`, issuer in `ca_file`) is used as is.
Keys are written 0600, certificates and the bundle 0644 (other containers read it);
every file is replaced atomically, so a reader never sees half a bundle.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import TlsSettings

log = logging.getLogger("vertex_sidecar.tls")

CA_COMMON_NAME = "vertex-passthrough sidecar pod-local CA"
CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=825)
CA_MIN_REMAINING = dt.timedelta(days=900)  # a CA closer to expiry than a leaf's life is replaced
CLOCK_SKEW = dt.timedelta(hours=1)  # backdate notBefore: containers' clocks differ a little
LOCAL_DNS = ("localhost",)
LOCAL_IPS = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
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


def default_state_dir() -> str:
    return os.path.join(tempfile.gettempdir(), f"vertex-sidecar-tls-{os.getuid()}")


def prepare_tls(settings: TlsSettings, *, now: dt.datetime | None = None) -> TlsFiles:
    """Make sure the certificate, key and CA bundle exist; returns their paths."""
    now = now or dt.datetime.now(dt.timezone.utc)
    state_dir = Path(settings.state_dir or default_state_dir())
    bundle_path = Path(settings.ca_bundle_path or state_dir / "ca-bundle.pem")
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if settings.cert_file and settings.key_file:
            cert_file, key_file = settings.cert_file, settings.key_file
            ca_cert_file = None
            trust = _read_pem(settings.ca_file, "tls.ca_file") if settings.ca_file else b""
        else:
            with _locked(state_dir):  # two sidecars sharing a dir must not issue two CAs
                ca_cert, ca_key = _load_or_create_ca(state_dir, now)
                cert_file, key_file = _issue_leaf(state_dir, ca_cert, ca_key, now)
            ca_cert_file = str(state_dir / "ca.crt")
            trust = ca_cert.public_bytes(serialization.Encoding.PEM)
        system = find_system_roots(settings.system_ca_file, exclude=bundle_path)
        roots = _read_pem(system, "system CA bundle") if system else b""
        if not system:
            log.warning("no system CA bundle found (set tls.system_ca_file): %s holds only the sidecar's CA, so "
                        "apps using it as SSL_CERT_FILE can reach nothing else over TLS", bundle_path)
        write_bundle(bundle_path, roots, trust)
    except TlsError:
        raise
    except OSError as exc:
        where = exc.filename or state_dir
        raise TlsError(f"TLS listener: cannot write {where}: {exc.strerror or exc}. Mount a writable volume "
                       "(an emptyDir) and point tls.state_dir / tls.ca_bundle_path at it") from None
    _check_loadable(cert_file, key_file)
    return TlsFiles(str(cert_file), str(key_file), str(bundle_path), ca_cert_file, system)


# ------------------------------------------------------------------------- the CA


def _load_or_create_ca(state_dir: Path, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = state_dir / "ca.crt", state_dir / "ca.key"
    existing = _load_ca(cert_path, key_path, now)
    if existing is not None:
        return existing
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.NameConstraints(permitted_subtrees=_local_names(subtrees=True), excluded_subtrees=None),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    log.info("created a pod-local CA in %s", state_dir)
    return cert, key


def _load_ca(cert_path: Path, key_path: Path,
             now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The CA a previous start left, when it is ours, intact and far from expiry."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("replacing the unreadable pod-local CA in %s: %s", cert_path.parent, exc)
        return None
    ours = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if (not isinstance(key, ec.EllipticCurvePrivateKey) or not ours or ours[0].value != CA_COMMON_NAME
            or key.public_key().public_numbers() != cert.public_key().public_numbers()  # type: ignore[union-attr]
            or cert.not_valid_after_utc - now < CA_MIN_REMAINING):
        log.info("replacing the pod-local CA in %s (expiring, or not ours)", cert_path.parent)
        return None
    return cert, key


def _local_names(*, subtrees: bool) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in LOCAL_DNS]
    if subtrees:  # name constraints take networks
        names += [x509.IPAddress(ipaddress.ip_network("127.0.0.0/8")), x509.IPAddress(ipaddress.ip_network("::1/128"))]
    else:
        names += [x509.IPAddress(ip) for ip in LOCAL_IPS]
    return names


# ----------------------------------------------------------------------- the leaf


def _issue_leaf(state_dir: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                now: dt.datetime) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = min(now + LEAF_VALIDITY, ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_local_names(subtrees=False)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = state_dir / "tls.crt", state_dir / "tls.key"
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


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


def write_bundle(path: Path, system_roots: bytes, extra: bytes) -> None:
    """System roots first, then ours, each ending in a newline (a PEM file may not)."""
    parts = [system_roots, extra]
    body = b"".join(part if part.endswith(b"\n") else part + b"\n" for part in parts if part)
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
