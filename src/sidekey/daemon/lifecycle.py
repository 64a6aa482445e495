"""The daemon's life outside any one request: config reload (restart-only checks, the
config's trust and signature), rotation watching, the backend-lease sweep and intent
resolution at start, revocation retries, lease expiry, lease-event reconciliation,
call-record sweeps and the rejection-window flusher.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
import trio

from ..backends import INTENT_GRACE_S, unwrap
from ..config import LoadedConfig, SecretRef, load_config
from ..leases import ACTIVE, REVOKED
from ..protocol import ConfigError, SidekeyError
from ..store import BackendIntent, LeaseRecord, StateUnavailable
from .context import BACKEND_TIMEOUT_S, ConfigTrust, Context, _iso, _oauth_specs, build_codec, log

# How often each host reads rotation notices (to drop its cached copies).
ROTATION_POLL_S = 1.0
# How often expired call records are dropped when no authorize comes to do it.
CALL_RECORD_SWEEP_S = 1.0
REVOCATION_RETRY_S = 60.0
# How often closed rejection-audit windows are summarised when their uid is quiet.
REJECTION_FLUSH_S = 1.0


class Lifecycle(Context):
    """Reload, start-up recovery and the background tasks (a mixin of
    :class:`~sidekey.daemon.app.Sidekey`)."""

    # ------------------------------------------------------------------ reload

    async def reload(self, *, source: str, peer: dict[str, Any] | None = None) -> tuple[bool, str | None]:
        """Load the config again and swap it in atomically, or keep the old one.

        Returns (applied, error). Every attempt writes a ``config.reloaded`` event with
        ``outcome`` applied or rejected. Leases in flight are not touched: they live
        in the state store and were granted under the policy of their time.
        """
        async with self._reload_lock:
            old = self.loaded
            try:
                new = await trio.to_thread.run_sync(load_config, old.path)
                trust = check_config_signature(new, running=self.trust)
                _check_restart_only(old, new)
                new_codec = build_codec(new, create=False)
            except (ConfigError, SidekeyError) as exc:
                error = str(exc)
                log.error("config reload (%s) rejected, keeping the running config: %s", source, error)
                await self.audit.emit(
                    self.event(
                        "config.reloaded",
                        peer=peer,
                        extra={"outcome": "rejected", "source": source, "reason": error,
                               "generation": self.generation},
                    )
                )
                return False, error
            self.loaded, self.cfg, self.codec, self.trust = new, new.config, new_codec, trust
            self._oauth_specs = _oauth_specs(new)
            self.generation += 1
            self.registry_health.update_config(new.config.registry)
            log.info("config reloaded (%s): generation %d", source, self.generation)
            await self.audit.emit(
                self.event(
                    "config.reloaded",
                    peer=peer,
                    extra={"outcome": "applied", "source": source, "generation": self.generation,
                           "files": [f.name for f in new.files]},
                )
            )
            return True, None

    # ------------------------------------------------------------------ rotation

    async def watch_rotations(
        self, *, interval_s: float = ROTATION_POLL_S,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Read the rotation notices other hosts (or this one) post to the state store
        and drop the cached copies of those secrets here, within ``interval_s``."""
        cursor: str | None
        try:
            cursor = await self.store.rotation_cursor()
        except StateUnavailable:
            cursor = None  # a degraded start (corrupt state database): read it once back
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            try:
                if cursor is None:
                    cursor = await self.store.rotation_cursor()
                    continue
                payloads, cursor = await self.store.rotations_after(cursor)
            except StateUnavailable:
                continue  # logged by the store; read on when it is back
            for payload in payloads:
                try:
                    ref = msgspec.json.decode(payload, type=SecretRef)
                except msgspec.DecodeError:  # not JSON, or not a SecretRef
                    log.warning("ignoring a malformed rotation notice")
                    continue
                invalidate = getattr(self.backends.get(ref.backend), "invalidate", None)
                if invalidate is not None:
                    dropped = invalidate(ref)
                    log.info('rotation notice for "%s" (%s): %d cached entries dropped',
                             ref.label, ref.backend, dropped)

    # ------------------------------------------------------------------ leases and dynamic secrets

    async def reconcile_lease_events(self) -> int:
        """At start: write ``lease.recovered`` for every lease that ended without its end
        event being known to be written (a crash between the two), and mark it. A crash
        during this repeats the event at the next start (at least once, never lost).
        Returns how many. Raises AuditUnavailable / StateUnavailable (start fails)."""
        count = 0
        seen: set[str] = set()  # a mark that failed to stick must not loop forever
        while batch := [r for r in await self.leases.unaudited() if r.lease_id not in seen]:
            # One fsync per batch: the events are queued and the last one commits them
            # all (a sink commits queued events before a later durable one); only then
            # are the leases marked.
            for i, rec in enumerate(batch):
                seen.add(rec.lease_id)
                await self.audit.emit(self.event(
                    "lease.recovered", server=rec.server, tool=rec.tool, user_id=rec.user_id,
                    agent_id=rec.agent_id, session_id=rec.session_id, lease_id=rec.lease_id,
                    peer={"pid": rec.peer_pid, "uid": rec.peer_uid},
                    extra={"state": rec.state,
                           "ended_at": None if rec.ended_at is None else _iso(rec.ended_at),
                           "reason": "the daemon stopped between the lease's end and its "
                                     "audit event; the call's outcome is unknown"},
                ), durable=i == len(batch) - 1)
            for rec in batch:
                await self.leases.audited(rec.lease_id)
                count += 1
        if count:
            log.warning("wrote lease.recovered for %d leases that ended just before a crash", count)
        return count

    async def sweep_backend_leases(self) -> int:
        """At start: revoke every journaled dynamic credential still open. After a crash
        nobody can say whether the call that held it is still running, so the
        conservative answer holds: the credential dies, and its tool call's lease (if it
        is still active) is revoked with it. Returns how many credentials were revoked.
        Credentials Vault issued that never reached the journal are found through their
        intents (:meth:`resolve_backend_intents`; those still within their grace are
        resolved by :meth:`retry_revocations` a little later)."""
        orphans = await self.resolve_backend_intents()
        open_items = await self.store.open_backend_leases()
        if not open_items:
            return orphans
        log.info("revoking %d dynamic credentials left from before the restart", len(open_items))
        await self._revoke_backend_leases([(b, bl) for b, bl, _ in open_items])
        for lease_id in {lid for _, _, lid in open_items if lid is not None}:
            rec = await self.store.get_lease(lease_id)
            if rec is None or rec.state != ACTIVE:
                continue
            try:
                await self.leases.end(rec, REVOKED)
            except SidekeyError:
                continue
            await self.audit.emit(self.event(
                "lease.revoked", server=rec.server, tool=rec.tool, user_id=rec.user_id,
                agent_id=rec.agent_id, session_id=rec.session_id, lease_id=rec.lease_id,
                extra={"reason": "daemon restarted: its dynamic credentials were revoked"},
            ))
            await self.leases.audited(rec.lease_id)
        return orphans + len(open_items)

    async def resolve_backend_intents(self) -> int:
        """Resolve every journaled intent whose deadline passed more than
        :data:`~sidekey.backends.INTENT_GRACE_S` ago (its call crashed or failed before
        its credential, if any, was journaled): the backend revokes what it issued under
        the intent's prefix in the intent's window that nobody journaled. Intents of one
        prefix share one listing. An intent whose backend fails stays open (next round).
        Never raises for a backend or store outage. Returns how many credentials were
        revoked."""
        try:
            intents = await self.store.open_backend_intents()
        except SidekeyError as exc:
            log.warning("intent sweep skipped: %s", exc)
            return 0
        now = self.clock()
        groups: dict[tuple[str, str], list[BackendIntent]] = {}
        for intent in intents:
            if now >= intent.deadline + INTENT_GRACE_S:
                groups.setdefault((intent.backend, intent.prefix), []).append(intent)
        revoked = 0
        for (name, prefix), group in groups.items():
            backend = self.backends.get(name)
            sweep = getattr(unwrap(backend), "sweep_orphans", None) if backend else None
            if sweep is None:
                log.error("%d open intents for backend %r, which is not configured (or cannot "
                          "sweep): credentials under %s may live until their TTL",
                          len(group), name, prefix)
                continue
            try:
                with trio.fail_after(BACKEND_TIMEOUT_S):
                    revoked += await sweep(
                        prefix, [(i.at, i.deadline) for i in group],
                        functools.partial(self.store.backend_leases_known, name))
                for intent in group:
                    await self.store.backend_intent_done(intent.backend, intent.intent_id)
            except (SidekeyError, trio.TooSlowError) as exc:
                log.warning("cannot resolve %d intents under %s in backend %r yet: %s",
                            len(group), prefix, name, exc)
        return revoked

    async def retry_revocations(
        self, *, interval_s: float = REVOCATION_RETRY_S,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Forever: retry revoking dynamic credentials whose tool call is over but whose
        revocation failed (backend down at the time). Pool credentials (no call yet)
        are the backend's own business and are skipped."""
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            try:
                active = {rec.lease_id for rec in await self.store.leases_in_state(ACTIVE)}
                stale = [(b, bl) for b, bl, lid in await self.store.open_backend_leases()
                         if lid is not None and lid not in active]
            except SidekeyError as exc:
                log.warning("revocation retry skipped: %s", exc)
                continue
            if stale:
                log.info("retrying the revocation of %d dynamic credentials", len(stale))
                await self._revoke_backend_leases(stale)
            await self.resolve_backend_intents()

    async def _lease_expired(self, rec: LeaseRecord) -> None:
        self._calls.pop(rec.lease_id, None)
        await self._end_lease_backends(rec.lease_id)
        await self.audit.emit(
            self.event(
                "lease.expired",
                server=rec.server,
                tool=rec.tool,
                user_id=rec.user_id,
                agent_id=rec.agent_id,
                session_id=rec.session_id,
                lease_id=rec.lease_id,
                peer={"pid": rec.peer_pid, "uid": rec.peer_uid},
                extra={"expires_at": _iso(rec.expires_at), **self.egress_audit(rec.lease_id)},
            )
        )

    async def sweep_call_records(
        self, *, interval_s: float = CALL_RECORD_SWEEP_S,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Forever: drop call records past their expiry (tokens never redeemed, leases
        that ended without a release) when no authorize comes along to do it."""
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            self._calls.sweep(self.clock())
            self._subjects.sweep(self.clock())  # user tokens held for two-step redeems

    # ------------------------------------------------------------------ rejection windows

    async def run_rejection_flusher(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Summarise rejection windows that closed while their uid stayed quiet."""
        task_status.started()
        while True:
            await trio.sleep(REJECTION_FLUSH_S)
            self.rejections.expire(self.clock())
            try:
                await self._emit_suppressed()
            except SidekeyError as exc:
                log.warning("cannot write request.rejected.suppressed: %s", exc)

    async def close_rejection_windows(self) -> None:
        """At shutdown: write the counts of every open window (none is lost)."""
        self.rejections.close_all(self.clock())
        try:
            await self._emit_suppressed()
        except SidekeyError as exc:
            log.warning("cannot write request.rejected.suppressed at shutdown: %s", exc)


def _check_restart_only(old: LoadedConfig, new: LoadedConfig) -> None:
    """Refuse a reload that changes what only a restart can apply."""
    a, b = old.config, new.config
    changed = [
        name
        for name, x, y in (
            ("listen", a.listen, b.listen),
            ("log", a.log, b.log),  # the handler is set up before the daemon starts
            # The loopback TCP listener is bound once, at start.
            ("metrics.listen", a.metrics.listen, b.metrics.listen),
            ("state", a.state, b.state),
            ("backends", a.backends, b.backends),
            ("tokens.issuer", a.tokens.issuer, b.tokens.issuer),
            ("tokens.keyset", a.tokens.keyset, b.tokens.keyset),
            ("audit.path", a.audit.path, b.audit.path),
            ("audit.fsync", a.audit.fsync, b.audit.fsync),
            ("audit.sinks", a.audit.sinks, b.audit.sinks),
            # Keys and checkpoint cadence are read when the audit file is opened.
            ("audit.checkpoint_key_file", a.audit.checkpoint_key_file, b.audit.checkpoint_key_file),
            ("audit.checkpoint_key_credential", a.audit.checkpoint_key_credential,
             b.audit.checkpoint_key_credential),
            ("audit.checkpoint_every_events", a.audit.checkpoint_every_events,
             b.audit.checkpoint_every_events),
            ("audit.checkpoint_every_s", a.audit.checkpoint_every_s, b.audit.checkpoint_every_s),
            ("audit.hmac_key_file", a.audit.hmac_key_file, b.audit.hmac_key_file),
            ("audit.hmac_key_credential", a.audit.hmac_key_credential, b.audit.hmac_key_credential),
            ("policy.registry_health_checks", a.policy.registry_health_checks,
             b.policy.registry_health_checks),
        )
        if x != y
    ]
    if changed:
        raise ConfigError(
            f"{new.path.name}: changes {', '.join(changed)}, which only a restart applies; "
            "nothing was reloaded"
        )


def check_config_signature(new: LoadedConfig, *, running: ConfigTrust | None) -> ConfigTrust | None:
    """Verify the detached signature of ``new`` when the running config (on reload) or
    ``new`` itself requires one. On reload the running config's cached keys decide, so
    a new config can neither switch the check off nor bring its own keys; an older
    signature than the running one's (a rollback) is refused. Returns what the new
    config will require of its successor. Raises :class:`ConfigError`."""
    from ..signing import trusted_keys, verify_config_details

    wants = new.config.config_signing.require_signed_config
    if running is None and not wants:
        return None
    keys = running.keys if running is not None else trusted_keys(new)
    if not keys:
        raise ConfigError(
            f"{new.path.name}: $.config_signing.trusted_keys: require_signed_config needs at "
            "least one trusted key"
        )
    verified = verify_config_details(new, keys, contents=new.contents)
    if running is not None and running.signed_at and verified.signed_at < running.signed_at:
        raise ConfigError(
            f"{new.path.name}.sig: signed at {verified.signed_at}, before the running config "
            f"({running.signed_at}); refusing a rollback"
        )
    log.info("config signature ok (key %s, signed at %s)", verified.kid, verified.signed_at)
    if not wants:
        return None
    return ConfigTrust(keys=trusted_keys(new), signed_at=verified.signed_at)
