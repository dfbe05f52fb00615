"""AlloyDB instance URIs: parsing, the names derived from them, and the ``?k=v`` option suffix.

An instance is named
``projects/<PROJECT>/locations/<REGION>/clusters/<CLUSTER>/instances/<INSTANCE>``
(protocol.md §1). ``<PROJECT>`` may be a legacy domain-scoped project such as ``google.com:p``
(exactly one colon).

The connectors validate with ``projects/([^:]+(:[^:]+)?)/locations/([^:]+)/clusters/([^:]+)/
instances/([^:]+)``. We match the same shape, anchored at both ends (like the Python connector's
``fullmatch``, unlike Go's unanchored search that ignores a leading prefix), and are stricter on
purpose: ``[^:]`` also matches ``/``, so the connectors accept ``.../instances/i/x`` as an instance
named ``i/x``, which the Admin API would then reject with a confusing error far from the typo. We
reject, up front:

* ``/`` inside any segment, and empty segments;
* whitespace, control characters and ``?`` in any segment (they cannot occur in a real resource
  name, and a NUL or newline would otherwise end up in a socket path or a log line).

Everything here is pure: no I/O, no globals mutated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final

from fastproxy.errors import ConfigError

__all__ = ["InstanceURI", "split_query"]

# One segment: anything but the separators, whitespace, control characters and the query mark.
_SEG: Final = r"[^:/?\s\x00-\x1f\x7f-\x9f]+"
_URI_RE: Final = re.compile(
    rf"projects/(?P<project>{_SEG}(?::{_SEG})?)"
    rf"/locations/(?P<region>{_SEG})"
    rf"/clusters/(?P<cluster>{_SEG})"
    rf"/instances/(?P<name>{_SEG})"
)
_EXPECTED: Final = "projects/<PROJECT>/locations/<REGION>/clusters/<CLUSTER>/instances/<INSTANCE>"

# Option keys are short identifiers like ``port`` or ``unix-socket-path``.
_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")


def _quote(text: str) -> str:
    """Double-quote ``text`` for an error message, escaping quotes and control characters."""
    return json.dumps(text, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class InstanceURI:
    """A validated instance URI. Build it with ``InstanceURI.parse``.

    Equal URIs compare and hash equal, so an ``InstanceURI`` is a good cache key (Go's choice).
    """

    project: str
    region: str
    cluster: str
    name: str

    @classmethod
    def parse(cls, uri: str) -> InstanceURI:
        """Parse and validate ``uri`` (without any ``?query``; see ``split_query``).

        Raises ``ConfigError`` with the expected shape and the offending input.
        """
        m = _URI_RE.fullmatch(uri)
        if m is None:
            raise ConfigError(
                f"invalid instance URI, expected {_EXPECTED} (instance URI = {_quote(uri)})"
            )
        return cls(m["project"], m["region"], m["cluster"], m["name"])

    @property
    def uri(self) -> str:
        """The canonical URI; also the ``connectionInfo`` parent name (protocol.md §1.3)."""
        return (
            f"projects/{self.project}/locations/{self.region}"
            f"/clusters/{self.cluster}/instances/{self.name}"
        )

    @property
    def cluster_parent(self) -> str:
        """The cluster resource name: ``generateClientCertificate`` is cluster-scoped (§1.3)."""
        return f"projects/{self.project}/locations/{self.region}/clusters/{self.cluster}"

    @property
    def short(self) -> str:
        """``project.region.cluster.instance``: the form for logs and errors (Go's ``String``)."""
        return f"{self.project}.{self.region}.{self.cluster}.{self.name}"

    @property
    def socket_dir_name(self) -> str:
        """Directory name for the instance's Unix socket, as the Auth Proxy names it.

        The short form with the domain-scope ``:`` replaced by ``_`` (``:`` is awkward in paths and
        forbidden on some filesystems), lower-cased. Never contains ``/``, so it cannot escape the
        socket directory.
        """
        return self.short.replace(":", "_").lower()

    def __str__(self) -> str:
        return self.uri


def split_query(arg: str) -> tuple[str, dict[str, str]]:
    """Split a command-line instance argument ``URI?k=v&k2`` into the URI and its options.

    A bare key (``k2``) maps to ``""``. Values are taken literally (no percent-decoding) and may
    contain ``=``. Raises ``ConfigError`` for an empty query after ``?``, an empty pair (``&&``,
    trailing ``&``), an empty or non-identifier key, a second ``?``, or a duplicated key: silently
    picking one of two ``port=`` values would hide a typo. The URI part is not validated here.
    """
    uri, sep, query = arg.partition("?")
    if not sep:
        return arg, {}
    if not query:
        raise ConfigError(f"empty option list after '?' in {_quote(arg)}")
    if "?" in query:
        raise ConfigError(f"more than one '?' in {_quote(arg)}")
    options: dict[str, str] = {}
    for pair in query.split("&"):
        if not pair:
            raise ConfigError(f"empty option (stray '&') in {_quote(arg)}")
        key, _, value = pair.partition("=")
        if not _KEY_RE.fullmatch(key):
            raise ConfigError(f"malformed option {_quote(pair)} in {_quote(arg)}")
        if key in options:
            raise ConfigError(f"option {key!r} given more than once in {_quote(arg)}")
        options[key] = value
    return uri, options
