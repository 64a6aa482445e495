"""The Unix-socket listener: HTTP/1.1 via h11, connection limits, graceful stop.

The server knows nothing about tokens or policy. It attests each connection's peer
once at accept, parses requests within the configured caps (header size, body size,
header/body read time, connection count), hands complete requests to an
:class:`Application`, and writes its response. Protocol violations are answered here
(400/408/413/431/503) and reported to the application so it can audit them.

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
import resource
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import h11
import trio

from . import protocol
from .config import ListenConfig
from .encoding import random_hex
from .hardening import open_socket_dir
from .peer import PeerHandle, PeerIdentity, attest
from .protocol import SidekeyError

log = logging.getLogger(__name__)

LINGER_S = 2.0  # after an error response, drain the client's input this long at most
LINGER_MAX_BYTES = 32 * 1024 * 1024
RECEIVE_CHUNK = 64 * 1024
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
                peer = attest(stream.socket)  # type: ignore[arg-type]
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
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
            state = ConnectionState(peer=peer)
            with contextlib.suppress(_Close, trio.BrokenResourceError, trio.ClosedResourceError):
                first = True
                while not self._draining:
                    await self._one_request(stream, conn, state, first=first)
                    first = False
                    if conn.our_state is h11.MUST_CLOSE or self._draining:
                        break
                    conn.start_next_cycle()
        except Exception:
            log.exception("connection handler failed")
        finally:
            self._release(uid, anonymous=anonymous)
            if peer is not None:
                peer.close()
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _receive(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        data = await stream.receive_some(RECEIVE_CHUNK)
        conn.receive_data(data)  # b"" tells h11 the peer closed

    async def _next_event(self, stream: trio.SocketStream, conn: h11.Connection) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            await self._receive(stream, conn)

    async def _one_request(
        self, stream: trio.SocketStream, conn: h11.Connection, state: ConnectionState,
        *, first: bool = False,
    ) -> None:
        rid = new_request_id()
        limits = self.limits
        # Phase 1: the request head. Wait up to idle_timeout for the first byte of a
        # new request (keep-alive; first_request_timeout on a connection that has sent
        # nothing yet, so silent connections cannot sit on slots), then header_timeout
        # for the whole head.
        idle_s = limits.first_request_timeout_s if first else limits.idle_timeout_s
        try:
            with trio.CancelScope(deadline=trio.current_time() + idle_s) as scope:
                self._idle_scopes.add(scope)
                try:
                    while True:
                        event = conn.next_event()
                        if event is not h11.NEED_DATA:
                            break
                        await self._receive(stream, conn)
                        if scope in self._idle_scopes:
                            # First bytes of this request arrived: no longer idle.
                            self._idle_scopes.discard(scope)
                            scope.deadline = min(
                                scope.deadline, trio.current_time() + limits.header_timeout_s
                            )
                finally:
                    self._idle_scopes.discard(scope)
        except h11.RemoteProtocolError as exc:
            await self._protocol_error(stream, conn, state, exc, rid)
            raise _Close from None
        if scope.cancelled_caught:
            if conn.their_state is h11.SEND_BODY or conn.trailing_data[0]:
                await self._send_error(
                    stream, conn, state,
                    protocol.RequestTimeout("request head not received in time"),
                    rid,
                )
            raise _Close
        if isinstance(event, h11.ConnectionClosed):
            raise _Close
        if not isinstance(event, h11.Request):
            raise _Close
        # h11 caps only a head that arrives in pieces; one that arrives whole is checked here.
        head_size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
        if head_size > limits.max_header_bytes:
            await self._send_error(
                stream, conn, state,
                protocol.HeadersTooLarge("request head too large", code="headers_too_large"),
                rid,
            )
            raise _Close
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        method = event.method.decode("ascii")
        # Phase 2: the body, capped in size and time.
        clen = headers.get("content-length")
        if clen is not None and clen.isdigit() and int(clen) > limits.max_body_bytes:
            await self._send_error(
                stream, conn, state,
                protocol.TooLarge(f"body larger than {limits.max_body_bytes} bytes"),
                rid,
            )
            raise _Close
        chunks: list[bytes] = []
        size = 0
        try:
            # A small body usually came in the same read as the head: then the whole
            # message is in h11's buffer and no timed wait (no cancel scope) is needed.
            buffered = conn.next_event()
            complete = False
            while buffered is not h11.NEED_DATA:
                if isinstance(buffered, h11.Data):
                    size += len(buffered.data)
                    if size > limits.max_body_bytes:
                        break  # refused below, with the same answer as a slow body
                    chunks.append(buffered.data)
                elif isinstance(buffered, h11.EndOfMessage):
                    complete = True
                    break
                else:
                    raise _Close  # ConnectionClosed
                buffered = conn.next_event()
        except h11.RemoteProtocolError as exc:
            await self._protocol_error(stream, conn, state, exc, rid)
            raise _Close from None
        if size > limits.max_body_bytes:
            await self._send_error(
                stream, conn, state,
                protocol.TooLarge(f"body larger than {limits.max_body_bytes} bytes"),
                rid,
            )
            raise _Close
        if not complete:
            await self._read_body(stream, conn, state, rid, chunks, size)
        request = Request(
            method=method,
            path=path,
            query=query,
            headers=headers,
            body=b"".join(chunks),
            peer=state.peer,
            request_id=rid,
            conn=state,
        )
        self.in_flight += 1
        try:
            # In-flight calls are shielded from the idle-close at shutdown; the
            # grace deadline on the connection nursery still bounds them.
            response = await self.app.handle(request)
        finally:
            self.in_flight -= 1
        await self._send(stream, conn, response, rid, keep_alive=not self._draining)

    async def _read_body(self, stream: trio.SocketStream, conn: h11.Connection,
                         state: ConnectionState, rid: str, chunks: list[bytes],
                         size: int) -> None:
        """The rest of a body that was not all buffered with the head: at most
        body_timeout_s and max_body_bytes (appended to ``chunks``)."""
        limits = self.limits
        try:
            with trio.move_on_after(limits.body_timeout_s) as body_scope:
                while True:
                    ev = await self._next_event(stream, conn)
                    if isinstance(ev, h11.Data):
                        size += len(ev.data)
                        if size > limits.max_body_bytes:
                            await self._send_error(
                                stream, conn, state,
                                protocol.TooLarge(f"body larger than {limits.max_body_bytes} bytes"),
                                rid,
                            )
                            raise _Close
                        chunks.append(ev.data)
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    elif isinstance(ev, h11.ConnectionClosed):
                        raise _Close
        except h11.RemoteProtocolError as exc:
            await self._protocol_error(stream, conn, state, exc, rid)
            raise _Close from None
        if body_scope.cancelled_caught:
            await self._send_error(
                stream, conn, state,
                protocol.RequestTimeout("request body not received in time"),
                rid,
            )
            raise _Close

    async def _protocol_error(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        state: ConnectionState,
        exc: h11.RemoteProtocolError,
        rid: str,
    ) -> None:
        status = exc.error_status_hint
        err: SidekeyError
        if status == 431 or "exceeds" in str(exc):
            err = protocol.HeadersTooLarge("request head too large", code="headers_too_large")
        else:
            # h11 hints 400, or 501 for a Transfer-Encoding it does not implement; a hint
            # no error class fixes (none today) is answered as a plain 400.
            if status not in protocol.ERROR_CLASS_BY_STATUS:
                status = 400
            err = protocol.error_for_status(status, "malformed HTTP request", code="bad_http")
        await self._send_error(stream, conn, state, err, rid)

    async def _send_error(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        state: ConnectionState,
        err: SidekeyError,
        rid: str,
    ) -> None:
        with contextlib.suppress(Exception):
            await self.app.rejected(state.peer, err, rid)
        try:
            await self._send(stream, conn, error_response(err, rid), rid, keep_alive=False)
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
        conn: h11.Connection,
        response: Response,
        rid: str,
        *,
        keep_alive: bool,
    ) -> None:
        if conn.our_state not in (h11.SEND_RESPONSE, h11.IDLE):
            raise _Close  # mid-response or errored: nothing more can be said
        headers = [
            (b"content-type", response.content_type),
            (b"content-length", str(len(response.body)).encode()),
            (b"x-request-id", rid.encode()),
            (b"server", SERVER_HEADER),
            (b"cache-control", b"no-store"),
            *response.headers,
        ]
        if not keep_alive:
            headers.append((b"connection", b"close"))
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        data += conn.send(h11.Data(data=response.body))
        data += conn.send(h11.EndOfMessage())
        with trio.move_on_after(self.limits.body_timeout_s) as cs:
            await stream.send_all(data)
        if cs.cancelled_caught or not keep_alive:
            raise _Close
