"""API keys: ``dhow_<id>_<secret>``, of which dhow stores only the id, a salt and a salted hash.

The id is public (it names the key in lists, quotas and the audit trail); the secret is 32 random bytes, shown
once when the key is made. A secret this long cannot be guessed, so one salted SHA-256 is enough: a slow hash
(bcrypt, scrypt) protects low-entropy passwords and would cost every request milliseconds for nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

__all__ = ["KEY_PREFIX", "NewKey", "hash_secret", "new_key", "split_key", "verify_secret"]

KEY_PREFIX = "dhow_"


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    #: the whole key to hand to the user, once
    token: str
    salt: str
    secret_hash: str


def new_key() -> NewKey:
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    return NewKey(key_id, f"{KEY_PREFIX}{key_id}_{secret}", salt, hash_secret(salt, secret))


def hash_secret(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()


def split_key(token: str) -> tuple[str, str] | None:
    """The id and secret of something shaped like a dhow API key, else None."""
    if not token.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = token[len(KEY_PREFIX) :].partition("_")
    if not sep or len(key_id) != 12 or not secret:
        return None
    return key_id, secret


def verify_secret(salt: str, secret_hash: str, secret: str) -> bool:
    return hmac.compare_digest(hash_secret(salt, secret), secret_hash)
