"""The fastproxy exception hierarchy.

Errors are grouped by *who is at fault* and *which phase failed*, because that decides what the
proxy does next:

* ``ConfigError`` — the user's mistake (a bad flag, instance URI or file). Reported as one clear
  line and exit code 1; retrying cannot help.
* ``ProtocolError`` — the peer sent bytes that violate a protocol we speak (for example a
  malformed metadata-exchange response). The connection is closed; the local configuration is fine.
* ``ExchangeRefused`` — the server understood us and said no (metadata exchange answered ERROR or
  UNSPECIFIED). Carries the server's own message, which is what the user needs to see.
* ``TLSFailure`` — handshake, verification or record-layer failure on an instance connection.

Everything fastproxy raises on purpose derives from ``FastproxyError`` so that the edges (CLI,
connection close path) can tell our errors from bugs. Other modules add their own subclasses here.
"""

from __future__ import annotations

#: Process exit code for configuration errors (the user's mistake).
EXIT_CONFIG_ERROR = 1


class FastproxyError(Exception):
    """Base class of every error fastproxy raises on purpose."""


class ConfigError(FastproxyError):
    """The user's configuration is wrong (flags, instance URI, files); exit code 1.

    The message is shown to the user as is, so it must say what was wrong and what was expected.
    """

    exit_code = EXIT_CONFIG_ERROR


class ProtocolError(FastproxyError):
    """The remote peer violated a wire protocol (framing, encoding, size limits).

    Raised by the sans-IO codecs; the caller decides whether to close or reset the connection.
    """


class ExchangeRefused(FastproxyError):
    """The server answered the metadata exchange with something other than OK.

    ``server_message`` is the server's ``error`` text (possibly empty); ``str(exc)`` is the full
    human-readable message.
    """

    def __init__(self, message: str, server_message: str = "") -> None:
        super().__init__(message)
        self.server_message = server_message


class TLSFailure(FastproxyError):
    """A TLS handshake, verification or record-layer failure on an instance connection."""
