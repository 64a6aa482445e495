"""Redis state store: one Redis shared by every sidekey host.

Every check-and-update is one Lua script (``EVALSHA`` through redis-py's
``register_script``, which falls back to ``EVAL`` after a Redis restart), so it is
atomic across hosts: a jti burned on host A is refused on host B, and the per-user
limits are one aggregate for all hosts.

Why the sync client: the daemon runs on trio and ``redis.asyncio`` needs asyncio; the
trio clients found (redtrio, trio_redis) are small, alpha and unmaintained. So:

* The request path's operations (one command or one Lua script each: burn, lease
  insert/transition/read, quota batch, approvals, journal writes, rotation notices) go
  to **one I/O thread per store** through a queue. The thread takes everything queued
  (at most :data:`MAX_BATCH`), sends it as ONE pipeline (``transaction=False``, in
  queue order), and wakes each waiter with its own result or error through one
  ``run_sync_soon`` per batch. Concurrent requests share round trips (group
  pipelining) and pay one thread hand-off per batch, not one per operation. A Lua error
  fails only its own operation; a connection error fails the whole batch (each waiter
  gets :class:`StateUnavailable`, the connection is dropped and the next batch
  reconnects). After a Redis restart, scripts answering ``NOSCRIPT`` (they did not
  run) are loaded and sent again in one more round trip.
* Multi-step reads and maintenance (listing leases, purge, backend-lease bookkeeping)
  run as before: ``trio.to_thread.run_sync`` on a pooled connection behind a
  :class:`trio.CapacityLimiter`, so a long purge never holds up the request path.

Either way a caller waits at most ``timeout_s``: a Redis that stops answering costs it
``timeout_s`` and a :class:`StateUnavailable`, never a hang (the I/O thread's socket
timeout is also ``timeout_s``; an operation given up before it was sent is not sent).
redis-py does not retry: a retried script that did run once (an INCRBY, a GCRA step)
would count twice.

Keys (all under the configured prefix, e.g. ``sidekey:``)::

    jti:<jti>                 string, PXAT the token's expiry (+ leeway)
    rl:<key>                  GCRA theoretical arrival time, PX until it is reached
    ctr:<key>                 counter, PEXPIREAT expires_at
    sess:<user>               sorted set session_id -> idle expiry, PEXPIRE to the last
    lease:<lease_id>          hash (data, state, ended_at, expires_at), PEXPIREAT a safety
                              TTL of 2x the retention after expiry, end or now (the latest)
    leases:<state>            sorted set lease_id -> expires_at
    leases:ended              sorted set lease_id -> ended_at (for purge)
    leases:unaudited          sorted set lease_id -> ended_at: ended, end event not yet
                              known to be written (added by the transition script itself)
    bl:<json [backend, id]>   hash: a journaled backend lease
    bl:open / bl:revoked      sorted sets member -> issued_at / revoked_at
    bi:<json [backend, id]>   hash: an intent (prefix, at, deadline), PEXPIREAT at + retention
    bi:open                   sorted set intent member -> at
    apr:<approval_id>         hash (state, data = the Approval as JSON), PEXPIREAT its
                              expiry + APPROVAL_RETENTION_S
    aprs                      sorted set approval_id -> created_at (for listing)
    rotations                 stream of rotation notices (payload, at), MAXLEN ~10000

Clocks: ``now`` and ``expires_at`` are the caller's (wall clock, seconds); TTLs are
relative to them, so hosts sharing a Redis need synchronised clocks (NTP), as for the
tokens' ``exp``. Redis Cluster is not supported (the lease scripts touch several keys).

The password is never logged: it is not in the URL shown by :meth:`RedisStore.health`,
and it is scrubbed from any error message.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgspec
import redis
import trio
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from redis.retry import Retry

from . import (
    APPROVAL_RETENTION_S,
    GCRA_EPSILON_S,
    LEASE_STATES,
    MAX_APPROVALS_LISTED,
    MAX_NOTICES_READ,
    MAX_UNAUDITED_LISTED,
    BackendIntent,
    CounterOp,
    LeaseRecord,
    QuotaAnswer,
    QuotaOp,
    RateOp,
    StateUnavailable,
    check_quota_ops,
    check_rate_args,
    check_session_args,
)
from .records import MAX_APPROVAL_TTL_S, Approval, decode_approval, encode_approval
from .sqlite import LEASE_RETENTION_S, MAX_QUEUED_OPS, PURGE_CHUNK

log = logging.getLogger(__name__)

T = TypeVar("T")
_Arg = str | int | float | bytes  # a Lua script argument

DEFAULT_PREFIX = "sidekey:"
DEFAULT_TIMEOUT_S = 2.0
# Worker threads = pooled connections: enough for a busy host, bounded.
DEFAULT_MAX_CONNECTIONS = 16
# The I/O thread sends at most this many queued operations in one pipeline (bounds the
# request it writes and the replies it holds; the rest go in the next round trip).
MAX_BATCH = 256
# A burned jti is kept at least this long, even if its expiry is already past (Redis
# would drop a key whose PXAT is in the past at once, and the burn would not hold).
JTI_MIN_KEEP_S = 60.0
# Lease hashes carry a TTL this long after their expiry or end (twice the retention, at
# least this): a safety net so that nothing grows forever if purge never runs. purge()
# removes ended leases earlier.
LEASE_SAFETY_TTL_S = 2 * LEASE_RETENTION_S
# purge() works through at most this many chunks per sorted set per call.
MAX_PURGE_CHUNKS = 100
# Rotation notices kept in the stream (hosts read them within seconds).
MAX_NOTICES_KEPT = 10_000
_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")

_GCRA_LUA = """
-- KEYS[1] rate key; ARGV limit, period_s, now, cost, epsilon. Same arithmetic as
-- sidekey.store.gcra(). Returns {allowed, retry_after_s as a string}.
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local eps = tonumber(ARGV[5])
local stored = redis.call('GET', KEYS[1])
local base = now
if stored then
  local tat = tonumber(stored)
  if tat and tat >= now then base = tat end
end
local new_tat = base + cost * (period / limit)
local allow_at = new_tat - period
if allow_at - now > eps then
  return {0, string.format('%.17g', allow_at - now)}
end
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX',
           math.ceil((new_tat - now) * 1000) + 1)
return {1, '0'}
"""

_COUNTER_LUA = """
-- KEYS[1] counter; ARGV amount, expires_at in ms. The latest expiry wins.
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
local wanted = tonumber(ARGV[2])
local current = redis.call('PEXPIRETIME', KEYS[1])
if current < 0 or current < wanted then
  redis.call('PEXPIREAT', KEYS[1], wanted)
end
return value
"""

_SESSION_LUA = """
-- KEYS[1] the user's sessions; ARGV session_id, now, now + idle_s, max_sessions.
-- Returns {allowed, active_count}.
local now = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
local count = redis.call('ZCARD', KEYS[1])
if known then
  redis.call('ZADD', KEYS[1], 'GT', ARGV[3], ARGV[1])
else
  if count >= tonumber(ARGV[4]) then return {0, count} end
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  count = count + 1
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(last[2]) - now) * 1000) + 1)
return {1, count}
"""

_SESSION_END_LUA = """
-- KEYS[1] the user's sessions; ARGV session_id, now. Returns 1 if it was active.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(score) > tonumber(ARGV[2]) then return 1 end
return 0
"""

_QUOTA_LUA = """
-- A call's quota ops in order (the three scripts above, one round trip). KEYS one per
-- op; ARGV now, epsilon, then per op: 'r', limit, period_s | 'c', expires_at ms,
-- stop_above (-1: none) | 's', session_id, idle_s, max_sessions. Stops after the first
-- refusal. Returns one answer per op run: {allowed, retry} | value | {allowed, count}.
local now = tonumber(ARGV[1])
local eps = tonumber(ARGV[2])
local out = {}
local a = 3
for i = 1, #KEYS do
  local kind = ARGV[a]
  if kind == 'r' then
    local limit = tonumber(ARGV[a + 1])
    local period = tonumber(ARGV[a + 2])
    a = a + 3
    local stored = redis.call('GET', KEYS[i])
    local base = now
    if stored then
      local tat = tonumber(stored)
      if tat and tat >= now then base = tat end
    end
    local new_tat = base + period / limit
    local allow_at = new_tat - period
    if allow_at - now > eps then
      out[#out + 1] = {0, string.format('%.17g', allow_at - now)}
      return out
    end
    redis.call('SET', KEYS[i], string.format('%.17g', new_tat), 'PX',
               math.ceil((new_tat - now) * 1000) + 1)
    out[#out + 1] = {1, '0'}
  elseif kind == 'c' then
    local wanted = tonumber(ARGV[a + 1])
    local stop = tonumber(ARGV[a + 2])
    a = a + 3
    local value = redis.call('INCRBY', KEYS[i], 1)
    local current = redis.call('PEXPIRETIME', KEYS[i])
    if current < 0 or current < wanted then
      redis.call('PEXPIREAT', KEYS[i], wanted)
    end
    out[#out + 1] = value
    if stop >= 0 and value > stop then return out end
  else
    local sid = ARGV[a + 1]
    local idle = tonumber(ARGV[a + 2])
    local max = tonumber(ARGV[a + 3])
    a = a + 4
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[1])
    local known = redis.call('ZSCORE', KEYS[i], sid)
    local count = redis.call('ZCARD', KEYS[i])
    local until_s = string.format('%.17g', now + idle)
    if known then
      redis.call('ZADD', KEYS[i], 'GT', until_s, sid)
    else
      if count >= max then
        out[#out + 1] = {0, count}
        return out
      end
      redis.call('ZADD', KEYS[i], until_s, sid)
      count = count + 1
    end
    local last = redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')
    redis.call('PEXPIRE', KEYS[i], math.ceil((tonumber(last[2]) - now) * 1000) + 1)
    out[#out + 1] = {1, count}
  end
end
return out
"""

_PUT_LEASE_LUA = """
-- KEYS lease hash, leases:<state>, leases:ended
-- ARGV lease_id, data, state, ended_at or '', expires_at, safety expiry in ms
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'data', ARGV[2], 'state', ARGV[3], 'ended_at', ARGV[4],
           'expires_at', ARGV[5])
redis.call('PEXPIREAT', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
if ARGV[3] ~= 'active' and ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
end
return 1
"""

_TRANSITION_LUA = """
-- KEYS lease hash, leases:<from>, leases:<to>, leases:ended, leases:unaudited
-- ARGV lease_id, from, to, at, safety ttl in seconds, the caller's clock
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[2] then return 0 end
local expires_at = redis.call('HGET', KEYS[1], 'expires_at')
local at = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'ended_at', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], expires_at, ARGV[1])
if ARGV[3] == 'active' then
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
else
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
  redis.call('ZADD', KEYS[5], ARGV[4], ARGV[1])
end
local last = math.max(tonumber(expires_at), at, tonumber(ARGV[6]))
redis.call('PEXPIREAT', KEYS[1], math.floor((last + tonumber(ARGV[5])) * 1000))
return 1
"""

_END_HELD_LUA = """
-- release in one round trip: read the lease, check its holder, end it if active.
-- KEYS lease hash, leases:active, leases:<to>, leases:ended, leases:unaudited
-- ARGV lease_id, to, at, safety ttl in seconds, the caller's clock, holder uid and pid
-- ('' = anyone may end it). Returns {outcome} or {outcome, data, state, ended_at}:
-- 0 no such lease, 1 ended now (state, ended_at as before), 2 not the holder (nothing
-- changed), 3 not active (nothing changed). data is the _LeaseData JSON array: peer_pid
-- is its 10th element, peer_uid its 11th.
local f = redis.call('HMGET', KEYS[1], 'data', 'state', 'ended_at', 'expires_at')
if not f[1] then return {0} end
if ARGV[6] ~= '' then
  local d = cjson.decode(f[1])
  if d[11] ~= tonumber(ARGV[6]) or d[10] ~= tonumber(ARGV[7]) then
    return {2, f[1], f[2], f[3] or ''}
  end
end
if f[2] ~= 'active' then return {3, f[1], f[2], f[3] or ''} end
local at = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'ended_at', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], f[4], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
local last = math.max(tonumber(f[4]), at, tonumber(ARGV[5]))
redis.call('PEXPIREAT', KEYS[1], math.floor((last + tonumber(ARGV[4])) * 1000))
return {1, f[1], f[2], f[3] or ''}
"""

_PURGE_LEASE_LUA = """
-- KEYS lease hash, leases:ended, then every leases:<state>; ARGV lease_id, cutoff.
-- Deletes the lease if it is still ended before cutoff (or already gone).
local state = redis.call('HGET', KEYS[1], 'state')
if state then
  local ended = tonumber(redis.call('HGET', KEYS[1], 'ended_at'))
  if state == 'active' or not ended or ended >= tonumber(ARGV[2]) then
    redis.call('ZREM', KEYS[2], ARGV[1])
    return 0
  end
end
local n = redis.call('DEL', KEYS[1])
for i = 2, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return n
"""

_JOURNAL_LUA = """
-- KEYS item hash, bl:open[, intent hash, bi:open]; ARGV member, backend, id, issued_at,
-- expires_at[, intent member]. The credential is journaled and its intent resolved at once.
if #KEYS == 4 then
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[6])
end
if redis.call('HSETNX', KEYS[1], 'issued_at', ARGV[4]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'backend', ARGV[2], 'id', ARGV[3], 'expires_at', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return 1
"""

_INTENT_LUA = """
-- KEYS intent hash, bi:open; ARGV member, backend, id, prefix, at, deadline, expiry in ms
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'backend', ARGV[2], 'id', ARGV[3], 'prefix', ARGV[4],
           'at', ARGV[5], 'deadline', ARGV[6])
redis.call('PEXPIREAT', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
return 1
"""

_ATTACH_LUA = """
-- KEYS item hash; ARGV lease_id. A pair that was never journaled is ignored.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'lease_id', ARGV[1])
return 1
"""

_REVOKE_LUA = """
-- KEYS item hash, bl:open, bl:revoked; ARGV member, at, safety expiry in ms
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'revoked_at', ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""

_PUT_APPROVAL_LUA = """
-- KEYS apr hash, aprs; ARGV id, state, data, created_at, expiry in ms
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'data', ARGV[3])
redis.call('PEXPIREAT', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return 1
"""

_TRANSITION_APPROVAL_LUA = """
-- KEYS apr hash; ARGV from, to, data. Compare-and-set on state (the TTL stays).
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'data', ARGV[3])
return 1
"""

_PURGE_BACKEND_LUA = """
-- KEYS item hash, bl:revoked; ARGV member, cutoff
local revoked = tonumber(redis.call('HGET', KEYS[1], 'revoked_at'))
if revoked and revoked >= tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
"""


class _Op:
    """One request-path operation queued for the I/O thread: ``add`` appends its one
    command to a pipeline (again after a ``NOSCRIPT``); the thread sets ``result`` or
    ``error`` and the waiter's ``done`` is set on the trio thread."""

    __slots__ = ("abandoned", "add", "done", "error", "result", "script", "token")

    def __init__(self, add: Callable[[Pipeline], object], script: Script | None,
                 token: trio.lowlevel.TrioToken) -> None:
        self.add = add
        self.script = script  # loaded and the op sent again if Redis answers NOSCRIPT
        self.token = token
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        # Set by a waiter that gave up (deadline, cancellation): not sent if not yet sent.
        self.abandoned = False


def _wake(ops: list[_Op]) -> None:
    """On the trio thread: wake every waiter of a finished batch."""
    for op in ops:
        op.done.set()


class _LeaseData(msgspec.Struct, frozen=True, array_like=True):
    """The immutable part of a lease, as one JSON array in the hash's ``data`` field."""

    jti: str
    server: str
    tool: str
    user_id: str
    agent_id: str | None
    session_id: str | None
    secrets: tuple[str, ...]
    created_at: float
    expires_at: float
    peer_pid: int
    peer_uid: int


# _END_HELD_LUA's first answer.
_END_OUTCOMES = {0: "not_found", 1: "ended", 2: "not_holder", 3: "not_active"}

_lease_data_encoder = msgspec.json.Encoder()
_lease_data_decoder = msgspec.json.Decoder(_LeaseData)
_member_decoder = msgspec.json.Decoder(tuple[str, str])


def _num(value: float) -> str:
    """A float as the shortest string that reads back exactly (Lua's tonumber agrees)."""
    return repr(float(value))


def _ms(seconds: float) -> int:
    return math.ceil(seconds * 1000)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def redact_url(url: str) -> str:
    """``url`` without a password in its userinfo (``redis://user:***@host``)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<invalid url>"


class RedisStore:
    """:class:`~sidekey.store.StateStore` on a Redis server. Create with :meth:`open`."""

    def __init__(
        self,
        client: redis.Redis,
        pool: redis.BlockingConnectionPool,
        *,
        url: str,
        password: str | None,
        prefix: str,
        timeout_s: float,
        max_connections: int,
        clock: Callable[[], float],
        lease_retention_s: float = LEASE_RETENTION_S,
    ) -> None:
        if not (lease_retention_s >= 0 and math.isfinite(lease_retention_s)):
            raise ValueError("lease_retention_s must be a finite number of seconds >= 0")
        # Ended leases are purged this long after they ended (state.lease_retention_s).
        self.lease_retention_s = float(lease_retention_s)
        self._safety_ttl_s = max(LEASE_SAFETY_TTL_S, 2 * self.lease_retention_s)
        self._client: redis.Redis | None = client
        self._pool = pool
        self._url = redact_url(url)
        self._password = password
        self.prefix = prefix
        self._timeout_s = timeout_s
        self._limiter = trio.CapacityLimiter(max_connections)
        self._clock = clock
        self._healthy = True
        self._last_error: str | None = None
        # Operations that failed, by kind (failed, queue_full): metrics.
        self.error_counts: dict[str, int] = {"failed": 0, "queue_full": 0}
        self._purged = 0
        # The request path's I/O thread (started by the first operation) and its queue;
        # None in the queue tells the thread to finish what is queued and stop.
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._io_thread: threading.Thread | None = None
        self._io_conn: Any = None  # the I/O thread's own connection
        self.batches = 0  # pipelines sent by the I/O thread (for tests and benchmarks)
        self._gcra = client.register_script(_GCRA_LUA)
        self._counter = client.register_script(_COUNTER_LUA)
        self._session = client.register_script(_SESSION_LUA)
        self._session_end = client.register_script(_SESSION_END_LUA)
        self._quota = client.register_script(_QUOTA_LUA)
        self._put_lease = client.register_script(_PUT_LEASE_LUA)
        self._transition = client.register_script(_TRANSITION_LUA)
        self._end_held = client.register_script(_END_HELD_LUA)
        self._purge_lease = client.register_script(_PURGE_LEASE_LUA)
        self._journal = client.register_script(_JOURNAL_LUA)
        self._intent = client.register_script(_INTENT_LUA)
        self._attach = client.register_script(_ATTACH_LUA)
        self._revoke = client.register_script(_REVOKE_LUA)
        self._purge_backend = client.register_script(_PURGE_BACKEND_LUA)
        self._put_approval = client.register_script(_PUT_APPROVAL_LUA)
        self._transition_approval = client.register_script(_TRANSITION_APPROVAL_LUA)

    @classmethod
    def open(
        cls,
        url: str,
        *,
        password: str | None = None,
        ssl_ca_file: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        clock: Callable[[], float] = time.time,
        lease_retention_s: float = LEASE_RETENTION_S,
    ) -> RedisStore:
        """A store on ``url`` (``redis://``, ``rediss://`` for TLS, ``unix://``).

        No I/O happens here (connections open on first use; :meth:`ping` checks one).
        ``ssl_ca_file`` verifies a ``rediss://`` server. Raises StateUnavailable for a
        URL or option redis-py refuses, ValueError for a bad timeout or pool size.
        """
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError("timeout_s must be a positive number of seconds")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if not (lease_retention_s >= 0 and math.isfinite(lease_retention_s)):
            raise ValueError("lease_retention_s must be a finite number of seconds >= 0")
        kwargs: dict[str, Any] = {
            "max_connections": max_connections,
            "timeout": timeout_s,  # waiting for a free pooled connection
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 0),
        }
        if password is not None:
            kwargs["password"] = password
        if ssl_ca_file is not None:
            if not url.startswith("rediss://"):
                # redis-py would fail only at the first connection, with a TypeError.
                raise StateUnavailable(f"a TLS CA file needs a rediss:// URL, not {redact_url(url)}")
            kwargs["ssl_ca_certs"] = ssl_ca_file
        try:
            pool = redis.BlockingConnectionPool.from_url(url, **kwargs)
        except (ValueError, TypeError, redis.RedisError) as exc:
            # The message may quote the URL; never the password.
            raise StateUnavailable(
                f"cannot use Redis URL {redact_url(url)}: {type(exc).__name__}"
            ) from None
        client = redis.Redis(connection_pool=pool)
        return cls(
            client,
            pool,
            url=url,
            password=password,
            prefix=prefix,
            timeout_s=timeout_s,
            max_connections=max_connections,
            clock=clock,
            lease_retention_s=lease_retention_s,
        )

    # ------------------------------------------------------------------ the edge

    def _scrub(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def _failed(self, what: str, reason: str) -> StateUnavailable:
        reason = self._scrub(reason)
        self.error_counts["failed"] += 1
        self._healthy = False
        self._last_error = f"{what}: {reason}"
        log.error("state store %s failed: %s", what, reason)
        return StateUnavailable("state store unavailable")

    async def _run(self, what: str, fn: Callable[[redis.Redis], T]) -> T:
        """Run ``fn(client)`` in a worker thread, bounded by the timeout; translate errors."""
        client = self._client
        if client is None:
            raise StateUnavailable("state store is closed")
        try:
            # The deadline covers the wait for a thread (limiter) too.
            with trio.fail_after(self._timeout_s):
                result = await trio.to_thread.run_sync(
                    fn, client, limiter=self._limiter, abandon_on_cancel=True
                )
        except trio.TooSlowError:
            raise self._failed(what, f"no answer within {self._timeout_s:g} s") from None
        except (redis.RedisError, OSError) as exc:
            # `from None`: a chained redis-py traceback could carry connection details.
            raise self._failed(what, f"{type(exc).__name__}: {exc}") from None
        if not self._healthy:
            log.warning("state store works again")
            self._healthy = True
            self._last_error = None
        return result

    async def _pipelined(
        self, what: str, add: Callable[[Pipeline], object], script: Script | None = None
    ) -> Any:
        """Queue one command for the I/O thread and wait (at most the timeout) for its
        answer; translate errors like :meth:`_run`."""
        client = self._client
        if client is None:
            raise StateUnavailable("state store is closed")
        op = _Op(add, script, trio.lowlevel.current_trio_token())
        if self._io_thread is None:
            self._io_thread = threading.Thread(
                target=self._io_loop, args=(client,), name="sidekey-redis-io", daemon=True
            )
            self._io_thread.start()
        # A Redis that stops answering holds the thread for timeout_s per batch while
        # callers keep queuing (given-up operations stay queued until the thread skips
        # them): bounded like the SQLite writer's queue, failing closed beyond it.
        if self._queue.qsize() >= MAX_QUEUED_OPS:
            self._last_error = f"{what}: queue full ({MAX_QUEUED_OPS} operations)"
            self.error_counts["queue_full"] += 1
            log.error("state store queue full (%d operations); failing the call", MAX_QUEUED_OPS)
            raise StateUnavailable("state store queue is full")
        self._queue.put(op)
        try:
            with trio.move_on_after(self._timeout_s):
                await op.done.wait()
        finally:
            if not op.done.is_set():
                op.abandoned = True  # not sent if the thread has not taken it yet
        if not op.done.is_set():
            raise self._failed(what, f"no answer within {self._timeout_s:g} s")
        if op.error is not None:
            if isinstance(op.error, redis.TimeoutError):
                # The I/O thread's socket timeout (also timeout_s) beat the deadline above.
                raise self._failed(what, f"no answer within {self._timeout_s:g} s") from None
            if isinstance(op.error, (redis.RedisError, OSError)):
                raise self._failed(what, f"{type(op.error).__name__}: {op.error}") from None
            raise op.error
        if not self._healthy:
            log.warning("state store works again")
            self._healthy = True
            self._last_error = None
        return op.result

    async def _script_op(self, what: str, script: Script, keys: list[str], args: list[_Arg]) -> Any:
        """``script(keys, args)`` through the I/O thread (``EVALSHA``; ``NOSCRIPT``: loaded
        and sent again)."""
        return await self._pipelined(
            what, lambda p: p.evalsha(script.sha, len(keys), *keys, *args), script
        )

    def _io_loop(self, client: redis.Redis) -> None:
        """The I/O thread: take what is queued, send it as one pipeline, wake the waiters;
        until the None that :meth:`aclose` queues (what was queued before it is sent)."""
        # Its own connection (redis-py's pooled, per-command path costs about three times
        # the CPU of a packed write and a read per reply), opened on first use and again
        # after an error; a Pipeline only records each operation's command and options.
        pool = client.connection_pool
        conn = self._io_conn = pool.connection_class(**pool.connection_kwargs)
        recorder = client.pipeline(transaction=False)
        q = self._queue
        stop = False
        try:
            while not stop:
                first = q.get()
                if first is None:
                    break
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        nxt = q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    batch.append(nxt)
                live = [op for op in batch if not op.abandoned]
                if live:
                    try:
                        self._send(client, conn, recorder, live)
                    except BaseException as exc:  # every waiter must hear of it, whatever it is
                        for op in live:
                            op.error = exc
                by_token: dict[trio.lowlevel.TrioToken, list[_Op]] = {}
                for op in batch:
                    by_token.setdefault(op.token, []).append(op)
                for token, ops in by_token.items():
                    # A trio run that is over has nobody waiting.
                    with contextlib.suppress(trio.RunFinishedError):
                        token.run_sync_soon(_wake, ops)
        finally:
            conn.disconnect()

    @staticmethod
    def _exchange(client: redis.Redis, conn: Any, commands: list[tuple[Any, Any]]) -> list[Any]:
        """Write ``commands`` at once, read one reply each (redis-py's parsing and
        response callbacks). An error reply is that command's answer; a connection error
        drops the connection (the next exchange reconnects) and raises."""
        # A connection the server closed (a Redis restart) or with stray data is replaced
        # before it is used, as the pool does at checkout: one poll, no round trip.
        try:
            stale = conn.can_read(timeout=0)
        except redis.ConnectionError:
            stale = True
        if stale:
            conn.disconnect()
        parse: Callable[..., Any] = client.parse_response
        try:
            conn.send_packed_command(conn.pack_commands([args for args, _ in commands]),
                                     check_health=False)
            answers: list[Any] = []
            for args, options in commands:
                try:
                    answers.append(parse(conn, args[0], **options))
                except redis.ResponseError as exc:
                    answers.append(exc)
            return answers
        except BaseException:
            conn.disconnect()  # replies may be pending: never reuse the stream
            raise

    def _send(self, client: redis.Redis, conn: Any, recorder: Pipeline, ops: list[_Op]) -> None:
        """One pipeline for ``ops`` (queue order); each gets its own answer or error. A
        connection error raises (the caller fails every op)."""
        commands: list[tuple[Any, Any]] = []
        for op in ops:
            recorder.command_stack = []
            op.add(recorder)
            if len(recorder.command_stack) != 1:
                raise RuntimeError("a pipelined store operation must be exactly one command")
            commands.append(recorder.command_stack[0])
        recorder.command_stack = []
        answers = self._exchange(client, conn, commands)
        self.batches += 1
        again: list[_Op] = []
        for op, answer in zip(ops, answers, strict=True):
            if isinstance(answer, NoScriptError) and op.script is not None:
                again.append(op)  # the script did not run (Redis restarted): load, resend
            elif isinstance(answer, Exception):
                op.error = answer
            else:
                op.result = answer
        if not again:
            return
        scripts = {op.script.sha: op.script for op in again if op.script is not None}
        commands = [(("SCRIPT LOAD", script.script), {}) for script in scripts.values()]
        for op in again:
            recorder.command_stack = []
            op.add(recorder)
            commands.append(recorder.command_stack[0])
        recorder.command_stack = []
        answers = self._exchange(client, conn, commands)[len(scripts):]
        self.batches += 1
        for op, answer in zip(again, answers, strict=True):
            if isinstance(answer, Exception):
                op.error = answer
            else:
                op.result = answer

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    def _lease_key(self, lease_id: str) -> str:
        return self._key("lease", lease_id)

    def _state_key(self, state: str) -> str:
        return self._key("leases", state)

    def _bl_key(self, member: str) -> str:
        return self._key("bl", member)

    @staticmethod
    def _bl_member(backend: str, backend_lease_id: str) -> str:
        return msgspec.json.encode([backend, backend_lease_id]).decode()

    # ------------------------------------------------------------------ StateStore

    async def ping(self) -> None:
        """One round trip to Redis (readiness at start). Raises StateUnavailable."""
        await self._pipelined("ping", lambda p: p.ping())

    async def burn_jti(self, jti: str, expires_at: float) -> bool:
        """Atomically burn ``jti`` (``SET NX PXAT``): True if newly burned, False on a replay."""
        keep_until = max(float(expires_at), self._clock() + JTI_MIN_KEEP_S)
        key = self._key("jti", jti)
        pxat = _ms(keep_until)
        result = await self._pipelined("burn_jti", lambda p: p.set(key, b"1", nx=True, pxat=pxat))
        return bool(result)

    async def put_lease(self, rec: LeaseRecord) -> None:
        """Insert a new lease. A duplicate ``lease_id`` raises StateUnavailable (a local bug)."""
        if rec.state not in LEASE_STATES:
            raise ValueError(f"unknown lease state {rec.state!r}")
        data = _lease_data_encoder.encode(
            _LeaseData(
                jti=rec.jti,
                server=rec.server,
                tool=rec.tool,
                user_id=rec.user_id,
                agent_id=rec.agent_id,
                session_id=rec.session_id,
                secrets=tuple(rec.secrets),
                created_at=rec.created_at,
                expires_at=rec.expires_at,
                peer_pid=rec.peer_pid,
                peer_uid=rec.peer_uid,
            )
        )
        last = max(
            rec.expires_at,
            rec.ended_at if rec.ended_at is not None else rec.expires_at,
            self._clock(),
        )
        keys = [self._lease_key(rec.lease_id), self._state_key(rec.state), self._key("leases", "ended")]
        args: list[_Arg] = [
            rec.lease_id,
            data,
            rec.state,
            "" if rec.ended_at is None else _num(rec.ended_at),
            _num(rec.expires_at),
            _ms(last + self._safety_ttl_s),
        ]
        created = await self._script_op("put_lease", self._put_lease, keys, args)
        if not created:
            raise StateUnavailable(f"lease {rec.lease_id} already exists")

    async def transition_lease(
        self, lease_id: str, from_state: str, to_state: str, *, at: float
    ) -> bool:
        """Compare-and-set: move the lease to ``to_state`` (``ended_at = at``) if it is in ``from_state``."""
        if from_state not in LEASE_STATES or to_state not in LEASE_STATES:
            raise ValueError(f"unknown lease state {from_state!r} -> {to_state!r}")
        keys = [
            self._lease_key(lease_id),
            self._state_key(from_state),
            self._state_key(to_state),
            self._key("leases", "ended"),
            self._key("leases", "unaudited"),
        ]
        args: list[_Arg] = [
            lease_id,
            from_state,
            to_state,
            _num(at),
            _num(self._safety_ttl_s),
            _num(self._clock()),
        ]
        done = await self._script_op("transition_lease", self._transition, keys, args)
        return bool(done)

    async def end_lease_held(
        self, lease_id: str, to_state: str, *, at: float, holder: tuple[int, int] | None
    ) -> tuple[str, LeaseRecord | None]:
        """Release in one round trip (one Lua script): read the lease, check that
        ``holder`` (peer uid, pid; None: anyone) holds it, and move it from active to
        ``to_state`` (``ended_at = at``, marked unaudited, as :meth:`transition_lease`).

        Returns ``(outcome, lease as it was before)``: ``"ended"``, ``"not_holder"`` or
        ``"not_active"`` (nothing changed), or ``("not_found", None)``."""
        if to_state not in LEASE_STATES or to_state == "active":
            raise ValueError(f"cannot end a lease as {to_state!r}")
        keys = [
            self._lease_key(lease_id),
            self._state_key("active"),
            self._state_key(to_state),
            self._key("leases", "ended"),
            self._key("leases", "unaudited"),
        ]
        args: list[_Arg] = [
            lease_id,
            to_state,
            _num(at),
            _num(self._safety_ttl_s),
            _num(self._clock()),
            "" if holder is None else int(holder[0]),
            "" if holder is None else int(holder[1]),
        ]
        raw = await self._script_op("end_lease_held", self._end_held, keys, args)
        outcome = _END_OUTCOMES.get(int(raw[0]))
        if outcome is None:
            raise StateUnavailable(f"state store answered end_lease_held with {raw[0]!r}")
        if outcome == "not_found":
            return outcome, None
        rec = self._decode_lease(lease_id, {b"data": raw[1], b"state": raw[2], b"ended_at": raw[3]})
        return outcome, rec

    @staticmethod
    def _decode_lease(lease_id: str, fields: dict[Any, Any]) -> LeaseRecord | None:
        if not fields:
            return None
        data = _lease_data_decoder.decode(fields[b"data"])
        ended = fields.get(b"ended_at", b"")
        return LeaseRecord(
            lease_id=lease_id,
            jti=data.jti,
            server=data.server,
            tool=data.tool,
            user_id=data.user_id,
            agent_id=data.agent_id,
            session_id=data.session_id,
            secrets=tuple(data.secrets),
            created_at=data.created_at,
            expires_at=data.expires_at,
            state=fields[b"state"].decode(),
            ended_at=float(ended) if ended else None,
            peer_pid=data.peer_pid,
            peer_uid=data.peer_uid,
        )

    async def get_lease(self, lease_id: str) -> LeaseRecord | None:
        key = self._lease_key(lease_id)
        fields = await self._pipelined("get_lease", lambda p: p.hgetall(key))
        return self._decode_lease(lease_id, fields)

    async def leases_in_state(self, state: str) -> list[LeaseRecord]:
        """All leases in ``state``, soonest expiry first."""
        zkey = self._state_key(state)

        def read(c: redis.Redis) -> list[tuple[str, dict[Any, Any]]]:
            ids = [_text(i) for i in c.zrange(zkey, 0, -1)]
            pipe = c.pipeline(transaction=False)
            for lease_id in ids:
                pipe.hgetall(self._lease_key(lease_id))
            return list(zip(ids, pipe.execute(), strict=True))

        rows = await self._run("leases_in_state", read)
        out: list[LeaseRecord] = []
        for lease_id, fields in rows:
            rec = self._decode_lease(lease_id, fields)
            # A lease moved between the two reads is in its new state's set now.
            if rec is not None and rec.state == state:
                out.append(rec)
        return out

    async def mark_lease_audited(self, lease_id: str) -> None:
        key = self._key("leases", "unaudited")
        await self._pipelined("mark_lease_audited", lambda p: p.zrem(key, lease_id))

    async def leases_unaudited(self, *, limit: int = MAX_UNAUDITED_LISTED) -> list[LeaseRecord]:
        index = self._key("leases", "unaudited")
        count = max(0, int(limit))

        def read(c: redis.Redis) -> list[tuple[str, dict[Any, Any]]]:
            if count == 0:
                return []
            ids = [_text(i) for i in c.zrange(index, 0, count - 1)]
            pipe = c.pipeline(transaction=False)
            for lease_id in ids:
                pipe.hgetall(self._lease_key(lease_id))
            rows = list(zip(ids, pipe.execute(), strict=True))
            gone = [lease_id for lease_id, fields in rows if not fields]
            if gone:
                c.zrem(index, *gone)  # purged or expired by the safety TTL
            return rows

        out: list[LeaseRecord] = []
        for lease_id, fields in await self._run("leases_unaudited", read):
            rec = self._decode_lease(lease_id, fields)
            if rec is not None:
                out.append(rec)
        return out

    async def journal_backend_lease(
        self, backend: str, backend_lease_id: str, *, expires_at: float, at: float,
        intent_id: str | None = None,
    ) -> None:
        member = self._bl_member(backend, backend_lease_id)
        keys = [self._bl_key(member), self._key("bl", "open")]
        args: list[_Arg] = [member, backend, backend_lease_id, _num(at), _num(expires_at)]
        if intent_id is not None:
            intent = self._bl_member(backend, intent_id)
            keys += [self._key("bi", intent), self._key("bi", "open")]
            args.append(intent)
        await self._script_op("journal_backend_lease", self._journal, keys, args)

    async def journal_backend_intent(
        self, backend: str, intent_id: str, prefix: str, *, at: float, deadline: float
    ) -> None:
        member = self._bl_member(backend, intent_id)
        keys = [self._key("bi", member), self._key("bi", "open")]
        args: list[_Arg] = [member, backend, intent_id, prefix, _num(at), _num(deadline),
                            _ms(max(float(at), self._clock()) + LEASE_RETENTION_S)]
        await self._script_op("journal_backend_intent", self._intent, keys, args)

    async def backend_intent_done(self, backend: str, intent_id: str) -> None:
        member = self._bl_member(backend, intent_id)
        key, index = self._key("bi", member), self._key("bi", "open")

        def done(c: redis.Redis) -> None:
            pipe = c.pipeline(transaction=True)
            pipe.delete(key)
            pipe.zrem(index, member)
            pipe.execute()

        await self._run("backend_intent_done", done)

    async def open_backend_intents(self) -> list[BackendIntent]:
        index = self._key("bi", "open")

        def read(c: redis.Redis) -> list[tuple[str, list[bytes | None]]]:
            members = [_text(m) for m in c.zrange(index, 0, -1)]
            pipe = c.pipeline(transaction=False)
            for member in members:
                pipe.hmget(self._key("bi", member), ["backend", "id", "prefix", "at", "deadline"])
            rows = list(zip(members, pipe.execute(), strict=True))
            gone = [m for m, fields in rows if fields[0] is None]
            if gone:
                c.zrem(index, *gone)  # expired by their TTL
            return rows

        out: list[BackendIntent] = []
        for _, (backend, intent_id, prefix, at, deadline) in await self._run(
            "open_backend_intents", read
        ):
            if backend is None or intent_id is None or prefix is None or at is None or deadline is None:
                continue
            out.append(BackendIntent(backend.decode(), intent_id.decode(), prefix.decode(),
                                     float(at), float(deadline)))
        return out

    async def backend_leases_known(self, backend: str, backend_lease_ids: Sequence[str]) -> set[str]:
        ids = list(backend_lease_ids)

        def read(c: redis.Redis) -> list[int]:
            pipe = c.pipeline(transaction=False)
            for bl_id in ids:
                pipe.exists(self._bl_key(self._bl_member(backend, bl_id)))
            return list(pipe.execute())

        if not ids:
            return set()
        found = await self._run("backend_leases_known", read)
        return {bl_id for bl_id, n in zip(ids, found, strict=True) if n}

    async def attach_backend_leases(self, lease_id: str, items: Sequence[tuple[str, str]]) -> None:
        members = [self._bl_member(b, bl) for b, bl in items]

        def attach(c: redis.Redis) -> None:
            pipe = c.pipeline(transaction=True)
            for member in members:
                self._attach([self._bl_key(member)], [lease_id], client=pipe)
            pipe.execute()

        await self._run("attach_backend_leases", attach)

    async def backend_lease_revoked(self, backend: str, backend_lease_id: str, *, at: float) -> None:
        member = self._bl_member(backend, backend_lease_id)
        keys = [self._bl_key(member), self._key("bl", "open"), self._key("bl", "revoked")]
        args: list[_Arg] = [member, _num(at), _ms(max(float(at), self._clock()) + self._safety_ttl_s)]
        await self._script_op("backend_lease_revoked", self._revoke, keys, args)

    async def open_backend_leases(self, lease_id: str | None = None) -> list[tuple[str, str, str | None]]:
        open_key = self._key("bl", "open")

        def read(c: redis.Redis) -> list[list[bytes | None]]:
            members = [_text(m) for m in c.zrange(open_key, 0, -1)]
            pipe = c.pipeline(transaction=False)
            for member in members:
                pipe.hmget(self._bl_key(member), ["backend", "id", "lease_id", "revoked_at"])
            return list(pipe.execute())

        out: list[tuple[str, str, str | None]] = []
        for backend, bl_id, owner, revoked in await self._run("open_backend_leases", read):
            if backend is None or bl_id is None or revoked is not None:
                continue
            owner_s = None if owner is None else owner.decode()
            if lease_id is None or owner_s == lease_id:
                out.append((backend.decode(), bl_id.decode(), owner_s))
        return out

    async def rate_check(
        self, key: str, *, limit: int, period_s: float, now: float, cost: int = 1
    ) -> tuple[bool, float]:
        """GCRA under ``key`` (see :func:`sidekey.store.gcra`): ``(allowed, retry_after_s)``."""
        check_rate_args(limit, period_s, cost)
        keys = [self._key("rl", key)]
        args: list[_Arg] = [limit, _num(period_s), _num(now), cost, _num(GCRA_EPSILON_S)]
        allowed, retry = await self._script_op("rate_check", self._gcra, keys, args)
        return bool(allowed), float(_text(retry))

    async def counter_incr(self, key: str, *, amount: int = 1, expires_at: float) -> int:
        """Add ``amount`` to counter ``key``; return the new value (``INCRBY``, ``PEXPIREAT``)."""
        keys = [self._key("ctr", key)]
        args: list[_Arg] = [int(amount), _ms(expires_at)]
        value = await self._script_op("counter_incr", self._counter, keys, args)
        return int(value)

    async def session_touch(
        self, user: str, session_id: str, *, now: float, idle_s: float, max_sessions: int
    ) -> tuple[bool, int]:
        """Touch ``user``'s session: ``(allowed, active_count)``; see the protocol."""
        check_session_args(idle_s, max_sessions)
        keys = [self._key("sess", user)]
        args: list[_Arg] = [session_id, _num(now), _num(float(now) + float(idle_s)), max_sessions]
        allowed, count = await self._script_op("session_touch", self._session, keys, args)
        return bool(allowed), int(count)

    async def session_end(self, user: str, session_id: str, *, now: float) -> bool:
        """End ``user``'s session (``ZREM`` in one script, through the I/O thread): True
        if it was active; see the protocol."""
        keys = [self._key("sess", user)]
        ended = await self._script_op("session_end", self._session_end, keys,
                                      [session_id, _num(now)])
        return bool(ended)

    async def quota_apply(self, ops: Sequence[QuotaOp], *, now: float) -> list[QuotaAnswer]:
        """All of a call's quota ops in one Lua script: one round trip (see the protocol)."""
        check_quota_ops(ops)
        if not ops:
            return []
        keys: list[str] = []
        args: list[_Arg] = [_num(now), _num(GCRA_EPSILON_S)]
        for op in ops:
            if isinstance(op, RateOp):
                keys.append(self._key("rl", op.key))
                args += ["r", op.limit, _num(op.period_s)]
            elif isinstance(op, CounterOp):
                keys.append(self._key("ctr", op.key))
                args += ["c", _ms(op.expires_at), -1 if op.stop_above is None else op.stop_above]
            else:
                keys.append(self._key("sess", op.user))
                args += ["s", op.session_id, _num(op.idle_s), op.max_sessions]
        raw = await self._script_op("quota_apply", self._quota, keys, args)
        answers: list[QuotaAnswer] = []
        for op, item in zip(ops, raw, strict=False):
            if isinstance(op, RateOp):
                answers.append((bool(item[0]), float(_text(item[1]))))
            elif isinstance(op, CounterOp):
                answers.append(int(item))
            else:
                answers.append((bool(item[0]), int(item[1])))
        return answers

    async def note_rotation(self, payload: str, *, at: float) -> None:
        key = self._key("rotations", "all")
        at_s = _num(at)
        await self._pipelined("note_rotation", lambda p: p.xadd(
            key, {"payload": payload, "at": at_s}, maxlen=MAX_NOTICES_KEPT, approximate=True))

    async def rotation_cursor(self) -> str:
        key = self._key("rotations", "all")
        newest = await self._pipelined(
            "rotation_cursor", lambda p: p.xrevrange(key, "+", "-", count=1))
        return _text(newest[0][0]) if newest else "0-0"

    async def rotations_after(self, cursor: str) -> tuple[list[str], str]:
        if not _STREAM_ID.fullmatch(cursor):
            raise ValueError(f"not a rotation cursor: {cursor[:40]!r}")
        key = self._key("rotations", "all")
        entries = await self._pipelined(
            "rotations_after", lambda p: p.xrange(key, f"({cursor}", "+", count=MAX_NOTICES_READ))
        if not entries:
            return [], cursor
        payloads = [_text(fields[b"payload"]) for _, fields in entries if fields]
        return payloads, _text(entries[-1][0])

    async def put_approval(self, approval: Approval) -> None:
        """Store a new approval. A duplicate id raises StateUnavailable (a local bug)."""
        keys = [self._key("apr", approval.id), self._key("aprs", "all")]
        args: list[_Arg] = [
            approval.id,
            approval.state,
            encode_approval(approval),
            _num(approval.created_at.timestamp()),
            _ms(approval.expires_at.timestamp() + APPROVAL_RETENTION_S),
        ]
        created = await self._script_op("put_approval", self._put_approval, keys, args)
        if not created:
            raise StateUnavailable(f"approval {approval.id} already exists")

    async def get_approval(self, approval_id: str) -> Approval | None:
        key = self._key("apr", approval_id)
        data = await self._pipelined("get_approval", lambda p: p.hget(key, "data"))
        return None if data is None else decode_approval(data)

    async def transition_approval(self, approval: Approval, *, from_state: str) -> bool:
        """Compare-and-set on ``state``: store ``approval`` if the stored one is in ``from_state``."""
        keys = [self._key("apr", approval.id)]
        args: list[_Arg] = [from_state, approval.state, encode_approval(approval)]
        done = await self._script_op(
            "transition_approval", self._transition_approval, keys, args)
        return bool(done)

    async def list_approvals(
        self, states: Collection[str] | None = None, *, limit: int = MAX_APPROVALS_LISTED
    ) -> list[Approval]:
        """Approvals in ``states`` (all if None), oldest request first, at most ``limit``."""
        limit = max(0, min(int(limit), MAX_APPROVALS_LISTED))
        wanted = None if states is None else {s.encode() for s in states}
        index = self._key("aprs", "all")

        def read(c: redis.Redis) -> list[bytes]:
            out: list[bytes] = []
            gone: list[str] = []
            start = 0
            while len(out) < limit:
                ids = c.zrange(index, start, start + PURGE_CHUNK - 1)
                if not ids:
                    break
                start += len(ids)
                pipe = c.pipeline(transaction=False)
                for approval_id in ids:
                    pipe.hmget(self._key("apr", _text(approval_id)), "state", "data")
                for approval_id, (state, data) in zip(ids, pipe.execute(), strict=True):
                    if data is None:
                        gone.append(_text(approval_id))  # expired by its TTL: drop from the index
                    elif wanted is None or state in wanted:
                        out.append(data)
            if gone:
                c.zrem(index, *gone)
            return out[:limit]

        rows = await self._run("list_approvals", read)
        return [decode_approval(data) for data in rows]

    async def _purge_batch(
        self, what: str, zkey: str, cutoff: float, script: Script, keys_for: Callable[[str], list[str]]
    ) -> tuple[int, int]:
        """One chunk: members of ``zkey`` scored below ``cutoff``, each through ``script``.
        Returns (members seen, items deleted)."""

        def run(c: redis.Redis) -> tuple[int, int]:
            members = [
                _text(m)
                for m in c.zrangebyscore(zkey, "-inf", f"({_num(cutoff)}", start=0, num=PURGE_CHUNK)
            ]
            pipe = c.pipeline(transaction=False)
            for member in members:
                script(keys_for(member), [member, _num(cutoff)], client=pipe)
            return len(members), sum(int(n) for n in pipe.execute())

        return await self._run(what, run)

    async def purge(self, now: float) -> int:
        """Delete leases that ended more than ``lease_retention_s`` before ``now`` and
        backend leases revoked that long ago. jtis, rate, counter and session keys expire
        by their TTL. Returns the number of items deleted. Works in chunks."""
        cutoff = float(now) - self.lease_retention_s
        state_keys = [self._state_key(s) for s in sorted(LEASE_STATES)]
        ended_key = self._key("leases", "ended")
        revoked_key = self._key("bl", "revoked")
        unaudited_key = self._key("leases", "unaudited")

        def lease_keys(member: str) -> list[str]:
            return [self._lease_key(member), ended_key, *state_keys, unaudited_key]

        # (sorted set, cutoff, script, its keys, most chunks per call). Every member of
        # leases:ended and bl:revoked below the cutoff leaves its set, so those loops
        # progress; leases whose hash expired by its safety TTL (purge did not run for
        # days) leave their id in leases:<state>, dropped one chunk per call.
        stale_cutoff = float(now) - self._safety_ttl_s - self.lease_retention_s
        jobs: list[tuple[str, float, Script, Callable[[str], list[str]], int]] = [
            (ended_key, cutoff, self._purge_lease, lease_keys, MAX_PURGE_CHUNKS),
            (
                revoked_key,
                cutoff,
                self._purge_backend,
                lambda m: [self._bl_key(m), revoked_key],
                MAX_PURGE_CHUNKS,
            ),
        ]
        jobs += [(k, stale_cutoff, self._purge_lease, lease_keys, 1) for k in state_keys]
        # Approval hashes expire by their TTL; their index entries go once surely gone
        # (created more than the longest approval TTL + retention ago).
        index = self._key("aprs", "all")
        approvals_cutoff = float(now) - APPROVAL_RETENTION_S - MAX_APPROVAL_TTL_S
        total = int(await self._run(
            "purge", lambda c: c.zremrangebyscore(index, "-inf", f"({_num(approvals_cutoff)}")))
        for zkey, limit, script, keys_for, max_chunks in jobs:
            for _ in range(max_chunks):
                await trio.lowlevel.checkpoint()
                seen, deleted = await self._purge_batch("purge", zkey, limit, script, keys_for)
                total += deleted
                if seen < PURGE_CHUNK:
                    break
        self._purged += total
        return total

    def health(self) -> dict[str, Any]:
        return {
            "ok": self._healthy and self._client is not None,
            "backend": "redis",
            "url": self._url,
            "prefix": self.prefix,
            "purged": self._purged,
            "last_error": self._last_error,
        }

    async def aclose(self) -> None:
        """Stop taking operations, let the I/O thread send what is queued (bounded by the
        timeout), then close every pooled connection (in a worker thread: it may block on
        a socket)."""
        client, self._client = self._client, None
        if client is None:
            return
        pool = self._pool
        io_thread, self._io_thread = self._io_thread, None
        if io_thread is not None:
            self._queue.put(None)

        def close() -> None:
            if io_thread is not None:
                io_thread.join(self._timeout_s)
                if self._io_conn is not None:
                    self._io_conn.disconnect()  # a thread still stuck on it gets an error
            client.close()
            pool.disconnect()

        with trio.move_on_after(self._timeout_s):
            await trio.to_thread.run_sync(close, abandon_on_cancel=True)

    async def run_maintenance(
        self,
        *,
        interval: float = 5.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Forever: every ``interval`` seconds purge ended leases. Errors are logged and
        reflected in :meth:`health`; the loop keeps going."""
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError("interval must be a positive number of seconds")
        task_status.started()
        while True:
            await trio.sleep(interval)
            if self._client is None:
                return
            try:
                purged = await self.purge(self._clock())
            except StateUnavailable:
                continue  # already logged; health() shows it
            if purged:
                log.debug("purged %d expired state items", purged)


__all__ = ["RedisStore", "redact_url"]
