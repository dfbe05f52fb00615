"""An asyncio-streams TLS client proxy (a load-test peer), on uvloop when it is installed.

What a Python user writes with asyncio: ``asyncio.start_server``, ``asyncio.open_connection``
with an ``ssl.SSLContext`` (TLS 1.3, client certificate, CA-only trust, IP SAN check), and two
``read``/``write``/``drain`` copy tasks per connection. No metadata exchange. Run:
``python -m perf.peers.asyncio_proxy --listen 127.0.0.1:PORT --upstream IP:5433 --ca ca.pem
--cert client.pem --key client.key [--no-uvloop]``; prints ``ready (uvloop|asyncio)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import ssl
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        else:
            writer.close()
    except (OSError, ssl.SSLError, RuntimeError):
        writer.close()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m perf.peers.asyncio_proxy")
    p.add_argument("--listen", required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args()
    lhost, lport = args.listen.rsplit(":", 1)
    uhost, uport_s = args.upstream.rsplit(":", 1)
    uport = int(uport_s)

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(args.cert, args.key)

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            u_reader, u_writer = await asyncio.wait_for(
                asyncio.open_connection(uhost, uport, ssl=ctx, server_hostname=uhost), 30
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            print(f"asyncio_proxy: dial failed: {exc}", file=sys.stderr)
            c_writer.close()
            return
        sock = u_writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(pipe(c_reader, u_writer), pipe(u_reader, c_writer))
        u_writer.close()
        c_writer.close()

    async def serve(flavour: str) -> None:
        server = await asyncio.start_server(handle, lhost, int(lport), backlog=4096)
        print(f"ready ({flavour})", flush=True)
        async with server:
            await server.serve_forever()

    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(serve("uvloop"))
            return 0
    asyncio.run(serve("asyncio"))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
