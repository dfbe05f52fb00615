"""fastproxy: an AlloyDB Auth Proxy and connector built for throughput and connection count.

Architecture (one rule for the whole house): the loop knows file descriptors, a connection knows
its states, ``tls`` knows bytes, ``mdx`` knows messages, ``refresh`` knows time. Imports point
downward only; the composition root wires the loop, the refresher and the health server together.

* ``loop``: the single-threaded ``selectors`` loop (timers, thread-safe call queue).
* ``buffers``: the preallocated slab pool and per-direction send queues with watermarks.
* ``tls`` / ``tlsctx``: the TLS 1.3 client pump on pyOpenSSL memory BIOs; immutable contexts.
* ``mdx``: the sans-IO metadata-exchange codec. ``instance_uri``, ``duration``: pure parsers.
* ``source``: connection-info sources (what a listener dials, published atomically).
* ``connection``: one proxied session's state machine. ``listener``: listening sockets.
* ``proxy``: the embeddable forwarding loop (:class:`Proxy`). ``__main__``: the command line.

``fastproxy.emulator`` is a self-contained AlloyDB stand-in (Admin API, CA, server-side TLS proxy)
used by the tests, the demo and the benchmarks. It shares no protocol code with the proxy so that
a bug in one cannot hide a bug in the other; for the same reason the names below are loaded
lazily, so importing the emulator does not import the proxy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ConnectionInfoSource",
    "DialInfo",
    "Listener",
    "Proxy",
    "StaticSource",
    "__version__",
    "load_static_file",
    "static_dial_info",
]

_LAZY = {
    "ConnectionInfoSource": "fastproxy.source",
    "DialInfo": "fastproxy.source",
    "StaticSource": "fastproxy.source",
    "load_static_file": "fastproxy.source",
    "static_dial_info": "fastproxy.source",
    "Listener": "fastproxy.listener",
    "Proxy": "fastproxy.proxy",
}

if TYPE_CHECKING:
    from fastproxy.listener import Listener
    from fastproxy.proxy import Proxy
    from fastproxy.source import (
        ConnectionInfoSource,
        DialInfo,
        StaticSource,
        load_static_file,
        static_dial_info,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastproxy' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
