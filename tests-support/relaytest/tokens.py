"""HS256 JWTs with the standard library, for harness code that signs tokens without a JWT package (the
SDK scenarios sign theirs with PyJWT or the SDK's own tooling on purpose: third-party signers)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any


def b64url(raw: bytes) -> str:
    """Base64url without padding, as JWS wants it."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hs256(claims: dict[str, Any], secret: str) -> str:
    """`claims` signed with HMAC-SHA256 under `secret` (a connection token with `sub`, a subscription
    token with `sub` and `channel`)."""
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = b64url(json.dumps(claims, separators=(",", ":")).encode())
    sig = b64url(hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"
