"""A thread-per-connection TLS client proxy on the stdlib ``ssl`` module (a load-test peer).

What a Python user writes when they need "an Auth Proxy" in an afternoon: accept, and for each
client one thread that dials the upstream with ``ssl.SSLContext.wrap_socket`` (TLS 1.3, client
certificate, CA-only trust, IP SAN check) and copies both ways. No metadata exchange. Run:
``python -m perf.peers.threaded --listen 127.0.0.1:PORT --upstream IP:5433 --ca ca.pem
--cert client.pem --key client.key``; prints ``ready`` once listening.

Why one thread per connection and not the usual two (one per direction): the two-thread
version reads and writes one ``SSLSocket`` from two threads at once, which OpenSSL does not
support; in this benchmark it lost data and stalled connections. So each thread runs a tiny
``poll`` loop over its two non-blocking sockets instead.
"""

from __future__ import annotations

import argparse
import contextlib
import select
import socket
import ssl
import sys
import threading

BUF = 65536
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def relay(client: socket.socket, upstream: ssl.SSLSocket) -> None:
    """Copy both ways until either side closes; bounded buffers (one chunk per direction)."""
    client.setblocking(False)
    upstream.setblocking(False)
    to_up, to_client = b"", b""
    client_open = upstream_open = True
    while (client_open or to_up) and (upstream_open or to_client):
        progress = False
        if client_open and not to_up:
            with contextlib.suppress(*_WOULD_BLOCK):
                to_up = client.recv(BUF)
                client_open = bool(to_up)
                progress = True
        if to_up:
            with contextlib.suppress(*_WOULD_BLOCK):
                to_up = to_up[upstream.send(to_up) :]
                progress = True
        if upstream_open and not to_client:
            with contextlib.suppress(*_WOULD_BLOCK):
                to_client = upstream.recv(BUF)
                upstream_open = bool(to_client)
                progress = True
        if to_client:
            with contextlib.suppress(*_WOULD_BLOCK):
                to_client = to_client[client.send(to_client) :]
                progress = True
        if progress or (upstream_open and not to_client and upstream.pending()):
            continue
        # poll, not select: descriptors go far above 1024 with thousands of connections
        poller = select.poll()
        for sock, want_read, want_write in (
            (client, client_open and not to_up, bool(to_client)),
            (upstream, upstream_open and not to_client, bool(to_up)),
        ):
            mask = (select.POLLIN if want_read else 0) | (select.POLLOUT if want_write else 0)
            if mask:
                poller.register(sock, mask)
        poller.poll(60_000)


def handle(client: socket.socket, ctx: ssl.SSLContext, host: str, port: int) -> None:
    try:
        with client:
            raw = socket.create_connection((host, port), timeout=30)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with ctx.wrap_socket(raw, server_hostname=host) as upstream:
                relay(client, upstream)
    except OSError as exc:  # ssl.SSLError is an OSError
        print(f"threaded: connection ended: {exc}", file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m perf.peers.threaded")
    p.add_argument("--listen", required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    args = p.parse_args()
    lhost, lport = args.listen.rsplit(":", 1)
    uhost, uport = args.upstream.rsplit(":", 1)

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(args.cert, args.key)

    server = socket.create_server((lhost, int(lport)), backlog=4096)
    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(client, ctx, uhost, int(uport)), daemon=True).start()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
