"""``fastproxy wait`` and ``fastproxy shutdown``: talk to a running proxy over its HTTP servers.

``wait`` polls ``/startup`` on the health server until it answers 200 (for scripts and init
containers that must not start before the proxy); ``shutdown`` POSTs ``/quitquitquit`` to the
admin server on 127.0.0.1 (a Kubernetes preStop hook). Both exit 0 on success and 1 with one line
naming the cause otherwise, as every fastproxy usage error does.
"""

from __future__ import annotations

import argparse
import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from fastproxy.duration import parse_duration
from fastproxy.errors import ConfigError

POLL_INTERVAL_S = 1.0
# No proxy from HTTP_PROXY & co: both servers are local to this host or pod (Go's
# ProxyFromEnvironment never proxies localhost or loopback either; urllib would).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _not_http(exc: http.client.HTTPException) -> str:
    # Its text is whatever the peer sent (line breaks included): keep the error one line.
    return f"not an HTTP response ({type(exc).__name__})"


def _check_port(flag: str, port: int) -> None:
    if not 0 < port <= 65535:
        raise ConfigError(f"{flag} must be a port number (1-65535), not {port}")


def wait_main(argv: Sequence[str]) -> int:
    p = _Parser(
        prog="fastproxy wait",
        description="Wait for another fastproxy to start.",
        allow_abbrev=False,
    )
    p.add_argument("--max", "-m", default="30s", help="maximum time to wait (default 30s)")
    p.add_argument("--http-address", default="localhost")
    p.add_argument("--http-port", type=int, default=9090)
    args = p.parse_args(list(argv))
    limit = parse_duration(args.max)
    _check_port("--http-port", args.http_port)
    url = f"http://{_url_host(args.http_address)}:{args.http_port}/startup"
    deadline = time.monotonic() + limit
    last = "no answer"
    while True:
        timeout = max(0.5, min(5.0, deadline - time.monotonic()))
        try:
            with _OPENER.open(url, timeout=timeout) as resp:
                if resp.status == 200:
                    return 0
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
            exc.close()
        except http.client.HTTPException as exc:  # e.g. BadStatusLine: not an HTTP server
            last = _not_http(exc)
        except OSError as exc:  # URLError is an OSError
            reason = getattr(exc, "reason", exc)
            last = str(getattr(reason, "strerror", None) or reason)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConfigError(f"the proxy did not start within {args.max} ({url}: {last})")
        time.sleep(min(POLL_INTERVAL_S, remaining))


def shutdown_main(argv: Sequence[str]) -> int:
    p = _Parser(
        prog="fastproxy shutdown",
        description="Ask a running fastproxy to shut down.",
        allow_abbrev=False,
    )
    p.add_argument("--admin-port", type=int, default=9091, help="admin server port (9091)")
    args = p.parse_args(list(argv))
    _check_port("--admin-port", args.admin_port)
    url = f"http://127.0.0.1:{args.admin_port}/quitquitquit"
    req = urllib.request.Request(url, method="POST", data=b"")
    try:
        with _OPENER.open(req, timeout=10) as resp:
            if resp.status == 200:
                return 0
            raise ConfigError(f"shutdown request failed: HTTP {resp.status} from {url}")
    except urllib.error.HTTPError as exc:
        exc.close()
        raise ConfigError(f"shutdown request failed: HTTP {exc.code} from {url}") from exc
    except http.client.HTTPException as exc:
        raise ConfigError(f"failed to send shutdown request to {url}: {_not_http(exc)}") from exc
    except OSError as exc:  # URLError is an OSError
        reason = getattr(exc, "reason", exc)
        detail = getattr(reason, "strerror", None) or reason
        raise ConfigError(f"failed to send shutdown request to {url}: {detail}") from exc
