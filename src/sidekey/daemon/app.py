"""Wiring: the :class:`Sidekey` application (the rooms combined, and the route table),
request dispatch (:meth:`Sidekey.handle`, :meth:`Sidekey.rejected`,
:meth:`Sidekey.connection_class`) and :func:`run`, which starts the daemon.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .. import approvals, hardening, logs, systemd, tracecontext
from ..audit import AuditLog, AuditSink
from ..audit.chain import load_signer
from ..audit.forward import Forwarder
from ..audit.hmackey import load_hasher as load_audit_hasher
from ..audit.jsonl import open_jsonl_sink
from ..audit.syslog import SyslogSink
from ..audit.webhook import WebhookAuth, WebhookSink
from ..backends import Backend, build_backends, unwrap
from ..config import (
    Config,
    FileSinkConfig,
    LoadedConfig,
    RbacEntry,
    SecretRef,
    SyslogSinkConfig,
    WebhookSinkConfig,
)
from ..peer import PeerHandle, PeerIdentity, tier_allows
from ..peer import no_pid_message as peer_no_pid_message
from ..protocol import ConfigError, Denied, Internal, MethodNotAllowed, NotFound, SidekeyError
from ..server import HttpServer, Request, Response, bind_unix_socket, error_response
from ..store import StateStore, open_configured_store
from ..store.sqlite import SqliteStore, reinitialize_if_empty
from .admin import Admin
from .calls import Calls
from .context import (
    APPROVAL_VERBS,
    APPROVALS_PREFIX,
    LIMITED_EVENT_CAPS,
    ROTATE_PREFIX,
    Route,
    StoreJournal,
    _shown,
    build_codec,
    log,
)
from .egress import EGRESS_ENDPOINT, Egress, is_egress_path
from .introspect import INTROSPECT_PATH, Introspection
from .lifecycle import Lifecycle, check_config_signature
from .scrape import METRICS_PATH, Scrape, bind_metrics_listener
from .sessions import SESSIONS_END_PATH, Sessions

# One line per request when log.requests (or log.format json) asks for it.
request_log = logging.getLogger(logs.REQUEST_LOGGER)

# PeerHandle.recheck's refusals: the connection is closed after answering one.
PEER_LOST_CODES = frozenset({"peer_gone", "peer_changed"})
# The metrics' endpoint label for paths with an id in them, and for unknown paths.
ROTATE_ENDPOINT = f"{ROTATE_PREFIX}{{name}}/rotate"
UNKNOWN_ENDPOINT = "_other"


class Sidekey(Calls, Sessions, Introspection, Admin, Lifecycle, Scrape, Egress):
    """The application: one instance per daemon process."""

    def _routes(self) -> dict[tuple[str, str], Route]:
        """The route table (the rotation and approval-verb paths are matched in :meth:`handle`)."""
        return {
            ("GET", "/v1/approvals"): Route("approver", self.list_approvals),
            ("GET", "/v1/health"): Route("anonymous", self.health),
            ("POST", "/v1/authorize"): Route("service", self.authorize),
            ("POST", "/v1/redeem"): Route("service", self.redeem),
            ("POST", "/v1/release"): Route("service", self.release),
            # Only for the server the caller is attested as (checked in the handler).
            ("POST", INTROSPECT_PATH): Route("service", self.introspect),
            # Ends a session of the user the caller proves (checked in the handler).
            ("POST", SESSIONS_END_PATH): Route("service", self.end_session),
            ("POST", "/v1/tokens"): Route("admin", self.mint_token),
            ("GET", "/v1/status"): Route("admin", self.status),
            ("GET", "/v1/registry"): Route("security", self.registry_list),
            ("POST", "/v1/admin/reload"): Route("admin", self.admin_reload),
            ("GET", METRICS_PATH): Route("admin", self.metrics_endpoint),
        }

    async def handle(self, request: Request) -> Response:
        """Dispatch one request with its log context set (:data:`sidekey.logs.REQUEST`):
        every log line written while it is handled, by this task or one it starts,
        carries its request_id and route and, once known, server, tool, code and the
        trace-id of a valid ``traceparent`` header (which the audit events of the call
        carry too: :meth:`event`). A malformed ``traceparent`` is ignored (W3C Trace
        Context: not an error)."""
        rlog = logs.RequestLog(
            request_id=request.request_id, method=_shown(request.method[:16]),
            path=_shown(request.path),
            trace_id=tracecontext.trace_id(request.headers.get(tracecontext.HEADER)))
        token = logs.REQUEST.set(rlog)
        started = time.monotonic()
        try:
            response = await self._dispatch(request)
            rlog.http_status = response.status
            if rlog.code is None and response.status < 400:
                rlog.code = "ok"
            if logs.request_lines(self.cfg.log.format, self.cfg.log.requests):
                rlog.duration_ms = round((time.monotonic() - started) * 1000, 3)
                request_log.log(logging.WARNING if response.status >= 500 else logging.INFO,
                                "%s %s %d %s", rlog.method, rlog.path, response.status, rlog.code)
            return response
        finally:
            logs.REQUEST.reset(token)

    async def _dispatch(self, request: Request) -> Response:
        started = time.perf_counter()
        # The metrics' endpoint label: a route template, never the caller's path.
        endpoint = UNKNOWN_ENDPOINT
        code: str | None = None  # set on every way out but cancellation (not counted)
        route = self.routes.get((request.method, request.path))
        if route is not None:
            endpoint = request.path
        if route is None and request.path.startswith(ROTATE_PREFIX) and request.path.endswith("/rotate"):
            route = Route("security", self.rotate_secret) if request.method == "POST" else None
            endpoint = ROTATE_ENDPOINT
        if route is None and request.path.startswith(APPROVALS_PREFIX):
            verb = APPROVAL_VERBS.get(request.path.rsplit("/", 1)[-1])
            if verb is not None and request.method == verb[0]:
                route = Route(verb[1], self.approval_verb)
                endpoint = f"{APPROVALS_PREFIX}{{id}}/{request.path.rsplit('/', 1)[-1]}"
        if route is None and is_egress_path(request.path):
            # Any method: the lease's egress rules decide (sidekey.daemon.egress).
            route = Route("service", self.egress)
            endpoint = EGRESS_ENDPOINT
        if route is None:
            endpoint = UNKNOWN_ENDPOINT
        try:
            if route is None:
                if any(path == request.path for _, path in self.routes):
                    raise MethodNotAllowed(
                        f"{_shown(request.method)} is not allowed on {_shown(request.path)}",
                        code="method_not_allowed",
                    )
                raise NotFound(f"no endpoint {_shown(request.path)}", code="not_found")
            if route.tier != "anonymous":
                # The connection's identity was read at accept; the socket may since have
                # been passed to another process (SCM_RIGHTS) or its process may have
                # exited or setuid()'d. Every request that needs a tier (all of them
                # change or reveal state) re-checks the pinned process first: peer_gone /
                # peer_changed, audited as peer.rejected.
                request.peer.recheck()
            _, tier = self._peer_facts(request)
            if not tier_allows(tier, route.tier) and request.peer.identity.attestation == "uid-only":
                raise self._uid_only_refusal(request.peer.identity, route.tier)
            if not tier_allows(tier, route.tier):
                raise Denied(
                    f"{_shown(request.path)} requires tier {route.tier}; this process is {tier}",
                    code="peer_rejected",
                )
            response = await route.handler(request)
            code = "pending_approval" if response.status == approvals.STATUS_PENDING else "ok"
            return response
        except SidekeyError as exc:
            logs.note(code=exc.code)
            code = exc.code
            try:
                await self._audit_rejection(request, exc)
                response = error_response(exc, request.request_id)
            except SidekeyError as audit_exc:
                logs.note(code=audit_exc.code)
                response = error_response(audit_exc, request.request_id)
            if exc.code in PEER_LOST_CODES:
                # The process this connection was attested for is gone or changed for
                # good: one refusal (one audit event) per connection, not one per
                # request whoever holds the socket now pipelines.
                response.headers.append((b"connection", b"close"))
            return response
        except Exception as exc:
            code = "internal"
            log.exception("internal error handling %s %s", request.method, request.path[:256])
            err = Internal("internal error", code="internal")
            logs.note(code=err.code)
            # A bug, not a verdict: recorded all the same (the exception's type only; its
            # message may quote request data), so a fault an attacker can trigger shows.
            try:
                # An anonymous caller that found such a fault must not get unbounded audit
                # volume out of it either (audit.rejections_per_uid, like its refusals).
                limited = self._anonymous_connection(request)
                if not limited or await self._admit_rejection(request.peer.identity.uid, err.code):
                    await self.audit.emit(self.event(
                        "request.failed",
                        peer=request.peer.identity.audit(),
                        request_id=request.request_id,
                        error={"code": err.code, "message": err.message, "status": err.status},
                        extra={"path": request.path[:256], "method": request.method[:16],
                               "exception": type(exc).__name__},
                        **(LIMITED_EVENT_CAPS if limited else {}),
                    ))
            except Exception:  # audit down: the log line above is all there is
                log.exception("could not audit the internal error of %s", request.request_id)
            return error_response(err, request.request_id)
        finally:
            if code is not None:
                self.metrics.request(endpoint, request.call, code, time.perf_counter() - started)

    def _uid_only_refusal(self, ident: PeerIdentity, needed: str) -> Denied:
        """Why a peer without a visible pid gets nothing above anonymous: the mode is
        off (the default), or on and no uid/gid-only selector names its uid/gid. The
        message names the config key and the two pod layouts, so the refusal explains
        itself in the MCP server's log (peer.py, "PID namespace")."""
        if self.cfg.attestation.pid_namespace != "uid_only":
            message = peer_no_pid_message(ident.uid, ident.gid)
        else:
            message = (
                f"the kernel reports no pid for this peer (another PID namespace) and "
                f"attestation.pid_namespace is uid_only, but uid {ident.uid} gid {ident.gid} "
                f"match no peers selector of uid/user/gid/group keys only; this endpoint "
                f"needs tier {needed} (a peer attested by uid/gid holds service at most)"
            )
        return Denied(message, code="peer_unattested", pid_namespace=self.cfg.attestation.pid_namespace)

    async def rejected(
        self, peer: PeerHandle | None, error: SidekeyError, request_id: str, *, uid: int | None = None
    ) -> None:
        """Called by the server for transport-level rejections (bad HTTP, too large,
        unattestable peer, too many connections). ``uid``: the peer's uid from
        SO_PEERCRED when there is no attested peer. Bounded per uid whoever the caller is:
        none of these is a decision about a principal, and most come before attestation."""
        self.metrics.refused(error.code)
        event_type = "peer.rejected" if error.code.startswith("peer_") else "request.rejected"
        key = peer.identity.uid if peer is not None else uid
        if not await self._admit_rejection(-1 if key is None else key, error.code):
            return
        if peer is not None:
            who: dict[str, Any] | None = peer.identity.audit()
        else:
            who = {"uid": uid} if uid is not None else None
        await self.audit.emit(
            self.event(
                event_type,
                peer=who,
                request_id=request_id,
                error={"code": error.code, "message": error.message, "status": error.status},
                **LIMITED_EVENT_CAPS,
            )
        )

    def connection_class(self, uid: int, identity: PeerIdentity | None) -> str:
        """The server's hook for per-uid connection slots: ``"service"`` or ``"anonymous"``.

        With ``identity`` (after attestation): anonymous unless the peer holds a tier above
        anonymous. Without (at accept, uid only): anonymous only when no selector could
        give this uid more, i.e. the daemon's uid is not it, and every peers/rbac selector
        that does not pin a uid or user (gid, group, unit, exe only) is absent: such a
        selector could match any uid, so then every uid counts as service until attested.
        """
        if identity is not None:
            return "anonymous" if self._identity_tier(identity) == "anonymous" else "service"
        if uid == self.daemon_uid:
            return "service"
        classes = self._uid_classes
        if classes is None or classes[0] != self.generation:
            classes = self._uid_classes = (self.generation, *_selector_uids(self.cfg, self.daemon_uid))
        _, any_uid, uids, users = classes
        if any_uid or uid in uids:
            return "service"
        return "service" if users and _uid_name(uid) in users else "anonymous"


@functools.lru_cache(maxsize=4096)
def _uid_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _selector_uids(cfg: Config, daemon_uid: int) -> tuple[bool, frozenset[int], frozenset[str]]:
    """Which uids a peers or rbac selector can lift above anonymous, from the config
    alone: (any uid may: some selector pins neither uid nor user, the uids named, the
    user names named)."""
    any_uid = False
    uids: set[int] = set()
    users: set[str] = set()
    for selectors in cfg.peers.values():
        for sel in selectors:
            if sel.uid is not None:
                uids.add(daemon_uid if sel.uid == "self" else int(sel.uid))
            elif sel.user is not None:
                users.add(sel.user)
            else:
                any_uid = True
    for tier in ("owner", "admin", "security", "approver", "service"):
        entry: RbacEntry = getattr(cfg.rbac, tier)
        uids.update(daemon_uid if u == "self" else int(u) for u in entry.uids)
        users.update(entry.users)
        if entry.gids or entry.groups or entry.units:
            any_uid = True
    return any_uid, frozenset(uids), frozenset(users)


# --------------------------------------------------------------------------- running


def build_forwarders(loaded: LoadedConfig,
                     backends: dict[str, Backend] | None = None) -> list[Forwarder]:
    """The forwarding audit sinks of ``audit.sinks`` (everything but the file).
    ``backends``: where a webhook's auth secret is read from."""
    out: list[Forwarder] = []
    for entry in loaded.config.audit.sinks:
        if isinstance(entry, SyslogSinkConfig):
            out.append(SyslogSink(
                entry.name or "syslog", transport=entry.transport,
                socket_path=str(loaded.resolve(entry.socket)), host=entry.host, port=entry.port,
                tls=entry.tls, ca_file=str(loaded.resolve(entry.ca_file)) if entry.ca_file else None,
                fmt=entry.format, facility=entry.facility, app_name=entry.app_name,
                max_message_bytes=entry.max_message_bytes, required=entry.required,
                queue_max=entry.queue_max, queue_max_bytes=entry.queue_max_bytes,
                deliver_timeout_s=entry.deliver_timeout_s))
        elif isinstance(entry, WebhookSinkConfig):
            name = entry.name or "webhook"
            auth = None
            if entry.auth is not None:
                ref = entry.auth.secret
                if backends is None or ref.backend not in backends:
                    raise ConfigError(f"audit sink {name}: no backend {ref.backend!r} for its "
                                      "auth secret")
                auth = WebhookAuth(header=entry.auth.header, prefix=entry.auth.prefix,
                                   # Past the value cache: it is read at the first
                                   # send and after a 401/403 (rotated), not per batch.
                                   fetch=_secret_reader(unwrap(backends[ref.backend]), ref),
                                   label=f"{ref.backend}:{ref.label}")
            out.append(WebhookSink(
                name, url=entry.url, audit_path=loaded.audit_path,
                cursor_path=loaded.state_dir / "audit-sinks" / f"{name}.cursor",
                fmt=entry.format, headers=dict(entry.headers), auth=auth,
                ca_file=str(loaded.resolve(entry.ca_file)) if entry.ca_file else None,
                timeout_s=entry.timeout_s, batch_lines=entry.batch_lines,
                batch_bytes=entry.batch_bytes, spool_max_bytes=entry.spool_max_bytes,
                required=entry.required, deliver_timeout_s=entry.deliver_timeout_s))
    return out


def _secret_reader(backend: Backend, ref: SecretRef) -> Callable[[], Awaitable[str]]:
    async def read() -> str:
        return (await backend.fetch(ref)).value

    return read


async def run(loaded: LoadedConfig, *, socket_path: Path | None = None, init: bool = False) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the process exit code.

    ``init``: start a new state database in place of an empty (0-byte) ``state.db``
    (without it such a file stops the start: ``state_db_empty``).
    """
    # First, before any key is loaded: no core dumps, no ptrace/proc access by others
    # of our uid (see sidekey.hardening).
    hardening.protect_process_memory()
    cfg = loaded.config
    path = socket_path or loaded.socket_path
    trust = check_config_signature(loaded, running=None)
    # Files the daemon writes: a loose mode is fixed (with a warning), a foreign owner
    # or a directory others can write to stops the start.
    file_warnings = hardening.check_daemon_files(hardening.daemon_files(loaded), fix=True)
    try:
        hardening.check_key_files(hardening.key_files(loaded))
    except hardening.UnsafePathError as exc:
        # Reported like the key loaders' own refusals: a config error naming the file.
        raise ConfigError(f"{exc} [{exc.code}]") from None
    reinitialized = (
        init and cfg.state.backend == "sqlite" and reinitialize_if_empty(loaded.state_dir)
    )
    # Cheap checks that can fail first (backend keys, the socket), so a failed start
    # leaves no state behind; everything opened is closed on every way out.
    journal = StoreJournal(None)
    backends = build_backends(loaded, journal=journal)
    store: StateStore | None = None
    audit: AuditLog | None = None
    sock: socket.socket | None = None
    metrics_sock: socket.socket | None = None
    inherited = None
    try:
        inherited = systemd.listen_socket()
        sock = inherited if inherited is not None else bind_unix_socket(path, cfg.listen.mode_int)
        if cfg.metrics.listen is not None:
            metrics_sock = bind_metrics_listener(cfg.metrics.listen)
        if inherited is not None and isinstance(inherited.getsockname(), str):
            path = Path(inherited.getsockname())
        codec = build_codec(loaded)
        loaded.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = await open_configured_store(loaded)
        journal.store = store
        signer = None
        if cfg.audit.checkpoint_key_file or cfg.audit.checkpoint_key_credential:
            signer = load_signer(
                loaded.resolve(cfg.audit.checkpoint_key_file) if cfg.audit.checkpoint_key_file
                else None, cfg.audit.checkpoint_key_credential)
        else:
            log.warning("audit: no checkpoint_key_file or checkpoint_key_credential: the audit "
                        "hash chain is written but no checkpoint is signed (sidekey keygen audit)")
        # Before the audit file is opened: a loose or malformed key stops the start.
        hasher = load_audit_hasher(loaded)
        file_cfg = next((s for s in cfg.audit.sinks if isinstance(s, FileSinkConfig)),
                        FileSinkConfig())
        sink: AuditSink = open_jsonl_sink(
            loaded.audit_path, fsync=cfg.audit.fsync, host=socket.gethostname(), signer=signer,
            checkpoint_every_events=cfg.audit.checkpoint_every_events,
            checkpoint_every_s=cfg.audit.checkpoint_every_s, rotate_bytes=file_cfg.rotate_bytes,
            rotate_every_s=file_cfg.rotate_every_s, keep=file_cfg.keep)
        audit = AuditLog([sink], forwarders=build_forwarders(loaded, backends))
    except BaseException:
        await _close_all(backends, store, audit)
        if metrics_sock is not None:
            metrics_sock.close()
        if sock is not None:
            sock.close()
            if inherited is None:
                path.unlink(missing_ok=True)
        raise
    for warning in loaded.warnings:
        log.warning("config: %s", warning)
    app = Sidekey(loaded, store=store, audit=audit, backends=backends, codec=codec)
    app.trust = trust
    app.audit_hasher = hasher
    server = HttpServer(app, cfg.listen)
    app.server = server
    if isinstance(store, SqliteStore):
        # Group commit: store operations run inline on the event loop only while one
        # request is served (see sidekey.store.sqlite); under load they go to its writer.
        store.load = lambda: server.in_flight
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)  # type: ignore[attr-defined]
            for forwarder in audit.forwarders:
                await nursery.start(forwarder.run)
            await nursery.start(store.run_maintenance)  # type: ignore[attr-defined]
            recovered = 0
            if store.health().get("reason") == "state_corrupt":
                # Degraded start (SqliteStore.open found the file damaged): /v1/health
                # says why and every call fails closed; recovery and sweeps wait for a
                # repaired or restored database.
                log.error("state database is corrupt: lease recovery and backend sweeps skipped")
            else:
                recovered = await app.leases.recover()
                await app.reconcile_lease_events()
                # Before the backends' own tasks start: their warm pools journal credentials
                # that belong to no call yet, and must not be taken for leftovers.
                await app.sweep_backend_leases()
            for tools in cfg.secrets.values():
                for refs in tools.values():
                    for ref in refs.values():
                        register = getattr(unwrap(backends[ref.backend]), "register", None)
                        if ref.kind == "dynamic" and ref.pool_size and register is not None:
                            register(ref)  # fill its warm pool now, not at the first call
            for backend in backends.values():
                runner = getattr(unwrap(backend), "run", None)
                if runner is not None:  # token renewal, warm pools
                    await nursery.start(runner)
                purger = getattr(backend, "run_purger", None)
                if purger is not None:  # drops expired cached values (backends.cache)
                    await nursery.start(purger)
            # Drops verified-token cache entries at their exp (sidekey.expiry).
            await nursery.start(app.oauth.run_purger)
            await nursery.start(
                functools.partial(app.retry_revocations, interval_s=cfg.leases.revocation_retry_s)
            )
            await nursery.start(app.leases.run)
            await nursery.start(app.sweep_call_records)
            await nursery.start(app.approvals.run_sweeper)
            await nursery.start(app.run_rejection_flusher)
            await nursery.start(app.watch_rotations)
            await nursery.start(app.approvals.run_webhook)
            if cfg.policy.registry_health_checks:
                await nursery.start(app.registry_health.run)
            if metrics_sock is not None:
                # Prometheus scrapes GET /metrics here (loopback only, checked at load).
                await nursery.start(app.serve_metrics_tcp, metrics_sock)
                log.info("metrics on http://%s/metrics", cfg.metrics.listen)
            await audit.emit(
                app.event(
                    "daemon.started",
                    extra={
                        "pid": os.getpid(),
                        "socket": str(path),
                        "config": str(loaded.path),
                        "leases_recovered": recovered,
                        # Start-up hardening (sidekey.hardening): modes it fixed, and
                        # whether an empty state database was replaced (--init).
                        **({"files_fixed": file_warnings} if file_warnings else {}),
                        **({"state_reinitialized": True} if reinitialized else {}),
                    },
                )
            )
            nursery.start_soon(_signals, server, app)

            async def closed() -> None:
                if inherited is None:
                    path.unlink(missing_ok=True)

            async with trio.open_nursery() as serving:
                await serving.start(
                    lambda task_status: server.serve(sock, on_closed=closed, task_status=task_status)
                )
                log.info("sidekey listening on %s (pid %d)", path, os.getpid())
                systemd.notify("READY=1")
                watchdog = systemd.watchdog_interval()
                if watchdog is not None:  # WatchdogSec= in the unit (sidekey.service)
                    nursery.start_soon(_watchdog, watchdog)
            # serve() has returned: the listener is closed and connections drained.
            systemd.notify("STOPPING=1")
            await app.close_rejection_windows()
            await audit.emit(app.event("daemon.stopped", extra={"pid": os.getpid()}))
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await app.oauth.aclose()
            await app.egress_aclose()
        await _close_all(backends, store, audit)
    return 0


async def _close_all(
    backends: dict[str, Backend], store: StateStore | None, audit: AuditLog | None
) -> None:
    with trio.CancelScope(shield=True):
        try:
            for b in backends.values():
                await b.aclose()
            if store is not None:
                await store.aclose()
        finally:
            # Whatever failed above, the audit writer still drains its queue and writes
            # its closing checkpoint.
            if audit is not None:
                await audit.aclose()


async def _watchdog(interval_s: float) -> None:
    """Feed systemd's watchdog every ``interval_s`` (half of WatchdogSec=) while the event
    loop runs. What it proves is that the loop still turns: a blocked loop (a hung
    synchronous call, a deadlock) stops the pings and systemd restarts the daemon
    (Restart=on-failure). It runs until the daemon stops (cancelled with the nursery)."""
    while True:
        systemd.notify("WATCHDOG=1")
        await trio.sleep(interval_s)


async def _signals(server: HttpServer, app: Sidekey) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                # logrotate: the audit file was moved away; continue the chain in a new one.
                await app.audit.reopen()
                try:
                    await app.reload(source="SIGHUP")
                except SidekeyError as exc:  # audit down: logged, the old config stays
                    log.error("config reload failed: %s", exc)
                continue
            log.info("received %s: stopping", signal.Signals(signum).name)
            server.stop()
            app.approvals.stop()
            return
