"""systemd integration: socket activation (LISTEN_FDS) and sd_notify. No-ops elsewhere."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


def listen_socket() -> socket.socket | None:
    """Return the socket passed by systemd socket activation, or None.

    Only honoured when ``LISTEN_PID`` names this process, as sd_listen_fds(3) requires;
    exactly one AF_UNIX stream socket is accepted.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if count != 1:
        raise RuntimeError(f"systemd passed {count} sockets; sidekey expects exactly one")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise RuntimeError("systemd passed a socket that is not an AF_UNIX stream socket")
    os.set_inheritable(SD_LISTEN_FDS_START, False)
    log.info("using socket from systemd socket activation")
    return sock


def notify(state: str) -> None:
    """Send ``state`` to systemd's notification socket if ``NOTIFY_SOCKET`` is set."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.sendall(state.encode())
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc.strerror)
