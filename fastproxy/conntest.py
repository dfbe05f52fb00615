"""``--run-connection-test``: dial every instance once at start-up, before the loop runs.

It is the only place that drives the TLS pump and the exchange codec with a blocking socket: at
start-up nothing else is running, so a blocking dial is the simplest honest test, and it goes
through the same ``TLSClientSession`` and ``mdx`` code as the loop does.
"""

from __future__ import annotations

import socket
import time

from fastproxy.errors import ExchangeRefused, FastproxyError, ProtocolError, TLSFailure
from fastproxy.mdx import ResponseDecoder, check_response, encode_request
from fastproxy.source import DialInfo
from fastproxy.tls import TLSClientSession


class ConnectionTestFailed(FastproxyError):
    """The start-up dial to an instance failed; the message names the instance and the cause."""


def dial_once(info: DialInfo, timeout: float = 30.0) -> None:
    """TCP + TLS 1.3 handshake + metadata exchange to ``info``; raises ConnectionTestFailed."""
    deadline = time.monotonic() + timeout
    target = f"{info.address}:{info.port}"
    try:
        sock = socket.create_connection((info.address, info.port), timeout=timeout)
    except OSError as exc:
        raise ConnectionTestFailed(
            f"[{info.instance}] failed to dial {target}: {exc.strerror or exc}"
        ) from exc
    try:
        tls = TLSClientSession(info.context, info.address)

        def flush() -> None:
            out = tls.outgoing()
            if out:
                sock.sendall(out)

        def feed() -> None:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            data = sock.recv(65536)
            if data:
                tls.receive_ciphertext(data)
            else:
                tls.receive_eof()

        while not tls.do_handshake():
            flush()
            feed()
        flush()
        if not info.metadata_exchange:
            return
        tls.send(memoryview(encode_request(info.user_agent, info.auth_type, info.exchange_token)))
        flush()
        decoder = ResponseDecoder()
        buf = bytearray(65536)
        while True:
            n = tls.recv_into(memoryview(buf))
            if n is None:
                feed()
                continue
            if n == 0:
                raise ProtocolError("server closed the connection during the metadata exchange")
            resp = decoder.feed(memoryview(buf)[:n])
            if resp is not None:
                check_response(resp)
                return
    except (TLSFailure, ProtocolError, ExchangeRefused) as exc:
        raise ConnectionTestFailed(f"[{info.instance}] connection test failed: {exc}") from exc
    except OSError as exc:
        raise ConnectionTestFailed(
            f"[{info.instance}] connection test to {target} failed: {exc.strerror or exc}"
        ) from exc
    finally:
        sock.close()
