"""Loopback listeners for the service's own HTTP servers (chat page, /metrics) and its broker:
the port asked for, or a free one when that is taken."""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("lamabus")


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def listen(host: str, port: int, *, what: str, backlog: int = 128) -> socket.socket:
    """A listening, non-blocking socket on ``host:port``, or on a free port of ``host`` when that one is
    taken (said in the log, naming ``what`` listens)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for candidate in (port, 0) if port else (0,):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError:
            sock.close()
            if candidate == 0:
                raise
            log.warning("port %d is taken; %s takes a free one", port, what)
            continue
        sock.listen(backlog)
        sock.setblocking(False)
        return sock
    raise AssertionError("unreachable")


def http_url(sock: socket.socket, path: str) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"
