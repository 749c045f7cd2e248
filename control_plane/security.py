"""Credentials: API keys, passwords (argon2) and access tokens (JWT, PyJWT).

API keys look like ``sfm_<lookup id>_<secret>``: the 12-character lookup id finds the row
without scanning, the 43-character secret (256 bits) is never stored — only its SHA-256,
which is enough for a secret of that entropy and compared in constant time. The whole key is
shown once, at creation.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

KEY_PREFIX = "sfm_"
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_password_hasher = PasswordHasher()


@dataclass(frozen=True, slots=True)
class NewApiKey:
    lookup_id: str
    secret_hash: str
    plaintext: str  # shown once


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def generate_api_key() -> NewApiKey:
    lookup_id = "".join(secrets.choice(_ALPHABET) for _ in range(12))
    secret = secrets.token_urlsafe(32)
    return NewApiKey(lookup_id, hash_secret(secret), f"{KEY_PREFIX}{lookup_id}_{secret}")


def split_api_key(token: str) -> tuple[str, str] | None:
    """``(lookup_id, secret)`` of a well-formed key, else ``None``."""
    if not token.startswith(KEY_PREFIX):
        return None
    lookup_id, sep, secret = token[len(KEY_PREFIX) :].partition("_")
    if not sep or len(lookup_id) != 12 or not secret:
        return None
    return lookup_id, secret


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def hash_password(password: str) -> str:
    return _password_hasher.hash(password)


def verify_password(password: str, stored: str | None) -> bool:
    if stored is None:
        _password_hasher.hash(password)  # same work either way: no user-exists oracle by timing
        return False
    try:
        return _password_hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def issue_token(
    *, subject: str, role: str, key: str, algorithm: str, audience: str, issuer: str, ttl_s: int
) -> tuple[str, datetime]:
    now = datetime.now(UTC)
    expires = now + timedelta(seconds=ttl_s)
    claims = {
        "sub": subject,
        "role": role,
        "aud": audience,
        "iss": issuer,
        "iat": now,
        "exp": expires,
        "jti": secrets.token_hex(8),
    }
    return jwt.encode(claims, key, algorithm=algorithm), expires


def decode_token(token: str, *, key: str, algorithm: str, audience: str, issuer: str) -> dict:
    """Verify signature (the configured algorithm only), exp, iat, aud and iss; raises jwt errors."""
    return jwt.decode(
        token,
        key,
        algorithms=[algorithm],
        audience=audience,
        issuer=issuer,
        options={"require": ["exp", "iat", "aud", "iss", "sub"]},
    )
