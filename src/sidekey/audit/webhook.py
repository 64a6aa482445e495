"""The ``webhook`` audit sink: HTTPS POST of batches of committed audit lines to a SIEM
collector (Splunk HEC, Elastic ``_bulk``, Datadog's logs intake, or any URL that takes
NDJSON or a JSON array).

**The spool is the audit file.** Every line the sink sends is already fsynced in the
local audit file (the source of truth, :mod:`sidekey.audit.jsonl`), so the sink keeps no
copy: it tails the file (and, after a rotation, the rotated files in order) from a
*cursor*, the last line the collector accepted, saved in
``<state.dir>/audit-sinks/<name>.cursor`` after every accepted batch. Hence:

- at-least-once across restarts and crashes (kill -9 included): the cursor only moves
  after a 2xx, so a restart sends again from the last accepted line; a line can arrive
  twice (after a crash between the 2xx and the cursor save), never zero times while the
  file holds it. Duplicates carry the same ``event_id`` and ``seq`` for the SIEM to drop;
- no second write per event on the call path (the file write is the only one);
- a bounded spool: ``spool_max_bytes`` caps how far behind the file the sink may fall
  (the bytes from the cursor to the end of the current file). Beyond it, while the
  collector is down, the sink skips ahead to the newest ``spool_max_bytes``; rotation
  retention (``keep``) may also delete a file the sink has not sent. Either loss writes
  an ``audit.sink_overflow`` event (first loss of an episode: the seqs lost, the reason)
  and counts in ``dropped``; nothing is lost silently.

Delivery rule as for every forwarder (:mod:`sidekey.audit.forward`): ``required: false``
never delays a call; ``required: true`` makes a durable event's call wait (at most
``deliver_timeout_s``) until the collector accepted every line up to it, else the call
fails with 503 ``audit_unavailable``.

Answers: 2xx accepts the batch (``elastic_bulk``: per item, see :func:`_bulk_outcome`;
``otlp_json``: less ``partialSuccess.rejectedLogRecords``); 401/403 drop the cached auth
secret (fetched again: it may have been rotated) and retry; 400, 413 and 422 halve the
batch (too big, or one bad event in it), and for a single line reject that line
(counted, and one ``audit.sink_rejected`` event per episode): retrying it would block
the sink for good; anything else (408, 429, 5xx, 404 while a URL is fixed...) retries
with backoff (``Retry-After`` in seconds honoured up to the backoff cap). Redirects are
not followed.

Formats: ``ndjson`` (the file's lines), ``json_array`` (one array: Datadog's intake),
``splunk_hec`` (HEC event envelopes, ``/services/collector/event``), ``elastic_bulk``
(``_bulk`` create actions of ECS documents with ``_id`` = ``<log_id>-<seq>``, so a resend
is a 409 and indexed once), ``otlp_json`` (an OTLP/HTTP JSON ``ExportLogsServiceRequest``
for an OpenTelemetry Collector's ``/v1/logs``).

The auth header's value comes from a secret reference (a backend, like a tool's
secrets), fetched when first needed, never from the config text.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from .. import __version__, tracecontext
from .chain import chain_event
from .export import cef_severity, event_of, event_time, read_events, to_ecs
from .forward import (
    BACKOFF_FIRST_S,
    BACKOFF_MAX_S,
    DEFAULT_DELIVER_TIMEOUT_S,
    DRAIN_ON_CLOSE_S,
    OVERFLOW_TYPE,
    Forwarder,
    Line,
)
from .jsonl import MAX_EVENT_BYTES, rotated_files, rotated_last_seq

log = logging.getLogger(__name__)

REJECTED_TYPE = "audit.sink_rejected"
FORMATS = ("ndjson", "json_array", "splunk_hec", "elastic_bulk", "otlp_json")
_CONTENT_TYPES = {"ndjson": "application/x-ndjson", "json_array": "application/json",
                  "splunk_hec": "application/json", "elastic_bulk": "application/x-ndjson",
                  "otlp_json": "application/json"}
# CEF severity (sidekey.audit.export.cef_severity) -> OpenTelemetry SeverityNumber / text.
_OTEL_SEVERITY = {3: (9, "INFO"), 5: (13, "WARN"), 7: (17, "ERROR")}
DEFAULT_BATCH_LINES = 500
DEFAULT_BATCH_BYTES = 1024 * 1024  # Splunk HEC's default max_content_length is 1 MB
DEFAULT_SPOOL_MAX_BYTES = 1024 * 1024 * 1024
DEFAULT_TIMEOUT_S = 10.0
# Answers are read up to this much (an Elastic bulk answer lists every item); beyond it
# the batch counts as failed.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
# The cursor is saved at most this often while batches flow (and always at close): a
# crash resends at most this much more.
CURSOR_SAVE_EVERY_S = 0.5
# With nothing to send the sender wakes on every commit, and at least this often (a
# rotation between two commits, an alert it raised itself).
IDLE_POLL_S = 1.0
# How often the backlog (health's queued_bytes) is measured while batches flow.
BACKLOG_EVERY_S = 1.0


class SendError(OSError):
    """A batch was not accepted (the message names the status or the failure; no
    answer body, no secret)."""


# --------------------------------------------------------------------------- the file tail


@dataclass
class Gap:
    """Lines the sink will never send: ``first..last`` (seqs of the log ``log_id``)."""

    first: int
    last: int
    reason: str  # spool_full, file_deleted, log_changed, missing


@dataclass
class Chunk:
    lines: list[Line] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    at_end: bool = False  # every committed line was read


@dataclass
class Cursor:
    """The last line the collector accepted, and where the line after it starts."""

    log_id: str | None = None
    seq: int = 0
    dev: int = 0
    ino: int = 0
    offset: int = 0

    def to_json(self) -> bytes:
        return json.dumps({"version": 1, "log_id": self.log_id, "seq": self.seq,
                           "dev": self.dev, "ino": self.ino, "offset": self.offset}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Cursor:
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("version") != 1:
            raise ValueError("not a version 1 cursor")
        values = [raw.get(k) for k in ("seq", "dev", "ino", "offset")]
        log_id = raw.get("log_id")
        if not all(type(v) is int and v >= 0 for v in values) or not (
                log_id is None or isinstance(log_id, str)):
            raise ValueError("malformed cursor")
        seq, dev, ino, offset = values
        return cls(log_id=log_id, seq=seq, dev=dev, ino=ino, offset=offset)  # type: ignore[arg-type]


def _chain_fields(line: bytes) -> tuple[int, str] | None:
    """``(seq, log_id)`` of a chained line, None for anything else (a repaired torn
    fragment, garbage)."""
    event = chain_event(line)
    return (event["seq"], event["log_id"]) if event is not None else None


class FileTail:
    """Reads the committed lines of an audit file and its rotated files in chain order,
    from a :class:`Cursor`. Blocking file I/O: call it from a worker thread. Not
    thread-safe (the sink uses one at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cursor = Cursor()
        self._read_to: tuple[int, int, str | None] = (0, 0, None)
        self._fd: int | None = None
        self._gap_reason = "missing"  # why the next seq jump happened (set by skip)

    # ------------------------------------------------------------------ positioning

    def _files(self) -> list[Path]:
        """The rotated files (oldest first) and the current file, those that exist."""
        try:
            files = rotated_files(self.path)
        except OSError:
            files = []
        return [*files, self.path] if self.path.exists() else files

    def _open_at(self, path: Path, offset: int) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        self._close_fd()
        st = os.fstat(fd)
        self._fd = fd
        self.cursor.dev, self.cursor.ino, self.cursor.offset = st.st_dev, st.st_ino, offset
        return True

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self._close_fd()

    def _first_chained(self, path: Path) -> tuple[int, str] | None:
        """``(seq, log_id)`` of the first chained line of ``path`` (None: none yet)."""
        try:
            for _, event in read_events([path]):
                if type(event.get("seq")) is int and isinstance(event.get("log_id"), str):
                    return event["seq"], event["log_id"]
        except OSError:
            return None
        return None

    def start(self, cursor: Cursor | None, committed_seq: int) -> list[Gap]:
        """Position at ``cursor`` (from the cursor file). ``None`` (a new sink): at the end
        of the current file, so a new sink sends from now on (back-fills are what
        ``sidekey audit export`` is for)."""
        if cursor is None:
            if self._open_at(self.path, 0):
                self.cursor.offset = self._size()
                self.cursor.seq = committed_seq
                last = _last_chained(self.path)
                self.cursor.log_id = last[1] if last else None
            return []
        self.cursor = Cursor(log_id=cursor.log_id, seq=cursor.seq)
        # By inode, under any name that starts with the audit file's: ours
        # (audit.jsonl.<time>.<seq>) or logrotate's (audit.jsonl.1).
        try:
            named = [self.path.parent / n for n in sorted(os.listdir(self.path.parent))
                     if n.startswith(self.path.name)]
        except OSError:
            named = []
        for path in named:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if ((st.st_dev, st.st_ino) == (cursor.dev, cursor.ino)
                    and cursor.offset <= st.st_size and self._open_at(path, cursor.offset)):
                return []
        return self._find_next()

    def _find_next(self) -> list[Gap]:
        """Open the file holding the line after ``cursor.seq`` (of ``cursor.log_id``): the
        first rotated file whose name's seq (its last line) is past it, else the current
        file; a first line beyond the next seq is a gap (its file was deleted)."""
        want = self.cursor.seq + 1
        files = self._files()
        current = (self.cursor.dev, self.cursor.ino)
        for path in files:
            last = rotated_last_seq(path)
            if last is not None and last < want:
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == current:
                continue
            first = self._first_chained(path)
            if first is None:
                return []  # an empty new file: its first line is on its way
            seq, log_id = first
            if not self._open_at(path, 0):
                return []
            if self.cursor.log_id is not None and log_id != self.cursor.log_id:
                # A new log (the file was replaced and the chain started over): read
                # notes the change when it meets the first line.
                return []
            if seq > want:
                self._gap_reason = "file_deleted"
            return []
        return []

    # ------------------------------------------------------------------ reading

    def read(self, committed_seq: int, max_lines: int, max_bytes: int) -> Chunk:
        """The next committed lines (at most ``max_lines`` / about ``max_bytes``), and any
        gap found on the way. Does not move the cursor: :meth:`advance` does, once the
        collector accepted them."""
        chunk = Chunk()
        if self._fd is None:
            chunk.gaps.extend(self._find_next())
            if self._fd is None:
                chunk.at_end = self.cursor.seq >= committed_seq
                return chunk
        offset = self.cursor.offset
        expect = self.cursor.seq
        log_id = self.cursor.log_id
        taken = 0
        pos = offset
        while len(chunk.lines) < max_lines and taken < max_bytes:
            data = self._read_line_at(pos)
            if data is None:
                break  # no complete line yet
            line, pos_after = data
            found = _chain_fields(line)
            if found is None:
                pos = pos_after  # not an event (a repaired fragment): skipped with it
                continue
            seq, line_log = found
            if seq > committed_seq and (log_id is None or line_log == log_id):
                break  # written, not yet committed (or about to be rolled back)
            if log_id is not None and line_log != log_id:
                # A new chain (the file was replaced): whatever the old log held past
                # the cursor is gone (last = -1: how much is unknown).
                chunk.gaps.append(Gap(expect + 1, -1, "log_changed"))
                expect, log_id = seq - 1, line_log
                if seq > committed_seq:
                    break
            if seq <= expect:
                pos = pos_after  # sent before (a resend after a restart)
                continue
            if seq > expect + 1:
                chunk.gaps.append(Gap(expect + 1, seq - 1, self._gap_reason))
            self._gap_reason = "missing"
            chunk.lines.append((seq, line))
            taken += len(line) + 1
            expect, log_id, pos = seq, line_log, pos_after
        self._read_to = (pos, expect, log_id)
        if not chunk.lines and expect < committed_seq and self._read_line_at(pos) is None:
            # This file is done: the committed lines past it were written before
            # committed_seq was read, so they are in the next file (a torn fragment left
            # at this file's end by a crash is no line).
            previous = (self.cursor.dev, self.cursor.ino)
            self.cursor.offset, self.cursor.seq, self.cursor.log_id = pos, expect, log_id
            chunk.gaps.extend(self._find_next())
            if (self.cursor.dev, self.cursor.ino) != previous:
                more = self.read(committed_seq, max_lines, max_bytes)
                more.gaps[:0] = chunk.gaps
                return more
        chunk.at_end = not chunk.lines and expect >= committed_seq
        if not chunk.lines:
            # Nothing to send, but skipped lines (resent, not events) need no resend.
            self.cursor.offset, self.cursor.seq, self.cursor.log_id = pos, expect, log_id
        return chunk

    def advance(self) -> None:
        """The lines of the last :meth:`read` were accepted: move the cursor past them."""
        pos, seq, log_id = self._read_to
        self.cursor.offset, self.cursor.seq, self.cursor.log_id = pos, seq, log_id

    def _open_fd(self) -> int:
        if self._fd is None:
            raise OSError(errno.EBADF, "no audit file open")
        return self._fd

    def _size(self) -> int:
        return os.fstat(self._open_fd()).st_size

    def _read_line_at(self, pos: int) -> tuple[bytes, int] | None:
        """The complete line starting at ``pos`` and the offset after its newline."""
        fd = self._open_fd()
        buf = b""
        while True:
            piece = os.pread(fd, 64 * 1024, pos + len(buf))
            if not piece:
                return None
            cut = piece.find(b"\n")
            if cut >= 0:
                line = buf + piece[:cut]
                return line, pos + len(line) + 1
            buf += piece
            if len(buf) > 2 * MAX_EVENT_BYTES:
                # Not a line the daemon wrote: skip to its end, whenever that comes.
                end = self._find_newline(pos + len(buf))
                return (b"", end) if end is not None else None

    def _find_newline(self, pos: int) -> int | None:
        fd = self._open_fd()
        while True:
            piece = os.pread(fd, 64 * 1024, pos)
            if not piece:
                return None
            cut = piece.find(b"\n")
            if cut >= 0:
                return pos + cut + 1
            pos += len(piece)

    # ------------------------------------------------------------------ the bound

    def backlog(self) -> int:
        """Bytes from the cursor to the end of the current file."""
        if self._fd is None:
            return 0
        total = max(0, self._size() - self.cursor.offset)
        mine = (self.cursor.dev, self.cursor.ino)
        later = False
        for path in self._files():
            try:
                st = os.stat(path)
            except OSError:
                continue
            if later:
                total += st.st_size
            elif (st.st_dev, st.st_ino) == mine:
                later = True
        return total

    def skip_to(self, budget: int) -> bool:
        """Drop the oldest unsent bytes so that at most ``budget`` remain: the cursor moves
        to a line start (the next :meth:`read` reports the seqs passed over as a
        ``spool_full`` gap). Returns whether anything was skipped."""
        excess = self.backlog() - budget
        if excess <= 0 or self._fd is None:
            return False
        mine = (self.cursor.dev, self.cursor.ino)
        files = self._files()
        paths: list[Path] = []
        later = False
        for path in files:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if later:
                paths.append(path)
            elif (st.st_dev, st.st_ino) == mine:
                later = True
        remaining = self._size() - self.cursor.offset
        while excess >= remaining and paths:
            excess -= remaining
            path = paths.pop(0)
            if not self._open_at(path, 0):
                return False
            remaining = self._size()
        target = self._find_newline(self.cursor.offset + max(0, excess - 1))
        self.cursor.offset = target if target is not None else self._size()
        self._gap_reason = "spool_full"
        return True


def _last_chained(path: Path) -> tuple[int, str] | None:
    from .chain import recover_tail

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        found = recover_tail(fd, os.fstat(fd).st_size).state
    finally:
        os.close(fd)
    return (found.seq, found.log_id) if found is not None else None


# --------------------------------------------------------------------------- bodies


def _splunk_envelope(line: bytes, event: dict[str, Any]) -> bytes:
    when = event_time(event)
    head: dict[str, Any] = {"source": "sidekey", "sourcetype": "_json"}
    if when is not None:
        head["time"] = round(when.timestamp(), 3)
    if isinstance(event.get("host"), str):
        head["host"] = event["host"]
    # The line goes in as written (chain fields included): it is a JSON object already.
    return json.dumps(head, separators=(",", ":")).encode()[:-1] + b',"event":' + line + b"}"


def _otlp_attr(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}  # int64: a string in JSON
    return {"key": key, "value": {"stringValue": str(value)}}


def _otlp_body(lines: list[Line]) -> bytes:
    """An OTLP/HTTP JSON ``ExportLogsServiceRequest`` (opentelemetry-proto logs v1): one
    log record per line, its body the line as written (the chain can be checked
    downstream), the main fields as attributes."""
    records: list[dict[str, Any]] = []
    host = None
    for _, line in lines:
        event = event_of(line)
        host = host or event.get("host")
        number, text = _OTEL_SEVERITY.get(cef_severity(event), (9, "INFO"))
        record: dict[str, Any] = {"severityNumber": number, "severityText": text,
                                  "body": {"stringValue": line.decode("utf-8", "replace")}}
        when = event_time(event)
        if when is not None:
            record["timeUnixNano"] = str(int(when.timestamp() * 1_000_000) * 1000)
        attrs = [("event.name", event.get("event_type")), ("event.id", event.get("event_id")),
                 ("user.id", event.get("user_id")), ("sidekey.server", event.get("server")),
                 ("sidekey.tool", event.get("tool")), ("sidekey.seq", event.get("seq")),
                 ("sidekey.log_id", event.get("log_id")),
                 ("sidekey.schema_version", event.get("schema_version"))]
        record["attributes"] = [_otlp_attr(k, v) for k, v in attrs
                                if isinstance(v, str | int) and v != ""]
        trace = event.get("trace_id")
        if isinstance(trace, str) and tracecontext.is_trace_id(trace):
            # The MCP server's W3C trace (OTLP/JSON writes ids as hex, not base64): the
            # Collector and the tracing backend join the record to that trace.
            record["traceId"] = trace
        records.append(record)
    resource = [_otlp_attr("service.name", "sidekey"), _otlp_attr("service.version", __version__)]
    if isinstance(host, str):
        resource.append(_otlp_attr("host.name", host))
    request = {"resourceLogs": [{"resource": {"attributes": resource}, "scopeLogs": [
        {"scope": {"name": "sidekey.audit", "version": __version__}, "logRecords": records}]}]}
    return json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode()


def format_body(lines: list[Line], fmt: str) -> bytes:
    """The POST body for ``lines`` in ``fmt`` (see :data:`FORMATS` and the README)."""
    if fmt == "otlp_json":
        return _otlp_body(lines)
    if fmt == "ndjson":
        return b"".join(line + b"\n" for _, line in lines)
    if fmt == "json_array":
        return b"[" + b",".join(line for _, line in lines) + b"]"
    out = bytearray()
    for _, line in lines:
        event = event_of(line)
        if fmt == "splunk_hec":
            out += _splunk_envelope(line, event) + b"\n"
        else:  # elastic_bulk: ECS documents; the _id makes a resend a no-op (409)
            doc_id = f"{event.get('log_id')}-{event.get('seq')}"
            out += json.dumps({"create": {"_id": doc_id}}).encode() + b"\n"
            out += json.dumps(to_ecs(event, raw=line), separators=(",", ":"),
                              ensure_ascii=False).encode() + b"\n"
    return bytes(out)


def _bulk_outcome(answer: bytes, count: int) -> tuple[int, str | None]:
    """An Elastic ``_bulk`` answer to ``count`` create actions: ``(rejected, retry)``.
    ``retry`` names why the whole batch must be sent again (an item answered 429 or
    5xx, or the answer is not a bulk answer); 201 and 409 (already there: a resend)
    count as accepted, any other item status as rejected."""
    try:
        parsed = json.loads(answer)
        items = parsed["items"] if parsed.get("errors") else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return 0, "not an Elastic bulk answer"
    if items is None:
        return 0, None
    if not isinstance(items, list) or len(items) != count:
        return 0, "bulk answer item count differs"
    rejected = 0
    for item in items:
        result: Any = next(iter(item.values()), {}) if isinstance(item, dict) and item else {}
        status = result.get("status") if isinstance(result, dict) else None
        if not isinstance(status, int):
            return 0, "bulk answer item without status"
        if status == 429 or status >= 500:
            return 0, f"bulk item HTTP {status}"
        if status >= 300 and status != 409:
            rejected += 1
    return rejected, None


# --------------------------------------------------------------------------- the sink

SecretFetch = Callable[[], Awaitable[str]]


@dataclass(frozen=True)
class WebhookAuth:
    """The auth header: ``header: <prefix><secret>``; the secret from ``fetch`` (a
    backend's secret reference), ``label`` names it for health (never the value)."""

    header: str
    prefix: str
    fetch: SecretFetch
    label: str


class _Idle(Exception):
    pass


class WebhookSink(Forwarder):
    """POSTs committed audit lines to a collector (see the module docstring)."""

    kind = "webhook"

    def __init__(self, name: str, *, url: str, audit_path: Path, cursor_path: Path,
                 fmt: str = "ndjson",
                 headers: dict[str, str] | None = None, auth: WebhookAuth | None = None,
                 ca_file: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 batch_lines: int = DEFAULT_BATCH_LINES, batch_bytes: int = DEFAULT_BATCH_BYTES,
                 spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES, required: bool = False,
                 deliver_timeout_s: float = DEFAULT_DELIVER_TIMEOUT_S) -> None:
        super().__init__(name, required=required, deliver_timeout_s=deliver_timeout_s)
        if fmt not in FORMATS:
            raise ValueError(f"webhook format {fmt!r}")
        self.url = url
        self.fmt = fmt
        self.cursor_path = cursor_path
        self.headers = {"User-Agent": f"sidekey/{__version__}",
                        "Content-Type": _CONTENT_TYPES[fmt], **(headers or {})}
        self.auth = auth
        self.timeout_s = timeout_s
        self.batch_lines = batch_lines
        self.batch_max_lines = batch_lines
        self.batch_bytes = batch_bytes
        self.spool_max_bytes = spool_max_bytes
        # Verification always on: system CAs, or ca_file (a bad file stops the start).
        self._ssl = ssl.create_default_context(cafile=ca_file)
        self._client: httpx.AsyncClient | None = None
        self._secret: str | None = None
        self._primary: Any = None
        self._tail = FileTail(audit_path)
        self._pending: tuple[list[Line], bytes] | None = None
        self._wake = trio.Event()
        self._stopped = trio.Event()
        self._start_gaps: list[Gap] = []
        self._run_scope: trio.CancelScope | None = None
        self._started = False
        self._cursor_saved_at = 0.0
        self._cursor_dirty = False
        self._retry_after: float | None = None
        self._rejecting = False
        self.rejected = 0
        self.last_status: int | None = None
        self.backlog_bytes = 0
        self._backlog_at = 0.0
        self.skips = 0

    # ------------------------------------------------------------------ wiring

    def attach(self, primary: Any) -> None:
        """The file sink whose committed lines this sink sends (its path and
        ``committed_seq``)."""
        self._primary = primary

    def offer(self, lines: list[Line]) -> None:
        # The lines are in the file (the spool): only wake the sender.
        self._wake.set()

    def _committed(self) -> int:
        return int(self._primary.committed_seq) if self._primary is not None else 0

    def describe(self) -> dict[str, Any]:
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        where = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return {"url": where + parts.path, "format": self.fmt,
                "cursor_seq": self._tail.cursor.seq,
                "backlog_bytes": self.backlog_bytes, "spool_max_bytes": self.spool_max_bytes,
                "skips": self.skips, "rejected": self.rejected, "last_status": self.last_status,
                "auth": self.auth.label if self.auth is not None else None}

    def health(self) -> dict[str, Any]:
        out = super().health()
        out["queued"] = max(0, self._committed() - self._tail.cursor.seq)
        out["queued_bytes"] = self.backlog_bytes
        out.pop("queue_max", None)
        out.pop("queue_max_bytes", None)
        return out

    # ------------------------------------------------------------------ cursor

    def _load_cursor(self) -> Cursor | None:
        """The saved cursor; None when there is none (a new sink). An unreadable one is
        logged and read as 'from the oldest file' (resend rather than lose)."""
        try:
            data = self.cursor_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("audit sink %s: cannot read its cursor %s (%s): sending again from the "
                      "oldest audit file", self.name, self.cursor_path, exc.strerror)
            return Cursor()
        try:
            return Cursor.from_json(data)
        except (ValueError, TypeError):
            log.error("audit sink %s: cursor %s is malformed: sending again from the oldest "
                      "audit file", self.name, self.cursor_path)
            return Cursor()

    def _save_cursor(self) -> None:
        """Write the cursor (0600, atomically: a temp file renamed over it)."""
        data = self._tail.cursor.to_json()
        parent = self.cursor_path.parent
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{self.cursor_path.name}.")
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.cursor_path)

    async def _maybe_save_cursor(self, *, force: bool = False) -> None:
        if not self._cursor_dirty:
            return
        now = time.monotonic()
        if not force and now - self._cursor_saved_at < CURSOR_SAVE_EVERY_S:
            return
        self._cursor_saved_at = now
        self._cursor_dirty = False
        try:
            await trio.to_thread.run_sync(self._save_cursor)
        except OSError as exc:
            self._cursor_dirty = True
            log.error("audit sink %s: cannot save its cursor (a restart resends more): %s",
                      self.name, exc.strerror)

    def _start_sync(self) -> None:
        cursor = self._load_cursor()
        gaps = self._tail.start(cursor, self._committed())
        if cursor is None:
            self._save_cursor()  # a crash before the first batch must not lose it
        self._start_gaps = gaps

    # ------------------------------------------------------------------ sending

    def _load(self, committed: int) -> tuple[Chunk, bytes]:
        """Worker thread: the next batch and its body, and the backlog."""
        before = dataclasses.astuple(self._tail.cursor)
        chunk = self._tail.read(committed, self.batch_lines, self.batch_bytes)
        if dataclasses.astuple(self._tail.cursor) != before:
            self._cursor_dirty = True  # moved past lines it need not send
        now = time.monotonic()
        if now >= self._backlog_at:  # a listing and a stat per file: not per batch
            self._backlog_at = now + BACKLOG_EVERY_S
            self.backlog_bytes = self._tail.backlog()
        body = format_body(chunk.lines, self.fmt) if chunk.lines else b""
        return chunk, body

    def _enforce_bound(self) -> bool:
        """Worker thread: skip ahead if the backlog is over ``spool_max_bytes``."""
        skipped = self._tail.skip_to(self.spool_max_bytes)
        self.backlog_bytes = self._tail.backlog()
        return skipped

    def _note_gaps(self, gaps: list[Gap]) -> None:
        for gap in gaps:
            lost = gap.last - gap.first + 1 if gap.last >= gap.first else 0
            self.dropped += lost
            log.error("audit sink %s: events %s..%s will not be sent (%s)", self.name,
                      gap.first, gap.last if gap.last >= 0 else "?", gap.reason)
            # One alert per gap (not per episode, unlike a queue's overflow): each names
            # the exact seqs the collector will never get, for an auditor to reconcile
            # the SIEM with the file. Gaps come at most once per retry of a failed batch.
            if not self._overflowing:
                self._overflowing = True
                self.overflows += 1
            if self.alert is not None:
                self.alert(OVERFLOW_TYPE, {"sink_overflow": {
                    "sink": self.name, "type": self.kind, "reason": gap.reason,
                    "lost_from_seq": gap.first, "lost_to_seq": gap.last if gap.last >= 0 else None,
                    "spool_max_bytes": self.spool_max_bytes, "dropped_total": self.dropped,
                    "last_error": self.last_error}})
        if gaps:
            self._progress.set()  # a required waiter fails at once
            self._progress = trio.Event()

    async def _secret_value(self, auth: WebhookAuth) -> str:
        if self._secret is None:
            try:
                value = await auth.fetch()
            except Exception as exc:  # a backend error: its code, never the value
                code = getattr(exc, "code", type(exc).__name__)
                raise SendError(errno.EACCES, f"auth secret {auth.label}: {code}") from None
            if any(c in value for c in "\r\n\0") or not value:
                raise SendError(errno.EINVAL, f"auth secret {auth.label}: not usable "
                                "in a header (empty, or a line break)")
            self._secret = value
        return self._secret

    async def _post(self, lines: list[Line], body: bytes) -> int:
        """POST one batch. Returns how many of its lines the collector refused for good
        (counted, skipped). Raises :class:`SendError` when it must be sent again."""
        headers = dict(self.headers)
        if self.auth is not None:
            headers[self.auth.header] = self.auth.prefix + await self._secret_value(self.auth)
        if self._client is None:
            self._client = httpx.AsyncClient(
                verify=self._ssl, trust_env=False, follow_redirects=False,
                timeout=self.timeout_s,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        cap = MAX_ANSWER_BYTES if self.fmt == "elastic_bulk" else 64 * 1024
        answer = bytearray()
        try:
            with trio.fail_after(self.timeout_s):
                async with self._client.stream("POST", self.url, content=body,
                                               headers=headers) as resp:
                    status = resp.status_code
                    retry_after = resp.headers.get("retry-after")
                    async for piece in resp.aiter_raw():
                        answer += piece
                        if len(answer) > cap:
                            break
        except trio.TooSlowError:
            raise SendError(errno.ETIMEDOUT, f"no answer within {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise SendError(errno.ECONNREFUSED, _http_error(exc)) from None
        self.last_status = status
        self._retry_after = _retry_after(retry_after)
        if 200 <= status < 300:
            if self.fmt == "otlp_json":
                return _otlp_rejected(bytes(answer[:cap]), len(lines))
            if self.fmt != "elastic_bulk":
                return 0
            if len(answer) > cap:
                raise SendError(errno.EMSGSIZE, "bulk answer too large")
            rejected, retry = _bulk_outcome(bytes(answer), len(lines))
            if retry is not None:
                raise SendError(errno.EAGAIN, retry)
            return rejected
        if status in (401, 403):
            self._secret = None  # rotated? fetched again before the next try
        elif status in (400, 413, 422) and len(lines) > 1:
            # Too big, or one bad event in it: halve until the batch passes or the bad
            # line is alone (then refused for good, below).
            self.batch_lines = max(1, len(lines) // 2)
            self._pending = None  # read again, in smaller batches
            self._retry_after = 0.0
            raise SendError(errno.EMSGSIZE, f"HTTP {status} for {len(lines)} lines: halving")
        elif status in (400, 413, 422):
            return 1
        raise SendError(errno.EIO, f"HTTP {status}")

    async def _step(self) -> bool:
        """Send one batch if there is one. Returns whether one was accepted; raises
        :class:`_Idle` when everything committed was sent, :class:`SendError` when the
        batch must be sent again."""
        if self._pending is None:
            committed = self._committed()
            chunk, body = await trio.to_thread.run_sync(self._load, committed)
            self._note_gaps(chunk.gaps)
            if not chunk.lines:
                if chunk.at_end:
                    self._caught_up(self._tail.cursor.seq)
                await self._maybe_save_cursor()
                raise _Idle
            self._pending = (chunk.lines, body)
        lines, body = self._pending
        rejected = await self._post(lines, body)
        self._tail.advance()
        self._pending = None
        if rejected:
            self._reject(lines, rejected)
        else:
            self._rejecting = False
        # After a 413 the batch grows back slowly (a collector's size limit stays put).
        self.batch_lines = min(self.batch_max_lines, self.batch_lines + max(1, self.batch_lines // 8))
        self.delivered += len(lines) - rejected
        self.delivered_seq = max(self.delivered_seq, lines[-1][0])
        self._progress.set()
        self._progress = trio.Event()
        if not self._ok:
            log.warning("audit sink %s: delivering again", self.name)
        self._ok = True
        self.last_error = None
        self._cursor_dirty = True
        await self._maybe_save_cursor()
        return True

    def _reject(self, lines: list[Line], rejected: int) -> None:
        self.rejected += rejected
        log.error("audit sink %s: the collector refused %d event(s) for good (HTTP %s) "
                  "up to seq %d", self.name, rejected, self.last_status, lines[-1][0])
        if not self._rejecting:
            self._rejecting = True  # one alert per episode: an alert refused in turn waits
            if self.alert is not None:
                self.alert(REJECTED_TYPE, {"sink_rejected": {
                    "sink": self.name, "type": self.kind, "status": self.last_status,
                    "seq": lines[-1][0] if len(lines) == 1 else None,
                    "count": rejected, "rejected_total": self.rejected}})

    def _caught_up(self, seq: int) -> None:
        self.delivered_seq = max(self.delivered_seq, seq)
        self._progress.set()
        self._progress = trio.Event()
        if self._overflowing:
            self._overflowing = False
            log.warning("audit sink %s: caught up; %d events lost in all", self.name, self.dropped)

    async def _failed(self, exc: OSError) -> float:
        """Account for a failed batch; returns how long to wait before the next try.
        Enforces the spool bound (skips ahead while the backlog is over it)."""
        self.failures += 1
        self._ok = False
        self.last_error = str(exc.args[1]) if len(exc.args) > 1 else type(exc).__name__
        log.error("audit sink %s: send failed (%d bytes behind): %s", self.name,
                  self.backlog_bytes, self.last_error)
        await self._disconnect_client()
        skipped = await trio.to_thread.run_sync(self._enforce_bound)
        if skipped:
            self.skips += 1
            self._pending = None  # its lines may be among those skipped: read again
        wait = self._retry_after
        self._retry_after = None
        return wait if wait is not None else -1.0

    async def _disconnect_client(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def disconnect(self) -> None:
        await self._disconnect_client()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._running = True
        try:
            with trio.CancelScope() as self._run_scope:
                if not self._started:
                    await trio.to_thread.run_sync(self._start_sync)
                    self._started = True
                    self._note_gaps(self._start_gaps)
                task_status.started()
                backoff = BACKOFF_FIRST_S
                while True:
                    try:
                        # Shielded: a stop lets the batch in flight finish (within
                        # timeout_s) rather than cut it after the collector took it,
                        # which would send it twice.
                        with trio.CancelScope(shield=True):
                            await self._step()
                        backoff = BACKOFF_FIRST_S
                        continue
                    except _Idle:
                        self._wake = trio.Event()
                        with trio.move_on_after(IDLE_POLL_S):
                            await self._wake.wait()
                        continue
                    except OSError as exc:
                        hint = await self._failed(exc)
                    wait = backoff if hint < 0 else min(max(hint, 0.0), BACKOFF_MAX_S)
                    await trio.sleep(wait)
                    if hint < 0:
                        backoff = min(BACKOFF_MAX_S, backoff * 2)
        finally:
            self._running = False
            self._stopped.set()

    async def aclose(self) -> None:
        """Send what is committed (at most DRAIN_ON_CLOSE_S), save the cursor, close. What
        is not sent stays in the file: the next start sends it."""
        self._closed = True
        if self._running and self._run_scope is not None:
            # Its batch in flight is shielded (at most timeout_s): wait for it, so two
            # batches never read the file or move the cursor at once.
            self._run_scope.cancel()
            with trio.move_on_after(self.timeout_s + DRAIN_ON_CLOSE_S):
                await self._stopped.wait()
        if self._running:
            log.error("audit sink %s: its sender did not stop; unsent lines go at the next "
                      "start", self.name)
        elif self._started:
            with trio.move_on_after(DRAIN_ON_CLOSE_S):
                try:
                    while await self._step():
                        pass
                except (_Idle, OSError):
                    pass
            self._cursor_dirty = True
            try:
                self._save_cursor()
            except OSError as exc:
                log.error("audit sink %s: cannot save its cursor at close: %s", self.name,
                          exc.strerror)
            behind = self._committed() - self._tail.cursor.seq
            if behind > 0:
                log.warning("audit sink %s: %d events not sent at shutdown (sent at the next "
                            "start)", self.name, behind)
            self._tail.close()
        self._progress.set()
        await self._disconnect_client()


def _otlp_rejected(answer: bytes, count: int) -> int:
    """Log records an OTLP ``ExportLogsServiceResponse`` says it refused
    (``partialSuccess.rejectedLogRecords``; an empty or other answer: none)."""
    try:
        rejected = json.loads(answer)["partialSuccess"]["rejectedLogRecords"]
        return max(0, min(count, int(rejected)))
    except (ValueError, KeyError, TypeError):
        return 0


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds only; a date is ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 <= seconds < 86400 else None


def _http_error(exc: httpx.HTTPError) -> str:
    """A failure's kind and cause, without URL query strings or bodies."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {cause.reason or type(cause).__name__}"
    if isinstance(cause, OSError) and cause.strerror:
        return f"{type(exc).__name__}: {cause.strerror}"
    return type(exc).__name__


__all__ = ["FORMATS", "REJECTED_TYPE", "Cursor", "FileTail", "WebhookAuth", "WebhookSink",
           "format_body"]
