"""The ``syslog`` audit sink: RFC 5424 messages to a local Unix datagram socket
(``/dev/log``: journald, rsyslog) or over TCP, optionally TLS, with RFC 6587
octet-counting framing (``LEN SP MSG``).

Every message is one committed line of the audit file (see :mod:`sidekey.audit.forward`)::

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG

PRI = facility * 8 + severity (severity from the event: 6 informational, 4 warning for a
refusal, 3 error for a failure or an audit repair; the CEF severity scale mapped down),
TIMESTAMP = the event's ``timestamp``, HOSTNAME its ``host``, PROCID the daemon's pid,
MSGID its ``event_type`` (32 characters at most), no structured data, and MSG the line as
the file holds it (``format: json``, chain fields included) or its CEF form
(``format: cef``, :func:`sidekey.audit.export.to_cef`). A MSG over ``max_message_bytes``
is cut and ends with ``…[truncated N bytes sha256=H]`` (H: the file line's chain hash,
so the full event can be found in the file).
"""

from __future__ import annotations

import datetime
import errno
import os
import re
import socket
import ssl
from typing import Any

import trio

from .chain import line_hash
from .export import cef_severity, event_of, to_cef
from .forward import (
    DEFAULT_DELIVER_TIMEOUT_S,
    DEFAULT_QUEUE_MAX,
    DEFAULT_QUEUE_MAX_BYTES,
    Forwarder,
    Line,
)

FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "security": 13, "console": 14,
    "solaris-cron": 15, **{f"local{i}": 16 + i for i in range(8)},
}
# CEF severity (sidekey.audit.export.cef_severity) -> syslog severity.
_SEVERITY = {3: 6, 5: 4, 7: 3}
DEFAULT_MAX_MESSAGE_BYTES = 8192
# A datagram the local socket refuses as too long (EMSGSIZE: its buffer is smaller than
# max_message_bytes) is sent again cut to this, rather than blocking the queue for good.
DGRAM_FALLBACK_BYTES = 2048
MIN_MESSAGE_BYTES = 256
CONNECT_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 5.0
_PRINTUSASCII = re.compile(r"[\x21-\x7e]+")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)")


def _field(value: Any, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit``, or ``-``."""
    text = value if isinstance(value, str) else ""
    text = "".join(_PRINTUSASCII.findall(text))[:limit]
    return text or "-"


def format_message(line: bytes, *, facility: int, app_name: str, procid: str, fmt: str,
                   max_message_bytes: int) -> bytes:
    """One RFC 5424 message (without transport framing) for a committed file line."""
    event = event_of(line)
    severity = _SEVERITY.get(cef_severity(event), 6)
    ts = event.get("timestamp")
    if not (isinstance(ts, str) and _TIMESTAMP.fullmatch(ts)):
        ts = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace(
            "+00:00", "Z")
    header = (f"<{facility * 8 + severity}>1 {ts} {_field(event.get('host'), 255)} "
              f"{_field(app_name, 48)} {_field(procid, 128)} {_field(event.get('event_type'), 32)} -")
    msg = line if fmt == "json" else to_cef(event).encode("utf-8", "replace")
    if len(msg) > max_message_bytes:
        marker = f"…[truncated {len(msg)} bytes sha256={line_hash(line)}]"
        keep = max_message_bytes - len(marker.encode())
        # Cut on a UTF-8 character boundary (never leave half a character).
        cut = msg[:keep].decode("utf-8", "ignore").encode("utf-8")
        msg = cut + marker.encode()
    return header.encode("ascii") + b" " + msg


class SyslogSink(Forwarder):
    """Sends committed audit lines as RFC 5424 messages (see the module docstring)."""

    kind = "syslog"

    def __init__(self, name: str, *, transport: str = "unix", socket_path: str = "/dev/log",
                 host: str | None = None, port: int = 6514, tls: bool = False,
                 ca_file: str | None = None, fmt: str = "json", facility: str = "authpriv",
                 app_name: str = "sidekey", max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 required: bool = False, queue_max: int = DEFAULT_QUEUE_MAX,
                 queue_max_bytes: int = DEFAULT_QUEUE_MAX_BYTES,
                 deliver_timeout_s: float = DEFAULT_DELIVER_TIMEOUT_S) -> None:
        super().__init__(name, required=required, queue_max=queue_max,
                         queue_max_bytes=queue_max_bytes, deliver_timeout_s=deliver_timeout_s)
        if transport not in ("unix", "tcp"):
            raise ValueError(f"syslog transport {transport!r}")
        if fmt not in ("json", "cef"):
            raise ValueError(f"syslog format {fmt!r}")
        self.transport = transport
        self.socket_path = socket_path
        self.host = host
        self.port = port
        self.tls = tls
        self.ca_file = ca_file
        self.fmt = fmt
        self.facility = FACILITIES[facility]
        self.app_name = app_name
        self.max_message_bytes = max(MIN_MESSAGE_BYTES, max_message_bytes)
        self.procid = str(os.getpid())
        self.truncated = 0
        self._dgram: trio.socket.SocketType | None = None
        self._stream: trio.abc.Stream | None = None

    def describe(self) -> dict[str, Any]:
        where = (self.socket_path if self.transport == "unix"
                 else f"{self.host}:{self.port}")
        return {"transport": self.transport, "address": where, "tls": self.tls,
                "format": self.fmt, "truncated": self.truncated}

    def _message(self, line: bytes, limit: int | None = None) -> bytes:
        msg = format_message(line, facility=self.facility, app_name=self.app_name,
                             procid=self.procid, fmt=self.fmt,
                             max_message_bytes=limit or self.max_message_bytes)
        if msg.endswith(b"]") and b"\xe2\x80\xa6[truncated " in msg:
            self.truncated += 1
        return msg

    async def _connect(self) -> None:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            if self.transport == "unix":
                sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                try:
                    await sock.connect(self.socket_path)
                except BaseException:
                    sock.close()
                    raise
                self._dgram = sock
                return
            stream: trio.abc.Stream = await trio.open_tcp_stream(self.host or "localhost", self.port)
            if self.tls:
                # Verification always on: system CAs or ca_file, and the host name.
                context = ssl.create_default_context(cafile=self.ca_file)
                tls_stream = trio.SSLStream(stream, context, server_hostname=self.host)
                try:
                    await tls_stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    await trio.aclose_forcefully(stream)
                    cause = exc.__cause__
                    reason = getattr(cause, "reason", None) or type(cause).__name__
                    raise OSError(errno.EPROTO, f"TLS handshake failed: {reason}") from exc
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
                stream = tls_stream
            self._stream = stream

    async def send(self, lines: list[Line]) -> None:
        try:
            if self._dgram is None and self._stream is None:
                await self._connect()
            with trio.fail_after(SEND_TIMEOUT_S):
                if self._dgram is not None:
                    for _, line in lines:
                        try:
                            await self._dgram.send(self._message(line))
                        except OSError as exc:
                            if exc.errno != errno.EMSGSIZE:
                                raise
                            await self._dgram.send(self._message(line, DGRAM_FALLBACK_BYTES))
                elif self._stream is not None:
                    # RFC 6587 octet counting: "LEN SP MSG" per message.
                    out = bytearray()
                    for _, line in lines:
                        msg = self._message(line)
                        out += b"%d " % len(msg) + msg
                    await self._stream.send_all(bytes(out))
        except trio.TooSlowError as exc:
            raise TimeoutError("syslog connect or send timed out") from exc
        except ssl.SSLError as exc:
            raise OSError(errno.EPROTO, f"TLS: {exc.reason or type(exc).__name__}") from exc

    async def disconnect(self) -> None:
        if self._dgram is not None:
            self._dgram.close()
            self._dgram = None
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await trio.aclose_forcefully(stream)


__all__ = ["FACILITIES", "SyslogSink", "format_message"]
