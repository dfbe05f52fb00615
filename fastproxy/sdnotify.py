"""systemd's readiness protocol (``Type=notify``): one datagram to ``$NOTIFY_SOCKET``.

No dependency: the protocol is a single ``sendto`` of ``READY=1`` (or ``STOPPING=1``) on a unix
datagram socket; a leading ``@`` names a socket in the abstract namespace.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("fastproxy")


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` to systemd if it asked for notifications; True if a datagram was sent."""
    env = os.environ if environ is None else environ
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.error("Failed to notify systemd (%s): %s", state, exc.strerror or exc)
        return False
    return True
