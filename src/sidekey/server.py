"""The Unix-socket listener: HTTP/1.1 parsed by llhttp (httptools), connection limits,
graceful stop.

The server knows nothing about tokens or policy. It attests each connection's peer
once at accept, parses requests within the configured caps (header size, body size,
header/body read time, connection count), hands complete requests to an
:class:`Application`, and writes its response. Protocol violations are answered here
(400/408/413/431/501/503), with ``connection: close``, and reported to the application so
it can audit them; nothing after a malformed request on a connection is read as a request.
Pipelined requests are answered in order; a response head is written from precomputed
bytes (our own values only).

Connection slots are counted per peer uid (SO_PEERCRED, read at accept before any
/proc work). Which cap applies is the application's call (:meth:`Application.connection_class`:
"service" for a uid that may be attested above anonymous, else "anonymous"), asked with
the uid at accept and again with the attested identity; the numbers are ``listen.*``.
A connection that sends nothing is closed after ``first_request_timeout_s``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import resource
import socket
import stat
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

import httptools
import trio

from . import protocol
from .config import ListenConfig
from .encoding import random_hex
from .hardening import open_socket_dir
from .peer import PeerHandle, PeerIdentity, PidNotVisible, attest, attest_uid_only
from .protocol import SidekeyError

log = logging.getLogger(__name__)

LINGER_S = 2.0  # after an error response, drain the client's input this long at most
LINGER_MAX_BYTES = 32 * 1024 * 1024
RECEIVE_CHUNK = 64 * 1024
# Pipelined requests parsed ahead of the one being answered, at most (plus one slice's).
MAX_PARSED_AHEAD = 32
FEED_SLICE = 4096
SERVER_HEADER = b"sidekey"
OVERLOAD_REPLY_TIMEOUT_S = 1.0
MAX_REFUSING = 64  # beyond this many 503 replies in flight, excess connections are just closed
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# File descriptors one connection holds: the socket, the peer's pidfd, its /proc/<pid>
# directory and that directory's status file (kept open for the re-checks, peer.py).
FDS_PER_CONNECTION = 4
FD_RESERVE = 256  # state store, audit, backends, refusals in progress


def _peer_uid(stream: trio.SocketStream) -> int:
    """The connecting process's uid (SO_PEERCRED), -1 if the kernel does not say."""
    try:
        raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return -1
    uid: int = _UCRED.unpack(raw)[1]
    return uid


def _reserve_fds(max_connections: int) -> None:
    """Raise the soft RLIMIT_NOFILE so that max_connections connections fit (systemd's
    default soft limit, 1024, is less than 512 connections x 4 fds): a full table must
    refuse with 503, not fail accept() or attestation with EMFILE."""
    needed = max_connections * FDS_PER_CONNECTION + MAX_REFUSING + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        if soft < needed:
            log.warning("RLIMIT_NOFILE is %d; %d connections need about %d file descriptors",
                        soft, max_connections, needed)


def _too_many(message: str) -> SidekeyError:
    return protocol.Unavailable(message, code="too_many_connections")


def _decrement(counts: dict[int, int], key: int) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)  # the tables hold only uids with open connections


class ServerError(Exception):
    """The listener cannot start (socket in use, bad path, permissions)."""


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    peer: PeerHandle
    request_id: str
    conn: ConnectionState
    # (server, tool) the request is about, once a handler knows it: metrics labels
    # (sidekey.metrics bounds them to the configured names).
    call: tuple[str, str] | None = None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class ConnectionState:
    """Per-connection facts computed once (the peer does not change on a connection)."""

    peer: PeerHandle
    cache: dict[str, Any] = field(default_factory=dict)


class Application(Protocol):
    async def handle(self, request: Request) -> Response: ...

    async def rejected(
        self, peer: PeerHandle | None, error: SidekeyError, request_id: str, *, uid: int | None = None
    ) -> None: ...

    def connection_class(self, uid: int, identity: PeerIdentity | None) -> str:
        """``"service"`` or ``"anonymous"``: which per-uid connection cap applies. Called
        at accept with the uid only (must not under-estimate: a uid that *might* be
        attested above anonymous is "service"), then with the attested identity."""
        ...


def new_request_id() -> str:
    return f"req_{random_hex(10)}"


def error_response(exc: SidekeyError, request_id: str) -> Response:
    headers: list[tuple[bytes, bytes]] = []
    retry = exc.details.get("retry_after_s")
    if exc.status in (429, 503) and isinstance(retry, int | float) and math.isfinite(retry):
        # Whole seconds, rounded up, at least 1 (RFC 9110 delay-seconds).
        headers.append((b"retry-after", str(max(1, math.ceil(retry))).encode()))
    return Response(status=exc.status, body=protocol.error_body(exc, request_id), headers=headers)


# --------------------------------------------------------------------------- socket setup


def bind_unix_socket(path: Path, mode: int) -> socket.socket:
    """Bind and listen on ``path`` with file mode ``mode``.

    Refuses to start when the socket's directory (or one above it) is open to other
    users (:func:`sidekey.hardening.open_socket_dir`, ``socket_dir_unsafe``), when a
    live daemon answers on the path, or when something that is not a socket is there;
    removes a stale socket file left by a crashed daemon. The socket is bound inside
    the directory fd that was checked (``/proc/self/fd/<fd>/<name>``), so a directory
    swapped in by a symlink after the check cannot receive it.
    """
    if len(os.fsencode(path)) > 107:
        raise ServerError(f"{path}: socket path longer than 107 bytes")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as exc:
        raise ServerError(f"{path.parent}: cannot create socket directory: {exc.strerror}") from exc
    try:
        dfd = open_socket_dir(path.parent)
    except OSError as exc:
        raise ServerError(f"{path.parent}: cannot open socket directory: {exc.strerror}") from exc
    try:
        return _bind_in_dir(path, dfd, mode)
    finally:
        os.close(dfd)


def _bind_in_dir(path: Path, dfd: int, mode: int) -> socket.socket:
    name = path.name
    # The checked directory through its fd; without /proc, its path (then only the
    # lstat after bind vouches for the result).
    where = f"/proc/self/fd/{dfd}" if os.path.isdir(f"/proc/self/fd/{dfd}") else str(path.parent)
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ServerError(f"{path}: exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(f"{where}/{name}")
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ServerError(f"{path}: cannot probe existing socket: {exc.strerror}") from exc
            log.warning("removing stale socket %s", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dfd)
        else:
            raise ServerError(f"{path}: another sidekey daemon is listening on this socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # umask covers the window between bind() and chmod(): the socket is never looser
    # than the configured mode.
    old_umask = os.umask(0o777 & ~mode)
    try:
        # bind() never follows a symlink in the last component (an existing name is
        # EADDRINUSE); the directory is the one checked, reached through its fd.
        sock.bind(f"{where}/{name}")
    except OSError as exc:
        sock.close()
        raise ServerError(f"{path}: cannot bind: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise ServerError(f"{path}: the bound socket was replaced; refusing to use it")
        os.chmod(name, mode, dir_fd=dfd)
    except BaseException:
        sock.close()
        raise
    sock.listen(1024)
    return sock


# --------------------------------------------------------------------------- server


class _Close(Exception):
    """End this connection (after an error response was sent, or peer went away)."""


# The request parser is llhttp (httptools), in its strict default: no lenient flag is
# ever set, so bare LF or CR line endings, obs-fold, a header line without a colon, NUL
# or other control bytes in a header, Content-Length together with Transfer-Encoding,
# a repeated Content-Length, a repeated Transfer-Encoding, a sign or hex digits in a
# length and an overflowing chunk size are all refused. The caps (head and body size,
# wire bytes of a chunked body) and the few rules llhttp leaves to the server (HTTP
# version, Host, "chunked" as the only transfer coding, no protocol upgrade with a
# body) are checked in _Wire's callbacks below.

# Response heads are written here: the status lines and every constant header are
# bytes computed once (only our own fixed values go into a head; a header the
# application adds is checked against CR/LF/NUL injection before it is written).
_STATUS_LINES = {int(s): b"HTTP/1.1 %d %s\r\n" % (s, s.phrase.encode("ascii")) for s in HTTPStatus}
_JSON_HEAD = b"content-type: application/json\r\ncontent-length: "
_AFTER_RID = b"\r\nserver: " + SERVER_HEADER + b"\r\ncache-control: no-store\r\n"
_CLOSE = b"connection: close\r\n"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# A chunked body may carry this many wire bytes (chunk sizes, extensions, trailers)
# per byte of the body cap: 1-byte chunks ("1\r\nX\r\n") need 6.
_CHUNKED_OVERHEAD = 8


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; the refusal is _Wire.refusal."""


def _bad_http() -> SidekeyError:
    return protocol.BadRequest("malformed HTTP request", code="bad_http")


def _head_too_large() -> SidekeyError:
    return protocol.HeadersTooLarge("request head too large", code="headers_too_large")


def _body_too_large(cap: int) -> SidekeyError:
    return protocol.TooLarge(f"body larger than {cap} bytes")


def _parser_refusal(exc: httptools.HttpParserError) -> SidekeyError:
    """The answer to input llhttp refused: 501 for a transfer coding it does not
    implement (an unknown coding, or Transfer-Encoding repeated), as h11 hinted; 400
    for everything else (Transfer-Encoding with Content-Length included: smuggling)."""
    reason = str(exc)
    if "Transfer-Encoding" in reason and "Content-Length" not in reason:
        return protocol.Unsupported("malformed HTTP request", code="bad_http")
    return _bad_http()


@dataclass(slots=True)
class _Message:
    """One complete request as parsed (the body is whole, within its cap)."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class _Wire:
    """One connection's input: llhttp's callbacks build complete requests in ``ready``
    (pipelined requests in order); the first violation becomes ``refusal``, answered
    after the requests before it, and nothing after it is parsed.

    What one connection can make the daemon hold is bounded: input is read one receive
    (RECEIVE_CHUNK) at a time, and parsed in slices until MAX_PARSED_AHEAD requests
    wait (see :meth:`feed`); a head is at most max_header_bytes (its target and header
    lines counted exactly, its wire bytes with one FEED_SLICE of slack), a body at most
    max_body_bytes (its wire bytes at most _CHUNKED_OVERHEAD times that), empty lines
    between requests at most max_header_bytes.
    """

    __slots__ = (
        "body",
        "body_size",
        "body_wire",
        "completed",
        "eof",
        "fd",
        "gap",
        "head_size",
        "head_wire",
        "in_head",
        "in_message",
        "max_body",
        "max_body_wire",
        "max_head",
        "msg_headers",
        "msg_keep_alive",
        "msg_method",
        "parser",
        "pending",
        "raw_headers",
        "ready",
        "refusal",
        "upgraded",
        "url",
    )

    def __init__(self, max_head: int, max_body: int, fd: int) -> None:
        self.fd = fd
        self.max_head = max_head
        self.max_body = max_body
        self.max_body_wire = _CHUNKED_OVERHEAD * max_body + RECEIVE_CHUNK
        self.ready: deque[_Message] = deque()
        self.refusal: SidekeyError | None = None
        self.eof = False
        self.upgraded = False
        self.pending = b""  # received, not parsed yet (see feed)
        self.in_message = False  # a request has begun and is not complete
        self.in_head = False  # ... and its head is not complete
        self.head_size = 0
        self.head_wire = 0
        self.gap = 0  # bytes of empty lines since the last request
        self.completed = 0  # requests parsed on this connection
        self.url: list[bytes] = []
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.body_size = 0
        self.body_wire = 0
        self.msg_method = ""
        self.msg_headers: dict[str, str] = {}
        self.msg_keep_alive = False
        self.parser = httptools.HttpRequestParser(self)

    def feed(self, data: bytes) -> None:
        """Parse one receive's bytes (never called after a refusal or an upgrade).

        A pipelining client may send many requests in one receive; parsed requests
        cost far more memory than their bytes, so a receive bigger than FEED_SLICE is
        parsed a slice at a time, and parsing stops once MAX_PARSED_AHEAD requests wait
        for their answers: the rest stays as bytes in ``pending`` (at most one
        receive) until the queue drains (:meth:`resume`)."""
        if len(data) <= FEED_SLICE:
            self._feed(data)
            return
        view = memoryview(data)
        for pos in range(0, len(data), FEED_SLICE):
            if len(self.ready) >= MAX_PARSED_AHEAD:
                self.pending = bytes(view[pos:])
                return
            self._feed(view[pos:pos + FEED_SLICE])
            if self.refusal is not None or self.upgraded:
                return

    def resume(self) -> None:
        """Parse what :meth:`feed` left in ``pending``."""
        data, self.pending = self.pending, b""
        self.feed(data)

    def _feed(self, data: bytes | memoryview) -> None:
        """Parse at most FEED_SLICE bytes, then count them against the wire caps."""
        completed = self.completed
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT, or Connection: upgrade with Upgrade: the request (bodiless, see
            # on_headers_complete) is answered, then the connection closes; the bytes
            # after it are never parsed.
            self.upgraded = True
            return
        except httptools.HttpParserError as exc:
            if self.refusal is None:
                self.refusal = _parser_refusal(exc)
            return
        if not self.in_message:
            if self.completed == completed:
                # Nothing but empty lines between requests (llhttp skips them, RFC 9112
                # 2.2): as many as a head may hold, then the client is refused.
                self.gap += len(data)
                if self.gap > self.max_head:
                    self.refusal = _bad_http()
        elif self.in_head:
            # Wire bytes of a head, whitespace and a line still arriving in pieces (held
            # by the parser until it ends) included; the slice the request began in
            # counts whole, hence one slice of slack. The target and header lines are
            # also counted exactly (_count_head).
            self.head_wire += len(data)
            if self.head_wire > self.max_head + FEED_SLICE:
                self.refusal = _head_too_large()
        else:
            # Chunk sizes, extensions and trailers are not body bytes but are wire
            # bytes: capped too (with the head's last slice, an over-estimate).
            self.body_wire += len(data)
            if self.body_wire > self.max_body_wire:
                self.refusal = _body_too_large(self.max_body)

    def _refuse(self, err: SidekeyError) -> None:
        self.refusal = err
        raise _Refused

    def _count_head(self, n: int) -> None:
        self.head_size += n
        if self.head_size > self.max_head:
            self._refuse(_head_too_large())

    # llhttp callbacks (httptools calls them during feed_data)

    def on_message_begin(self) -> None:
        self.in_message = True
        self.in_head = True
        self.head_size = self.head_wire = self.gap = self.body_size = self.body_wire = 0
        self.url = []
        self.raw_headers = []
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url.append(url)  # in fragments when it arrives in pieces
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a trailer after a chunked body: discarded, counted in body_wire
        self.raw_headers.append((name, value))
        self._count_head(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._refuse(_bad_http())  # HTTP/0.9 (no version), 2.0: not HTTP/1.x
        headers: dict[str, str] = {}
        hosts = 0
        for name, value in self.raw_headers:
            key = name.decode("latin-1").lower()
            if key == "host":
                hosts += 1
            # llhttp drops leading whitespace of a value, not trailing (h11 dropped both).
            headers[key] = value.decode("latin-1").rstrip(" \t")
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            self._refuse(_bad_http())  # RFC 9112 3.2: exactly one Host in HTTP/1.1
        te = headers.get("transfer-encoding")
        if te is not None and te.lower() != "chunked":
            # llhttp accepts codings before a final "chunked" ("gzip, chunked"); none is
            # implemented here.
            self._refuse(protocol.Unsupported("malformed HTTP request", code="bad_http"))
        clen = headers.get("content-length")  # digits only: llhttp checked it
        if clen is not None and int(clen) > self.max_body:
            self._refuse(_body_too_large(self.max_body))
        upgrade = parser.should_upgrade()
        if upgrade and (te is not None or (clen is not None and int(clen) > 0)):
            # httptools has llhttp skip the body of an upgrade request: refused rather
            # than answered without its body.
            self._refuse(_bad_http())
        self.url = [b"".join(self.url)]
        self.raw_headers = []
        self.msg_headers = headers
        self.msg_keep_alive = version == "1.1" and not upgrade and parser.should_keep_alive()
        self.msg_method = parser.get_method().decode("ascii")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.max_body:
            self._refuse(_body_too_large(self.max_body))
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        self.completed += 1
        body = self.body
        self.ready.append(_Message(
            method=self.msg_method,
            target=self.url[0].decode("latin-1"),
            headers=self.msg_headers,
            body=body[0] if len(body) == 1 else b"".join(body),
            keep_alive=self.msg_keep_alive,
        ))


class HttpServer:
    """Serves one :class:`Application` on a listening Unix socket."""

    def __init__(self, app: Application, limits: ListenConfig) -> None:
        self.app = app
        self.limits = limits
        self.active_connections = 0
        # Connection slots by peer uid (SO_PEERCRED at accept), and those counted as
        # anonymous (per uid and in all): see ListenConfig.max_connections_per_*.
        self.uid_connections: dict[int, int] = {}
        self.anonymous_uid_connections: dict[int, int] = {}
        self.anonymous_connections = 0
        self._refusing = 0  # 503 replies to connections over the cap, in progress
        self.in_flight = 0
        self._stop = trio.Event()
        self._draining = False
        self._idle_scopes: set[trio.CancelScope] = set()

    def stop(self) -> None:
        """Stop accepting; in-flight requests finish within ``shutdown_grace_s``."""
        self._stop.set()

    async def serve(
        self,
        sock: socket.socket,
        *,
        on_closed: Callable[[], Awaitable[None]] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``sock`` until :meth:`stop`, then drain and return."""
        _reserve_fds(self.limits.max_connections)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptor:
                acceptor.start_soon(self._accept_loop, listener, connections)
                task_status.started()
                await self._stop.wait()
                acceptor.cancel_scope.cancel()
            await listener.aclose()
            if on_closed is not None:
                await on_closed()
            self._draining = True
            for scope in list(self._idle_scopes):
                scope.cancel()
            connections.cancel_scope.deadline = trio.current_time() + self.limits.shutdown_grace_s
        log.info("listener stopped; %d connections were open", self.active_connections)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS: back off instead of spinning.
                log.error("accept failed: %s", exc.strerror)
                await trio.sleep(0.1)
                continue
            uid = _peer_uid(stream)
            refusal, anonymous = self._admit(uid)
            if refusal is not None:
                if self._refusing >= MAX_REFUSING:
                    # A flood: not even a 503 for these, but each refusal is still
                    # reported (the app bounds its audit volume per uid).
                    nursery.start_soon(self._report_refusal, None, uid, refusal, new_request_id())
                    await stream.aclose()
                else:
                    nursery.start_soon(self._refuse_overloaded, stream, uid, refusal)
                continue
            nursery.start_soon(self._connection, stream, uid, anonymous)

    # Connection slots. At accept only the uid is known (one getsockopt, no /proc reads):
    # the app says whether that uid could be attested above anonymous at all. A uid that
    # could (e.g. a selector matches by unit or group, unknown until attestation) is
    # counted as service and re-classified right after attestation.

    def _admit(self, uid: int) -> tuple[SidekeyError | None, bool]:
        """Take a slot for a new connection of ``uid``, or say why not.
        Returns (refusal, counted as anonymous)."""
        if self.active_connections >= self.limits.max_connections:
            return _too_many("too many connections"), False
        anonymous = self.app.connection_class(uid, None) == "anonymous"
        refusal = self._over_cap(uid, anonymous=anonymous)
        if refusal is None:
            self.active_connections += 1
            self.uid_connections[uid] = self.uid_connections.get(uid, 0) + 1
            if anonymous:
                self._add_anonymous(uid)
        return refusal, anonymous

    def _over_cap(self, uid: int, *, anonymous: bool) -> SidekeyError | None:
        limits = self.limits
        if not anonymous:
            if self.uid_connections.get(uid, 0) >= limits.max_connections_per_service_uid:
                return _too_many(f"too many connections from uid {uid}")
            return None
        if self.anonymous_uid_connections.get(uid, 0) >= limits.max_connections_per_anonymous_uid:
            return _too_many(f"too many connections from uid {uid} (not attested as a service)")
        if self.anonymous_connections >= limits.max_anonymous_connections:
            return _too_many("too many connections from processes not attested as a service")
        return None

    def _add_anonymous(self, uid: int) -> None:
        self.anonymous_connections += 1
        self.anonymous_uid_connections[uid] = self.anonymous_uid_connections.get(uid, 0) + 1

    def _release(self, uid: int, *, anonymous: bool) -> None:
        self.active_connections -= 1
        _decrement(self.uid_connections, uid)
        if anonymous:
            self.anonymous_connections -= 1
            _decrement(self.anonymous_uid_connections, uid)

    async def _report_refusal(
        self, peer: PeerHandle | None, uid: int, err: SidekeyError, rid: str
    ) -> None:
        with contextlib.suppress(Exception):
            await self.app.rejected(peer, err, rid, uid=uid)

    async def _refuse_overloaded(self, stream: trio.SocketStream, uid: int, err: SidekeyError) -> None:
        self._refusing += 1
        try:
            rid = new_request_id()
            await self._report_refusal(None, uid, err, rid)
            await self._send_overloaded(stream, err, rid)
        finally:
            self._refusing -= 1

    async def _send_overloaded(self, stream: trio.SocketStream, err: SidekeyError, rid: str) -> None:
        body = protocol.error_body(err, rid)
        head = (
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        with trio.move_on_after(OVERLOAD_REPLY_TIMEOUT_S):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(head + body)
                await self._linger(stream)  # so the client reads the 503, not a reset
        await stream.aclose()

    async def _connection(self, stream: trio.SocketStream, uid: int, anonymous: bool) -> None:
        peer: PeerHandle | None = None
        try:
            try:
                try:
                    peer = attest(stream.socket)  # type: ignore[arg-type]
                except PidNotVisible:
                    # Another PID namespace (a pod without shareProcessNamespace): not
                    # refused here, where the only answer is a closed socket, but given
                    # a uid/gid-only identity that the application grants nothing above
                    # anonymous unless attestation.pid_namespace says uid_only; its
                    # requests are answered with a peer_unattested that says why.
                    peer = attest_uid_only(stream.socket)  # type: ignore[arg-type]
            except SidekeyError as exc:
                # Unattestable peers (exited before accept, recycled pid) get nothing.
                await self.app.rejected(None, exc, new_request_id(), uid=uid)
                return
            if not anonymous and self.app.connection_class(uid, peer.identity) == "anonymous":
                # Counted as a possible service at accept; attested, it is anonymous:
                # it takes an anonymous slot or is refused now, before any request.
                refusal = self._over_cap(uid, anonymous=True)
                if refusal is not None:
                    rid = new_request_id()
                    await self._report_refusal(peer, uid, refusal, rid)
                    await self._send_overloaded(stream, refusal, rid)
                    return
                anonymous = True
                self._add_anonymous(uid)
            # The fd is read and written directly (see _fill); it stays this socket's
            # until stream.aclose() below, after the last use.
            wire = _Wire(self.limits.max_header_bytes, self.limits.max_body_bytes,
                         stream.socket.fileno())
            state = ConnectionState(peer=peer)
            with contextlib.suppress(_Close, trio.BrokenResourceError, trio.ClosedResourceError):
                await self._serve(stream, wire, state)
        except Exception:
            log.exception("connection handler failed")
        finally:
            self._release(uid, anonymous=anonymous)
            if peer is not None:
                peer.close()
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _serve(self, stream: trio.SocketStream, wire: _Wire, state: ConnectionState) -> None:
        """Answer the connection's requests in order until it closes, errs or times out."""
        limits = self.limits
        idle_s = limits.first_request_timeout_s  # nothing sent yet: silent slots close soon
        ready = wire.ready
        while not self._draining:
            if ready:
                # Pipelined: already parsed, so no wait; one checkpoint keeps a client
                # that sent many requests at once from holding the loop.
                await trio.lowlevel.checkpoint()
            else:
                await self._fill(stream, wire, state, idle_s)
                idle_s = limits.idle_timeout_s
            message = ready.popleft()
            rid = new_request_id()
            request = Request(
                method=message.method,
                path=message.target,
                query="",
                headers=message.headers,
                body=message.body,
                peer=state.peer,
                request_id=rid,
                conn=state,
            )
            if "?" in message.target:
                request.path, _, request.query = message.target.partition("?")
            self.in_flight += 1
            try:
                # In-flight calls are shielded from the idle-close at shutdown; the
                # grace deadline on the connection nursery still bounds them.
                response = await self.app.handle(request)
            finally:
                self.in_flight -= 1
            keep_alive = message.keep_alive and not wire.upgraded and not self._draining
            await self._send(stream, wire.fd, response, rid, keep_alive=keep_alive,
                             head_only=message.method == "HEAD")

    async def _fill(self, stream: trio.SocketStream, wire: _Wire, state: ConnectionState,
                    idle_s: float) -> None:
        """Read until a whole request is parsed, or answer why not and raise _Close.

        Waits: ``idle_s`` for the first byte of a request (first_request_timeout_s on a
        new connection, idle_timeout_s between keep-alive requests; cut short at
        shutdown), then header_timeout_s from that byte for the whole head, then
        body_timeout_s from the end of the head for the whole body. A request that is
        already readable costs no cancel scope; a wait costs one, its deadline moved
        as the request advances.

        The socket is read directly (non-blocking ``os.read`` on its fd, trio's
        wait_readable only when nothing is there): trio's receive_some would also
        yield to the scheduler twice per read. Between two reads of the same request
        the task always waits (yields), so a client streaming bytes cannot hold the
        loop."""
        fd = wire.fd
        if wire.pending:
            wire.resume()  # the rest of a pipelining client's receive, before reading more
        if wire.refusal is None and not wire.eof and not wire.upgraded and not wire.ready and not (
                _read(fd, wire)
                and (wire.ready or wire.refusal is not None or wire.eof or wire.upgraded)):
            limits = self.limits
            now = trio.current_time()
            idle = not wire.in_message
            if idle:
                deadline = now + idle_s
            elif wire.in_head:
                deadline = now + limits.header_timeout_s
            else:
                deadline = now + limits.body_timeout_s
            in_body = not idle and not wire.in_head
            with trio.CancelScope(deadline=deadline) as scope:
                if idle:
                    self._idle_scopes.add(scope)
                try:
                    while True:
                        await trio.lowlevel.wait_readable(fd)
                        if not _read(fd, wire):
                            continue
                        if wire.ready or wire.refusal is not None or wire.eof or wire.upgraded:
                            break
                        if idle and wire.in_message:
                            # First bytes of this request arrived: no longer idle.
                            idle = False
                            self._idle_scopes.discard(scope)
                            scope.deadline = min(
                                scope.deadline, trio.current_time() + limits.header_timeout_s)
                        if not in_body and wire.in_message and not wire.in_head:
                            in_body = True
                            scope.deadline = trio.current_time() + limits.body_timeout_s
                finally:
                    if idle:
                        self._idle_scopes.discard(scope)
            if scope.cancelled_caught and not wire.ready:
                if wire.in_message:
                    what = "body" if in_body else "head"
                    await self._send_error(
                        stream, state, protocol.RequestTimeout(f"request {what} not received in time"),
                        new_request_id())
                raise _Close
        if wire.ready:
            return
        if wire.refusal is not None:
            await self._send_error(stream, state, wire.refusal, new_request_id())
        elif wire.eof and wire.in_message:
            # The client ended its side in the middle of a request.
            await self._send_error(stream, state, _bad_http(), new_request_id())
        raise _Close

    async def _send_error(
        self,
        stream: trio.SocketStream,
        state: ConnectionState,
        err: SidekeyError,
        rid: str,
    ) -> None:
        with contextlib.suppress(Exception):
            await self.app.rejected(state.peer, err, rid)
        try:
            with contextlib.suppress(_Close):
                await self._send(stream, stream.socket.fileno(), error_response(err, rid), rid,
                                 keep_alive=False)
        finally:
            await self._linger(stream)

    async def _linger(self, stream: trio.SocketStream) -> None:
        """Half-close and discard what the client is still sending, briefly.

        Closing a Unix socket with unread input makes the client's recv() fail with
        ECONNRESET before it reads our error response (e.g. the 413 for a big body).
        """
        with contextlib.suppress(Exception):
            await stream.send_eof()
            drained = 0
            with trio.move_on_after(LINGER_S):
                while drained < LINGER_MAX_BYTES:
                    data = await stream.receive_some(RECEIVE_CHUNK)
                    if not data:
                        break
                    drained += len(data)

    async def _send(
        self,
        stream: trio.SocketStream,
        fd: int,
        response: Response,
        rid: str,
        *,
        keep_alive: bool,
        head_only: bool = False,
    ) -> None:
        """Write the response (its head only for a HEAD request, RFC 9110 9.3.2: a body
        would be read as the next response); raise _Close when the connection ends."""
        body = response.body
        parts = [_STATUS_LINES.get(response.status) or b"HTTP/1.1 %d \r\n" % response.status]
        if response.content_type == b"application/json":
            parts.append(_JSON_HEAD)
        else:
            _check_field(b"content-type", response.content_type)
            parts.append(b"content-type: " + response.content_type + b"\r\ncontent-length: ")
        parts += (str(len(body)).encode(), b"\r\nx-request-id: ", rid.encode(), _AFTER_RID)
        for name, value in response.headers:
            _check_field(name, value)
            if name.lower() == b"connection":
                if value.lower() == b"close":
                    keep_alive = False
                continue
            parts += (name, b": ", value, b"\r\n")
        if not keep_alive:
            parts.append(_CLOSE)
        parts.append(b"\r\n")
        if not head_only:
            parts.append(body)
        data = b"".join(parts)
        # Usually the whole response fits in the socket buffer: one write, no wait, no
        # cancel scope. Otherwise the rest goes out within body_timeout_s.
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            raise _Close from None  # the peer went away
        if sent < len(data):
            with trio.move_on_after(self.limits.body_timeout_s) as cs:
                await stream.send_all(memoryview(data)[sent:])
            if cs.cancelled_caught:
                raise _Close
        if not keep_alive:
            raise _Close


def _read(fd: int, wire: _Wire) -> bool:
    """One non-blocking read into ``wire``; False if nothing was there to read."""
    try:
        data = os.read(fd, RECEIVE_CHUNK)
    except BlockingIOError:
        return False
    except OSError:
        data = b""  # ECONNRESET and the like: the peer is gone, as at EOF
    if data:
        wire.feed(data)
    else:
        wire.eof = True
    return True


def _check_field(name: bytes, value: bytes) -> None:
    """A header the application set must not break the response's framing."""
    if _TOKEN.fullmatch(name) is None or _FIELD_VALUE.fullmatch(value) is None:
        raise ValueError(f"invalid response header {name[:64]!r}")
