"""systemd integration: socket activation (LISTEN_FDS), sd_notify and the service
watchdog. No-ops elsewhere."""

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
        # Called from the event loop (the watchdog pings): a full receive queue at
        # systemd's end must cost a lost datagram and a warning, never a stalled loop.
        s.setblocking(False)
        try:
            s.connect(addr)
            s.sendall(state.encode())
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc.strerror)


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, as
    sd_watchdog_enabled(3) advises, or None when systemd asked for none.

    None when ``WATCHDOG_USEC`` is unset, or when ``WATCHDOG_PID`` is set and names another
    process (the variables were inherited from a parent that systemd watches, not meant
    for us). A malformed value is logged and ignored rather than stopping the start:
    systemd then restarts the unit for a missed watchdog, which is visible in its status.
    """
    raw = os.environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number: no watchdog pings", raw[:32])
        return None
    if usec <= 0:
        log.warning("WATCHDOG_USEC=%d is not positive: no watchdog pings", usec)
        return None
    return usec / 2_000_000
