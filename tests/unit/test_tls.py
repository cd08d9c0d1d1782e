"""The TLS listener's pod-local CA, leaf certificate and CA bundle."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vertex_sidecar import tls
from vertex_sidecar.config import ConfigError, TlsSettings, parse_config_text
from vertex_sidecar.tls import TlsError, find_system_roots, prepare_tls, prepare_tls_isolated

SYSTEM = find_system_roots()


def settings(tmp_path: Path, **extra: str) -> TlsSettings:
    return TlsSettings(state_dir=str(tmp_path / "state"), ca_bundle_path=str(tmp_path / "shared" / "ca-bundle.pem"),
                       **extra)


def handshake(cert_file: str, key_file: str, cafile: str, server_hostname: str) -> None:
    """A real TLS handshake on loopback, verified the way Python clients (httpx, aiohttp,
    websockets) verify: the default context with the bundle as its only trust store."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[BaseException] = []

    def accept() -> None:
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        client = ssl.create_default_context(cafile=cafile)
        client.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            with client.wrap_socket(raw, server_hostname=server_hostname) as tls:
                assert tls.recv(2) == b"ok"
    finally:
        thread.join(5)
        listener.close()


@pytest.mark.skipif(SYSTEM is None, reason="no system CA bundle on this machine")
def test_generated_ca_and_leaf_verify_for_localhost_names(tmp_path: Path) -> None:
    files = prepare_tls(settings(tmp_path))
    assert files.system_roots == SYSTEM
    for host in ("localhost", "127.0.0.1"):
        handshake(files.cert_file, files.key_file, files.ca_bundle_path, host)
    bundle = Path(files.ca_bundle_path).read_bytes()
    assert bundle.startswith(Path(SYSTEM or "").read_bytes().rstrip(b"\n"))  # system roots first, unchanged
    assert bundle.endswith(Path(files.ca_cert_file or "").read_bytes())
    state = tmp_path / "state"
    assert (state / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (state / "tls.key").stat().st_mode & 0o777 == 0o600
    assert Path(files.ca_bundle_path).stat().st_mode & 0o777 == 0o644  # other containers read it
    assert not [p.name for p in state.iterdir() if p.name.startswith(".tls") or p.name.startswith(".ca")]


def test_the_ca_survives_restarts_and_the_leaf_is_renewed(tmp_path: Path) -> None:
    first = prepare_tls(settings(tmp_path))
    ca_before = Path(first.ca_cert_file or "").read_bytes()
    leaf_before = Path(first.cert_file).read_bytes()
    second = prepare_tls(settings(tmp_path))
    assert Path(second.ca_cert_file or "").read_bytes() == ca_before  # apps that loaded the bundle keep trusting
    assert Path(second.cert_file).read_bytes() != leaf_before
    handshake(second.cert_file, second.key_file, second.ca_bundle_path, "localhost")


def test_an_expiring_or_foreign_ca_is_replaced(tmp_path: Path) -> None:
    first = Path(prepare_tls(settings(tmp_path)).ca_cert_file or "").read_bytes()
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=3000)
    renewed = prepare_tls(settings(tmp_path), now=later)
    assert Path(renewed.ca_cert_file or "").read_bytes() != first
    (tmp_path / "state" / "ca.key").write_bytes(b"garbage")
    replaced = prepare_tls(settings(tmp_path))
    handshake(replaced.cert_file, replaced.key_file, replaced.ca_bundle_path, "127.0.0.1")


def test_name_constraints_stop_the_ca_vouching_for_other_hosts(tmp_path: Path) -> None:
    files = prepare_tls(settings(tmp_path))
    state = tmp_path / "state"
    ca_cert = x509.load_pem_x509_certificate((state / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((state / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    rogue = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aiplatform.googleapis.com")]))
             .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.SubjectAlternativeName([x509.DNSName("aiplatform.googleapis.com")]), critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                            critical=False)
             .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    (tmp_path / "rogue.crt").write_bytes(rogue.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "rogue.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    with pytest.raises(ssl.SSLCertVerificationError, match="(?i)subtree|constraint"):
        handshake(str(tmp_path / "rogue.crt"), str(tmp_path / "rogue.key"), files.ca_bundle_path,
                  "aiplatform.googleapis.com")


def test_mounted_certificate_and_its_issuer(tmp_path: Path) -> None:
    issued = prepare_tls(settings(tmp_path / "elsewhere"))  # stands in for cert-manager's output
    files = prepare_tls(settings(tmp_path, cert_file=issued.cert_file, key_file=issued.key_file,
                                 ca_file=issued.ca_cert_file or ""))
    assert files.cert_file == issued.cert_file and files.ca_cert_file is None
    assert not (tmp_path / "state" / "ca.key").exists()  # no CA of our own
    assert Path(files.ca_bundle_path).read_bytes().endswith(Path(issued.ca_cert_file or "").read_bytes())
    handshake(files.cert_file, files.key_file, files.ca_bundle_path, "localhost")


def test_explicit_system_bundle_and_our_own_bundle_is_never_a_source(tmp_path: Path) -> None:
    roots = tmp_path / "roots.pem"
    other = prepare_tls(settings(tmp_path / "other"))
    roots.write_bytes(Path(other.ca_cert_file or "").read_bytes())
    files = prepare_tls(settings(tmp_path, system_ca_file=str(roots)))
    assert files.system_roots == str(roots)
    assert Path(files.ca_bundle_path).read_bytes().count(b"BEGIN CERTIFICATE") == 2
    # SSL_CERT_FILE pointing at our own bundle (a sidecar sharing the apps' env) is skipped.
    assert find_system_roots(exclude=Path(files.ca_bundle_path)) != files.ca_bundle_path
    with pytest.raises(TlsError, match="system_ca_file"):
        prepare_tls(settings(tmp_path, system_ca_file=str(tmp_path / "missing.pem")))


def test_unwritable_state_dir_says_what_to_mount(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(TlsError, match="emptyDir"):
        prepare_tls(TlsSettings(state_dir=str(blocker / "tls")))


def test_prepared_in_a_child_process_so_cryptography_never_stays_resident(tmp_path: Path) -> None:
    files = prepare_tls_isolated(settings(tmp_path))
    handshake(files.cert_file, files.key_file, files.ca_bundle_path, "localhost")
    assert files.ca_cert_file == str(tmp_path / "state" / "ca.crt")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(TlsError, match="emptyDir"):  # the child's error message comes through
        prepare_tls_isolated(TlsSettings(state_dir=str(blocker / "tls")))


def test_tls_config_section() -> None:
    config = parse_config_text("tls_listen: 127.0.0.1:4443\ntls: {state_dir: /run/tls, ca_bundle_path: /ca/b.pem}")
    assert config.tls.state_dir == "/run/tls" and config.tls.ca_bundle_path == "/ca/b.pem"
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        parse_config_text("tls: {cert_file: /c.pem}")
    with pytest.raises(ConfigError, match="ca_file"):
        parse_config_text("tls: {ca_file: /ca.pem}")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config_text("tls: {statedir: /x}")


def test_keys_never_share_a_directory_with_the_bundle_apps_mount(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    with pytest.raises(TlsError, match="next to the private keys"):
        prepare_tls(TlsSettings(state_dir=str(shared), ca_bundle_path=str(shared / "ca-bundle.pem")))
    assert not (shared / "ca.key").exists()
    # Without ca_bundle_path the bundle stays in the (private) state dir, as documented.
    files = prepare_tls(TlsSettings(state_dir=str(tmp_path / "private")))
    assert Path(files.ca_bundle_path).parent == tmp_path / "private"
    # A mounted certificate writes no key: any layout is fine.
    prepare_tls(TlsSettings(state_dir=str(shared), ca_bundle_path=str(shared / "ca-bundle.pem"),
                            cert_file=files.cert_file, key_file=files.key_file))


def test_the_default_state_dir_must_be_a_private_directory_of_ours(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    default = tmp_path / "vertex-sidecar-tls-default"
    monkeypatch.setattr(tls, "default_state_dir", lambda: str(default))
    default.mkdir(mode=0o777)
    default.chmod(0o777)
    prepare_tls(TlsSettings(ca_bundle_path=str(tmp_path / "shared" / "ca-bundle.pem")))
    assert default.stat().st_mode & 0o777 == 0o700  # tightened
    shutil.rmtree(default)
    planted = tmp_path / "planted"
    planted.mkdir()
    default.symlink_to(planted)  # someone else's directory under our predictable name
    with pytest.raises(TlsError, match="not a directory owned by"):
        prepare_tls(TlsSettings())
    assert not list(planted.iterdir())
    if os.getuid() == 0:
        default.unlink()
        default.mkdir()
        os.chown(default, 54321, 54321)
        with pytest.raises(TlsError, match="not a directory owned by"):
            prepare_tls(TlsSettings())


def test_an_encrypted_ca_key_is_replaced_not_fatal(tmp_path: Path) -> None:
    ca_before = Path(prepare_tls(settings(tmp_path)).ca_cert_file or "").read_bytes()
    encrypted = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw"))
    (tmp_path / "state" / "ca.key").write_bytes(encrypted)
    second = prepare_tls(settings(tmp_path))
    assert Path(second.ca_cert_file or "").read_bytes() != ca_before
    handshake(second.cert_file, second.key_file, second.ca_bundle_path, "localhost")


# ------------------------------------------------ the forward proxy's per-host certificates


def rogue_leaf(tmp_path: Path, name: str) -> tuple[str, str]:
    """A certificate for `name` signed with the pod-local CA's key, as a thief of the key would make."""
    state = tmp_path / "state"
    ca_cert = x509.load_pem_x509_certificate((state / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((state / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    cert_file, key_file = tmp_path / f"rogue-{name}.crt", tmp_path / f"rogue-{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


@pytest.mark.skipif(SYSTEM is None, reason="no system CA bundle on this machine")
def test_proxy_leaves_one_per_intercepted_name_and_constraints_exactly_those(tmp_path: Path) -> None:
    from vertex_sidecar.localca import permitted_dns
    from vertex_sidecar.proxy_hosts import intercepted_names

    names = intercepted_names(("mars-north1",))
    files = prepare_tls(settings(tmp_path), intercept=names)
    ca = x509.load_pem_x509_certificate(Path(files.ca_cert_file or "").read_bytes())
    assert permitted_dns(ca) == {"localhost", *names}
    assert "mars-north1-aiplatform.googleapis.com" in names and "googleapis.com" not in names
    assert files.proxy_cert_dir is not None
    leaves = sorted(os.listdir(files.proxy_cert_dir))
    assert leaves == sorted(f"{name}.pem" for name in names)
    for name in ("us-central1-aiplatform.googleapis.com", "aiplatform.googleapis.com",
                 "aiplatform.eu.rep.googleapis.com", "us-discoveryengine.googleapis.com"):
        leaf = os.path.join(files.proxy_cert_dir, f"{name}.pem")
        assert os.stat(leaf).st_mode & 0o777 == 0o600  # certificate and key in one private file
        san = x509.load_pem_x509_certificate(Path(leaf).read_bytes()).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        assert san == [name]  # exactly one name per leaf
        handshake(leaf, leaf, files.ca_bundle_path, name)
    with pytest.raises(ssl.SSLCertVerificationError, match="(?i)mismatch|match"):
        leaf = os.path.join(files.proxy_cert_dir, "us-central1-aiplatform.googleapis.com.pem")
        handshake(leaf, leaf, files.ca_bundle_path, "europe-west4-aiplatform.googleapis.com")
    # Even the CA's own key cannot vouch for another Google API or a lookalike.
    for other in ("storage.googleapis.com", "oauth2.googleapis.com", "evil-aiplatform.googleapis.com"):
        cert_file, key_file = rogue_leaf(tmp_path, other)
        with pytest.raises(ssl.SSLCertVerificationError, match="(?i)subtree|constraint"):
            handshake(cert_file, key_file, files.ca_bundle_path, other)


def test_the_ca_is_replaced_when_the_intercepted_names_change(tmp_path: Path) -> None:
    from vertex_sidecar.proxy_hosts import intercepted_names

    plain = Path(prepare_tls(settings(tmp_path)).ca_cert_file or "").read_bytes()
    with_proxy = Path(prepare_tls(settings(tmp_path), intercept=intercepted_names()).ca_cert_file or "").read_bytes()
    again = Path(prepare_tls(settings(tmp_path), intercept=intercepted_names()).ca_cert_file or "").read_bytes()
    back = Path(prepare_tls(settings(tmp_path)).ca_cert_file or "").read_bytes()
    assert plain != with_proxy and with_proxy == again and back != with_proxy  # least privilege either way


def test_the_proxy_needs_the_pod_local_ca(tmp_path: Path) -> None:
    issued = prepare_tls(settings(tmp_path / "elsewhere"))
    with pytest.raises(TlsError, match="pod-local CA"):
        prepare_tls(settings(tmp_path, cert_file=issued.cert_file, key_file=issued.key_file),
                    intercept=("aiplatform.googleapis.com",))
    with pytest.raises(ConfigError, match="proxy_listen"):
        parse_config_text("proxy_listen: 127.0.0.1:4080\ntls: {cert_file: /c.pem, key_file: /k.pem}\n")


def test_organisation_roots_join_the_bundle_and_the_ca_is_written_alone(tmp_path: Path) -> None:
    # A corporate root (here another pod-local CA stands in for it) that the sidecar image lacks.
    corporate = tmp_path / "corporate.pem"
    corporate.write_bytes(Path(prepare_tls(settings(tmp_path / "corp")).ca_cert_file or "").read_bytes())
    alone = tmp_path / "shared" / "pod-ca.crt"
    files = prepare_tls(settings(tmp_path, extra_roots_file=str(corporate), ca_cert_path=str(alone)))
    bundle = Path(files.ca_bundle_path).read_bytes()
    ours = Path(files.ca_cert_file or "").read_bytes()
    assert corporate.read_bytes() in bundle and bundle.endswith(ours)
    assert bundle.count(b"BEGIN CERTIFICATE") == (SYSTEM and Path(SYSTEM).read_bytes().count(b"BEGIN CERTIFICATE") or 0) + 2
    # NODE_EXTRA_CA_CERTS: only the pod CA (Node adds it to its own roots).
    assert alone.read_bytes() == ours and alone.stat().st_mode & 0o777 == 0o644
    handshake(files.cert_file, files.key_file, str(alone), "localhost")
    with pytest.raises(TlsError, match="tls.extra_roots_file"):
        prepare_tls(settings(tmp_path, extra_roots_file=str(tmp_path / "missing.pem")))
    assert parse_config_text("tls: {extra_roots_file: /t/r.pem, ca_cert_path: /c/ca.crt}").tls.ca_cert_path == "/c/ca.crt"
