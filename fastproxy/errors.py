"""The fastproxy exception hierarchy (minimal placeholder; the errors module owner extends it)."""

from __future__ import annotations


class FastproxyError(Exception):
    """Base class of every error fastproxy raises on purpose."""


class TLSFailure(FastproxyError):
    """A TLS handshake, verification or record-layer failure on an instance connection."""
