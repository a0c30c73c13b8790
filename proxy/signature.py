"""Signatures over reasoning text, so reasoning a client replays can be trusted.

Anthropic clients send `thinking` blocks back with the `signature` they received; Responses
clients (Codex, with `store: false`) send `reasoning` items back with `encrypted_content`.
Both carry an HMAC-SHA256 of the reasoning text under a server secret: a replayed block whose
signature verifies is exactly what this server generated and is re-rendered byte for byte
(the rendered bytes are the KV-cache key). One that does not verify (another provider's
signature, a server restarted with a fresh random secret, an edited text) is dropped from
the prompt, never trusted: see `proxy.translate`.

`encrypted_content` is signed, not encrypted: the reasoning is also sent in clear in the same
item, so hiding it would protect nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from aiohttp import web

from proxy import state

_PREFIX = "dsml1."  # version tag: lets a later format be told apart from this one


class ReasoningSigner:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the reasoning signing secret must be at least 16 bytes")
        self._secret = secret

    def sign(self, text: str) -> str:
        mac = hmac.new(self._secret, text.encode(), hashlib.sha256).digest()
        return _PREFIX + base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def verify(self, text: str, signature: str | None) -> bool:
        if not isinstance(signature, str):
            return False
        return hmac.compare_digest(self.sign(text).encode(), signature.encode())

    # Responses: the reasoning text travels inside the signed blob itself.

    def seal(self, text: str) -> str:
        body = base64.urlsafe_b64encode(text.encode()).decode()
        return body + "~" + self.sign(text)

    def unseal(self, blob: str | None) -> str | None:
        """The reasoning text of a blob made by `seal`, or None if it does not verify."""
        if not isinstance(blob, str) or "~" not in blob:
            return None
        body, _, signature = blob.partition("~")
        try:
            text = base64.urlsafe_b64decode(body.encode()).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        return text if self.verify(text, signature) else None


def signer_from_secret(secret: str | None) -> ReasoningSigner:
    """The configured secret, or a random one for this process only."""
    return ReasoningSigner(secret.encode() if secret else secrets.token_bytes(32))


SIGNER = web.AppKey("reasoning_signer", ReasoningSigner)


def app_signer(app: web.Application) -> ReasoningSigner:
    """The app's signer, created at route setup by whichever protocol comes first."""
    signer = app.get(SIGNER)
    if signer is None:
        secret = app[state.SETTINGS].reasoning_signing_secret
        signer = signer_from_secret(secret.get_secret_value() if secret else None)
        app[SIGNER] = signer
    return signer
