"""Standard Webhooks signing on the sending side (the algorithm lives in ``spectrawatch.webhooks``,
shared with receivers, so both ends agree by construction and tests check it against the spec)."""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from typing import Any

from spectrawatch.webhooks import SECRET_PREFIX, secret_key, signature_headers

SECRET_BYTES = 32  # 256-bit HMAC keys (the spec asks for 24-64 bytes)


def generate_secret() -> str:
    """A fresh ``whsec_<base64>`` secret."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def check_secret(secret: str) -> str:
    """Validate a caller-supplied secret: ``whsec_`` + base64 of 24..64 bytes. Returns it."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("secret must start with 'whsec_' followed by base64")
    key = secret_key(secret)
    if not 24 <= len(key) <= 64:
        raise ValueError(f"secret must encode 24-64 bytes, got {len(key)}")
    return secret


def new_message_id() -> str:
    """A message id: stable across retries of one delivery, unique across deliveries."""
    return f"msg_{uuid.uuid4().hex}"


def encode_body(payload: Any) -> bytes:
    """The exact bytes sent and signed (compact, key-sorted JSON, UTF-8)."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def signed_headers(msg_id: str, timestamp: int, body: bytes, secret: str) -> dict[str, str]:
    """Standard Webhooks headers plus the content type."""
    return {
        **signature_headers(msg_id, timestamp, body, secret),
        "content-type": "application/json",
        "user-agent": "spectrawatch-webhooks",
    }
