"""Metrics: ``GET /v1/metrics`` on the socket (tier admin), and the optional loopback
TCP listener for Prometheus (``metrics.listen``) that serves ``GET /metrics`` and
nothing else.

The samples come from :mod:`sidekey.metrics`: counters and histograms the hooks keep,
plus a :class:`~sidekey.metrics.Snapshot` gathered here at scrape time. A scrape does
bounded work: in-memory counts, plus one listing of pending approvals from the state
store (at most ``MAX_APPROVALS_LISTED``) that is reused for ``APPROVALS_REFRESH_S``,
so scrapes from several collectors (or a loop) cost the store one listing per interval.
The TCP listener, open to every process on the host, renders at most once per
``TCP_RENDER_INTERVAL_S`` (requests in between get the same bytes).

The TCP listener is deliberately small: one request per connection (answered with
``connection: close``), a request head of at most ``MAX_HEAD_BYTES``, the whole
exchange within ``CONNECTION_TIMEOUT_S``, at most ``MAX_CONNECTIONS`` at once (more
are closed at once). It answers 200 to ``GET /metrics`` (a query string is ignored),
404 to everything else. It runs in the daemon's nursery (not prometheus_client's
threaded server, which has no such caps).
"""

from __future__ import annotations

import socket
from typing import Any

import h11
import trio

from .. import approvals
from ..backends.cache import CachedBackend
from ..config import parse_metrics_listen
from ..metrics import CONTENT_TYPE, CacheStats, SinkStats, Snapshot
from ..server import Request, Response, ServerError
from ..store import MAX_APPROVALS_LISTED, StateUnavailable
from .context import Context, log

METRICS_PATH = "/v1/metrics"
TCP_METRICS_PATH = b"/metrics"
# How long one listing of pending approvals is reused by later scrapes.
APPROVALS_REFRESH_S = 5.0
# The TCP listener answers anyone on the host: it renders at most once per this many
# seconds (a scraper polls every 15 s or more), so a local loop of requests cannot make
# the daemon spend its event loop on rendering.
TCP_RENDER_INTERVAL_S = 1.0
# The TCP listener's caps (see the module docstring).
MAX_CONNECTIONS = 8
MAX_HEAD_BYTES = 8 * 1024
CONNECTION_TIMEOUT_S = 10.0
RECEIVE_BYTES = 4096
_CONTENT_TYPE = CONTENT_TYPE.encode()
_NOT_FOUND = b"not found: this listener serves GET /metrics only\n"


class Scrape(Context):
    """``GET /v1/metrics`` and the TCP listener (a mixin of
    :class:`~sidekey.daemon.app.Sidekey`)."""

    async def metrics_endpoint(self, req: Request) -> Response:
        """``GET /v1/metrics`` (tier admin): the Prometheus text format 0.0.4."""
        return Response(status=200, body=await self.render_metrics(), content_type=_CONTENT_TYPE)

    async def render_metrics(self) -> bytes:
        """Every metric, with the scrape-time facts gathered now."""
        return self.metrics.render(await self._metrics_snapshot())

    async def _pending_approvals(self) -> int | None:
        """Pending approvals as the store lists them (None when it cannot say), one
        listing per APPROVALS_REFRESH_S whatever the number of scrapes."""
        now = trio.current_time()
        async with self._scrape_lock:
            cached = self._approvals_pending
            if cached is not None and now - cached[0] < APPROVALS_REFRESH_S:
                return cached[1]
            count: int | None
            try:
                count = len(await self.approvals.list([approvals.PENDING],
                                                      limit=MAX_APPROVALS_LISTED))
            except StateUnavailable:
                count = None  # sidekey_state_store_up says why
            self._approvals_pending = (trio.current_time(), count)
            return count

    async def _metrics_snapshot(self) -> Snapshot:
        store = self.store.health()
        caches = []
        for name, backend in sorted(self.backends.items()):
            if isinstance(backend, CachedBackend):
                hits, misses, entries = backend.counts()
                caches.append(CacheStats(backend=name, hits=hits, misses=misses, entries=entries))
        server = self.server
        return Snapshot(
            leases_active=self.leases.active_count,
            approvals_pending=await self._pending_approvals(),
            approvals_waiting=self.approvals.waiting,
            connections=server.active_connections if server is not None else 0,
            in_flight=server.in_flight if server is not None else 0,
            config_generation=self.generation,
            store=str(store.get("backend", "unknown")),
            store_up=bool(store.get("ok")),
            store_errors=dict(getattr(self.store, "error_counts", {})),
            caches=caches,
            sinks=[_sink_stats(h) for h in self.audit.health().get("sinks", ())],
        )

    # ------------------------------------------------------------------ TCP listener

    async def serve_metrics_tcp(
        self, sock: socket.socket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve ``GET /metrics`` on the bound, listening TCP socket ``sock`` until
        cancelled (see the module docstring for the caps)."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        active = 0

        async def connection(stream: trio.SocketStream) -> None:
            nonlocal active
            if active >= MAX_CONNECTIONS:
                await trio.aclose_forcefully(stream)
                return
            active += 1
            try:
                with trio.move_on_after(CONNECTION_TIMEOUT_S):
                    await self._answer_tcp(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
                pass  # the scraper went away or spoke no HTTP: nothing to answer
            except Exception:
                log.exception("metrics listener: connection failed")
            finally:
                active -= 1
                await trio.aclose_forcefully(stream)

        task_status.started()
        await trio.serve_listeners(connection, [listener])

    async def _render_for_tcp(self) -> bytes:
        """The rendered metrics, at most TCP_RENDER_INTERVAL_S old (concurrent requests
        wait for one render and share it)."""
        async with self._tcp_render_lock:
            cached = self._tcp_scrape
            if cached is not None and trio.current_time() - cached[0] < TCP_RENDER_INTERVAL_S:
                return cached[1]
            body = await self.render_metrics()
            self._tcp_scrape = (trio.current_time(), body)
            return body

    async def _answer_tcp(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(RECEIVE_BYTES))
                continue
            break
        if not isinstance(event, h11.Request):
            return  # the scraper closed (h11.ConnectionClosed) before a whole request
        path = event.target.split(b"?", 1)[0]
        if event.method == b"GET" and path == TCP_METRICS_PATH:
            status, content_type, body = 200, _CONTENT_TYPE, await self._render_for_tcp()
        else:
            status, content_type, body = 404, b"text/plain; charset=utf-8", _NOT_FOUND
        data = conn.send(h11.Response(status_code=status, headers=[
            (b"content-type", content_type), (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"), (b"connection", b"close")]))
        if event.method != b"HEAD":  # a HEAD answer has the head only (h11 enforces it)
            data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
        data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        await stream.send_all(data)


def bind_metrics_listener(listen: str) -> socket.socket:
    """Bind and listen on ``metrics.listen`` (a loopback ``IP:PORT``, checked at config
    load). Raises :class:`ServerError` naming the key when the address cannot be bound."""
    try:
        host, port = parse_metrics_listen(listen)
    except ValueError as exc:  # load_config refused it already; a bug if it gets here
        raise ServerError(f"metrics.listen: {exc}") from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # A restarted daemon re-binds at once (its old connections in TIME_WAIT).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(MAX_CONNECTIONS * 2)
    except OSError as exc:
        sock.close()
        raise ServerError(f"metrics.listen {listen}: cannot listen: {exc.strerror}") from None
    return sock


def _sink_stats(health: dict[str, Any]) -> SinkStats:
    kind = str(health.get("sink", "unknown"))
    # The audit file's health has no name: it is the one file sink.
    name = str(health.get("name") or ("file" if kind == "jsonl" else kind))
    behind = health.get("queued", health.get("pending", 0))
    return SinkStats(
        sink=name, type=kind, up=bool(health.get("ok")),
        lines_behind=int(behind or 0), spool_bytes=int(health.get("queued_bytes") or 0),
        dropped=int(health.get("dropped") or 0),
    )


__all__ = ["METRICS_PATH", "Scrape", "bind_metrics_listener"]
