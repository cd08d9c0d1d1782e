"""Service-account signing keys known to the OAuth emulator, and RS256 JWT checks.

Google keeps the public half of every service-account key and verifies JWT grants
against it by `kid`; the emulator does the same with keys it generated itself.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = ["JwtError", "KeyStore", "RegisteredKey", "decode_jwt", "new_rsa_key", "private_key_pem"]


@dataclass(frozen=True)
class RegisteredKey:
    key_id: str
    client_email: str
    public_key: rsa.RSAPublicKey


class KeyStore:
    """Thread-safe map of key id → public key and the service account owning it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, RegisteredKey] = {}

    def add(self, key_id: str, client_email: str, public_key: rsa.RSAPublicKey) -> None:
        with self._lock:
            self._keys[key_id] = RegisteredKey(key_id, client_email, public_key)

    def get(self, key_id: str) -> RegisteredKey | None:
        with self._lock:
            return self._keys.get(key_id)

    def remove(self, key_id: str) -> None:
        """Like deleting a key in IAM: grants signed with it stop working."""
        with self._lock:
            self._keys.pop(key_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)


class JwtError(ValueError):
    """A JWT that is malformed or whose signature does not verify."""


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_key_pem(key: rsa.RSAPrivateKey) -> str:
    """PKCS#8 PEM, the format of `private_key` in a service-account JSON key."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def decode_jwt(token: str, keys: KeyStore) -> tuple[dict[str, Any], dict[str, Any], RegisteredKey]:
    """Verify an RS256 JWT against the store; returns (header, claims, signing key)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError("not a JWT")
    try:
        header = json.loads(_b64url_decode(parts[0]))
        claims = json.loads(_b64url_decode(parts[1]))
        signature = _b64url_decode(parts[2])
    except (ValueError, UnicodeDecodeError) as exc:
        raise JwtError("undecodable JWT") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise JwtError("JWT header or claims are not objects")
    if header.get("alg") != "RS256":
        raise JwtError("unsupported algorithm")
    key = keys.get(str(header.get("kid", "")))
    if key is None:
        raise JwtError("unknown key id")
    signed = f"{parts[0]}.{parts[1]}".encode()
    try:
        key.public_key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature as exc:
        raise JwtError("bad signature") from exc
    return header, claims, key
