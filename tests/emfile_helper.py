"""``python -m tests.emfile_helper STATIC_JSON TOKEN NOFILE``: an in-process proxy with a tiny
RLIMIT_NOFILE, for the listener's out-of-descriptors test.

Prints ``PORT <n>`` once listening, logs to stdout, prints ``STATS accepted=<n>`` on SIGUSR1,
stops on SIGTERM. The soft descriptor limit is
lowered *before* the proxy starts (the CLI would raise it back to the hard limit).
"""

from __future__ import annotations

import logging
import resource
import signal
import sys
from pathlib import Path

from fastproxy.instance_uri import InstanceURI
from fastproxy.listener import Listener
from fastproxy.proxy import Proxy
from fastproxy.source import StaticSource, load_static_file, static_dial_info
from tests.e2e_support import DEMO_URI


def main(argv: list[str]) -> int:
    static, token, nofile = Path(argv[0]), argv[1], int(argv[2])
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")
    info = static_dial_info(
        load_static_file(static), InstanceURI.parse(DEMO_URI), exchange_token=token
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
    listener = Listener.tcp("127.0.0.1", 0, StaticSource(info))
    proxy = Proxy([listener], slab_count=16)

    def report() -> None:
        print(f"STATS accepted={proxy.stats()['accepted']}", flush=True)

    signal.signal(signal.SIGTERM, lambda signum, frame: proxy.stop())
    # SIGUSR1: print the accepted count (from the loop, not from inside the signal handler).
    signal.signal(signal.SIGUSR1, lambda signum, frame: proxy.loop.call_soon_threadsafe(report))
    print(f"PORT {listener.port}", flush=True)
    proxy.run()
    print("STOPPED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
