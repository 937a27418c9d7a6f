"""Verify spectrawatch webhooks in a receiver (Standard Webhooks, https://www.standardwebhooks.com).

Every delivery carries three headers:

- ``webhook-id``: the message id, stable across retries (deduplicate on it);
- ``webhook-timestamp``: integer Unix seconds of this attempt;
- ``webhook-signature``: space-separated ``v1,<base64 HMAC-SHA256>`` signatures of
  ``f"{id}.{timestamp}.{body}"`` keyed by the base64-decoded secret (``whsec_<base64>``).

Usage in a receiver::

    from spectrawatch.webhooks import verify, WebhookVerificationError
    try:
        event = verify(request_body_bytes, request.headers, "whsec_...")
    except WebhookVerificationError:
        return 400

``secret`` may be a list during a secret rotation: any matching secret verifies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_SECONDS = 300  # the spec's recommended replay window (5 minutes)


class WebhookVerificationError(ValueError):
    """The message must be rejected: headers missing, timestamp outside tolerance, bad signature."""


def secret_key(secret: str | bytes) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (raw bytes pass through)."""
    if isinstance(secret, bytes):
        key = secret
    else:
        encoded = secret.removeprefix(SECRET_PREFIX)
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error as exc:
            raise ValueError("webhook secret is not base64 after the 'whsec_' prefix") from exc
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def sign(msg_id: str, timestamp: int, body: bytes | str, secret: str | bytes) -> str:
    """The ``v1,<base64>`` signature of one message (one entry of ``webhook-signature``)."""
    data = body.encode() if isinstance(body, str) else body
    content = f"{msg_id}.{int(timestamp)}.".encode() + data
    digest = hmac.new(secret_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(
    msg_id: str, timestamp: int, body: bytes | str, secrets: str | bytes | Sequence[str | bytes]
) -> dict[str, str]:
    """The three Standard Webhooks headers; several secrets give several signatures."""
    keys = [secrets] if isinstance(secrets, (str, bytes)) else list(secrets)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": " ".join(sign(msg_id, timestamp, body, k) for k in keys),
    }


def verify(
    payload: bytes | str,
    headers: Mapping[str, str],
    secret: str | bytes | Sequence[str | bytes],
    *,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> Any:
    """Check a delivery and return its JSON-decoded body.

    ``headers`` is any mapping (case-insensitive lookup of the three headers). Raises
    :class:`WebhookVerificationError` when a header is missing, the timestamp is more than
    ``tolerance`` seconds from ``now`` (replay protection), or no ``v1`` signature matches
    any of the secrets. Signatures are compared in constant time.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id")
    stamp = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not (msg_id and stamp and signatures):
        raise WebhookVerificationError(
            "missing webhook-id, webhook-timestamp or webhook-signature header"
        )
    try:
        timestamp = int(stamp)
    except ValueError as exc:
        raise WebhookVerificationError(f"webhook-timestamp {stamp!r} is not an integer") from exc
    current = time.time() if now is None else now
    if timestamp < current - tolerance:
        raise WebhookVerificationError("message timestamp too old")
    if timestamp > current + tolerance:
        raise WebhookVerificationError("message timestamp too new")
    data = payload.encode() if isinstance(payload, str) else payload
    keys = [secret] if isinstance(secret, (str, bytes)) else list(secret)
    expected = [base64.b64decode(sign(msg_id, timestamp, data, k).split(",", 1)[1]) for k in keys]
    for entry in signatures.split(" "):
        version, _, encoded = entry.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            continue
        if any(hmac.compare_digest(given, e) for e in expected):
            try:
                return json.loads(data)
            except ValueError as exc:
                raise WebhookVerificationError("signed body is not JSON") from exc
    raise WebhookVerificationError("no matching signature")


__all__ = [
    "SECRET_PREFIX",
    "WebhookVerificationError",
    "secret_key",
    "sign",
    "signature_headers",
    "verify",
]
