"""The process's own log on stderr (not the audit log): ``log.format`` text (the default,
unchanged) or JSON lines, the request being handled on every line, and syslog
priority prefixes when stderr is the journal.

JSON: one object per line, encoded by msgspec (no hand-made escaping): ``ts`` (UTC, ms),
``level``, ``logger``, ``message``, ``pid``, and while a request is being handled
(:data:`REQUEST`, set by the dispatcher ``Sidekey.handle``; trio tasks inherit
contextvars, so every line its tasks write carries it) ``request_id``, ``method``,
``path``, then ``trace_id``, ``server``, ``tool``, ``code``, ``status`` as they become
known; ``exc`` holds a traceback. Under journald also ``PRIORITY`` and
``SYSLOG_IDENTIFIER``.

journald (systemd.exec(5) ``JOURNAL_STREAM``): when stderr *is* the journal stream
(the variable's ``device:inode`` is stderr's), every line starts with the sd-daemon(3)
``<N>`` prefix (``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>`` debug), which
journald strips into the entry's ``PRIORITY`` (``SyslogLevelPrefix=`` is on by default);
a JSON line is prefixed too, so ``journalctl -p warning`` works for both formats and
the ``MESSAGE`` journald keeps is the bare JSON object. A process whose stderr was
redirected elsewhere (the variable inherited, the fd not) writes no prefixes.

What goes in a line is what the code logs: no log call in sidekey passes a secret, a
token or a header value (the leak tests grep the daemon's log in both formats). The
request fields come from the request's own metadata (ids, route, the server and tool
names it named, capped in length), never from its body's values.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import IO, Any, Literal

import msgspec

LogFormat = Literal["text", "json"]
LEVELS = ("debug", "info", "warning", "error")
# The text format sidekey always had; unchanged (journal prefixes aside).
TEXT_FORMAT = "sidekey[%(process)d] %(levelname)s %(name)s: %(message)s"
SYSLOG_IDENTIFIER = "sidekey"
# Logger of the one line per request (log.requests).
REQUEST_LOGGER = "sidekey.request"
# A caller names the server, tool and path: a log line shows at most this much of each.
MAX_FIELD_CHARS = 128

_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class RequestLog:
    """The request a task is handling, as its log lines show it."""

    request_id: str
    method: str
    path: str
    trace_id: str | None = None
    server: str | None = None
    tool: str | None = None
    code: str | None = None
    # The response's HTTP status (shown as "status"; not named so: only error
    # constructors set a `.status`, tests/test_error_statuses.py).
    http_status: int | None = None
    duration_ms: float | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"request_id": self.request_id, "method": self.method,
                               "path": self.path}
        for key, attr in (("trace_id", "trace_id"), ("server", "server"), ("tool", "tool"),
                          ("code", "code"), ("status", "http_status"),
                          ("duration_ms", "duration_ms")):
            value = getattr(self, attr)
            if value is not None:
                out[key] = value
        return out


# The request being handled by this task (and the tasks it starts); None elsewhere.
REQUEST: contextvars.ContextVar[RequestLog | None] = contextvars.ContextVar(
    "sidekey_request", default=None)


def _capped(value: str | None) -> str | None:
    return value if value is None or len(value) <= MAX_FIELD_CHARS else value[:MAX_FIELD_CHARS] + "…"


def note(*, server: str | None = None, tool: str | None = None, code: str | None = None) -> None:
    """Record facts of the current request once known (no-op outside a request)."""
    req = REQUEST.get()
    if req is None:
        return
    if server is not None:
        req.server = _capped(server)
    if tool is not None:
        req.tool = _capped(tool)
    if code is not None:
        req.code = _capped(code)


def current_trace_id() -> str | None:
    """The trace-id the current request's ``traceparent`` carried, if any."""
    req = REQUEST.get()
    return req.trace_id if req is not None else None


def syslog_priority(levelno: int) -> int:
    """sd-daemon(3) / syslog(3) priority of a logging level."""
    if levelno >= logging.CRITICAL:
        return 2  # SD_CRIT
    if levelno >= logging.ERROR:
        return 3  # SD_ERR
    if levelno >= logging.WARNING:
        return 4  # SD_WARNING
    if levelno >= logging.INFO:
        return 6  # SD_INFO
    return 7  # SD_DEBUG


def stream_is_journal(stream: IO[str], environ: dict[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (``JOURNAL_STREAM``
    is ``<st_dev>:<st_ino>`` in decimal and matches the stream's fd; systemd.exec(5))."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False  # no fd (a test's StringIO, a closed stream)
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class TextFormatter(logging.Formatter):
    """The text format, each line prefixed with ``<N>`` under journald (a traceback's
    lines too: journald makes one entry per line)."""

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__(TEXT_FORMAT)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journal:
            return text
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        req = REQUEST.get()
        if req is not None:
            out.update(req.fields())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        priority = syslog_priority(record.levelno)
        if self.journal:
            out["PRIORITY"] = str(priority)
            out["SYSLOG_IDENTIFIER"] = SYSLOG_IDENTIFIER
        try:
            line = _encoder.encode(out).decode()
        except (UnicodeEncodeError, msgspec.EncodeError):
            # A lone surrogate (bytes decoded with surrogateescape) is not UTF-8: such
            # strings are written with the offending characters escaped instead.
            line = _encoder.encode({k: _printable(v) for k, v in out.items()}).decode()
        return f"<{priority}>{line}" if self.journal else line


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def formatter(fmt: LogFormat, *, journal: bool) -> logging.Formatter:
    return JsonFormatter(journal=journal) if fmt == "json" else TextFormatter(journal=journal)


_handler: logging.Handler | None = None


# Libraries whose lower levels would write what no sidekey log may hold, and the lowest
# level each may log at: httpx logs every request's URL at INFO (query values, a
# query-injected egress credential), httpcore every response head at DEBUG (an upstream
# or token endpoint may echo a credential in a header).
LIBRARY_FLOORS = (("httpx", logging.WARNING), ("httpcore", logging.INFO))


def configure(fmt: LogFormat, level: str, *, stream: IO[str] | None = None) -> None:
    """Send the root logger to ``stream`` (stderr) in ``fmt`` at ``level``.

    Called by the CLI at start (text) and by ``serve`` again with the config's
    ``log:``; replaces the handler an earlier call installed. Like
    ``logging.basicConfig``, does nothing when someone else already gave the root
    logger a handler (a host application, pytest), so embedding sidekey's CLI never
    doubles that application's log.
    """
    global _handler
    numeric = getattr(logging, level.upper())
    for name, floor in LIBRARY_FLOORS:  # even when the host application owns the handler
        logging.getLogger(name).setLevel(max(floor, numeric))
    root = logging.getLogger()
    if any(h is not _handler for h in root.handlers):
        return
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter(fmt, journal=stream_is_journal(out)))
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    _handler = handler


def request_lines(fmt: LogFormat, requests: bool | None) -> bool:
    """Whether the daemon logs one line per request: ``log.requests``, by default on
    with JSON (the point of a structured log) and off with text (as before; the audit
    log records every decision either way)."""
    return requests if requests is not None else fmt == "json"
