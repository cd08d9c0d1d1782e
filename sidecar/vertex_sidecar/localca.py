"""The pod-local CA and the localhost certificate it issues. Pure: PEM bytes in and out.

The CA carries critical name constraints (localhost, 127.0.0.0/8, ::1): app containers
add it to their trust store, and even a leaked key cannot vouch for any other host. With
the forward proxy on (`proxy_listen`), the constraints also permit exactly the Google
endpoint names it intercepts (`proxy_hosts.intercepted_names`), each of which gets a leaf
of its own (`issue_host_leaf`).
Certificates satisfy RFC 5280 as OpenSSL's strict mode checks it (Python 3.13 turns
``VERIFY_X509_STRICT`` on by default): key identifiers, key usage, critical basic
constraints. Keys are ECDSA P-256.

Only `tls` imports this module, and only in the short-lived process that prepares the
files, so `cryptography` never stays resident in the sidecar.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_COMMON_NAME = "vertex-passthrough sidecar pod-local CA"
CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=825)
CA_MIN_REMAINING = dt.timedelta(days=900)  # a CA closer to expiry than a leaf's life is replaced
CLOCK_SKEW = dt.timedelta(hours=1)  # backdated notBefore: containers' clocks differ a little
LOCAL_DNS = ("localhost",)
LOCAL_IPS = ("127.0.0.1", "::1")
LOCAL_NETWORKS = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def usable_ca(existing: Pem, now: dt.datetime, extra_dns: tuple[str, ...] = ()) -> bool:
    """Whether a CA left by a previous start is ours, intact, far from expiry, and constrained to
    exactly the names wanted now (a change of `extra_dns` replaces it)."""
    try:
        cert = x509.load_pem_x509_certificate(existing.cert)
        key = serialization.load_pem_private_key(existing.key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # TypeError: an encrypted key
        return False
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return (isinstance(key, ec.EllipticCurvePrivateKey) and bool(names) and names[0].value == CA_COMMON_NAME
            and key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
            and cert.not_valid_after_utc - now >= CA_MIN_REMAINING
            and permitted_dns(cert) == frozenset(LOCAL_DNS + extra_dns))


def permitted_dns(cert: x509.Certificate) -> frozenset[str]:
    """The DNS names a CA's name constraints permit."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(n.value for n in constraints.permitted_subtrees or () if isinstance(n, x509.DNSName))


def create_ca(now: dt.datetime, extra_dns: tuple[str, ...] = ()) -> Pem:
    """A new CA; `extra_dns`: the intercepted Google names it may also vouch for."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    permitted: list[x509.GeneralName] = [x509.DNSName(n) for n in LOCAL_DNS + extra_dns]
    permitted += [x509.IPAddress(ipaddress.ip_network(n)) for n in LOCAL_NETWORKS]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_leaf(ca: Pem, now: dt.datetime) -> Pem:
    """A server certificate for localhost, 127.0.0.1 and ::1, signed by `ca`."""
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in LOCAL_DNS]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in LOCAL_IPS]
    return _issue(ca, now, "localhost", names)


def issue_host_leaf(ca: Pem, now: dt.datetime, host: str) -> Pem:
    """A server certificate for exactly `host` (an intercepted Google endpoint), signed by `ca`."""
    return _issue(ca, now, host, [x509.DNSName(host)])


def _issue(ca: Pem, now: dt.datetime, common_name: str, names: list[x509.GeneralName]) -> Pem:
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + LEAF_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
