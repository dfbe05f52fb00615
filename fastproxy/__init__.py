"""fastproxy: an AlloyDB Auth Proxy and connector built for throughput and connection count.

Architecture (one rule for the whole house): the loop knows file descriptors, a connection knows
its states, ``tls`` knows bytes, ``mdx`` knows messages, ``refresh`` knows time. Imports point
downward only; the composition root wires the loop, the refresher and the health server together.

``fastproxy.emulator`` is a self-contained AlloyDB stand-in (Admin API, CA, server-side TLS proxy)
used by the tests, the demo and the benchmarks. It shares no protocol code with the proxy so that
a bug in one cannot hide a bug in the other.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
