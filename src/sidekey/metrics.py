"""Prometheus metrics: the definitions, and the small facade the daemon calls.

One :class:`Metrics` per daemon, on its own :class:`~prometheus_client.CollectorRegistry`
(never the library's global one: tests run several daemons in one process, and a reload
must not register anything twice: the facade lives as long as the daemon, a reload only
changes which label values it accepts).

Two kinds of metrics:

* **Counted where they happen** (the hooks): requests, decisions, quota refusals,
  latencies. A hook is a dict lookup and one or two locked increments (about 1-2 us):
  the call path pays a few microseconds per governed call.
* **Read at scrape time** (:class:`Snapshot`): active leases, pending approvals, cache
  hits and misses, state-store health and errors, audit sinks. Counts the daemon keeps
  anyway; the daemon gathers them (bounded work, see ``daemon/scrape.py``) and
  :meth:`Metrics.render` turns them into samples.

Label values are bounded: ``server`` and ``tool`` only take names the running config
declares (anything else is ``_other``), ``code`` only the codes of :data:`CODES`
(anything else is ``_other``), ``endpoint`` only the route templates the daemon
passes in (an unknown path is ``_other``). Whatever a caller sends, the number of
series stays a function of the config. No value of a secret, token, user id, session
id or argument is ever a label.

Pure: no trio, no I/O, no clock of its own (durations are measured by the caller).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .config import Config

# The Prometheus text format, version 0.0.4 (what every Prometheus server reads).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "_other"  # the label value of anything outside the bounded set
NONE = ""  # server/tool of a request that names no call (health, status...)

# Every error code sidekey answers with (plus "ok" and "pending_approval" for the
# non-error outcomes). A code not listed here is counted as "_other": a new code is
# added here when it is introduced (tests/test_metrics.py checks the source for
# code="..." literals that are missing).
CODES: frozenset[str] = frozenset({
    "ok", "pending_approval",
    # protocol's error classes
    "bad_request", "token_invalid", "denied", "not_found", "conflict", "body_too_large",
    "unavailable", "method_not_allowed", "request_timeout", "unprocessable", "rate_limited",
    "headers_too_large", "internal", "not_implemented",
    # transport and request shape
    "bad_http", "invalid_json", "invalid_request", "json_too_deep", "bad_arguments",
    "arguments_too_large", "too_many_connections", "protocol_error", "timeout",
    "connection_failed",
    # peers
    "peer_rejected", "peer_mismatch", "peer_gone", "peer_changed", "peer_unattested",
    "daemon_identity",
    # policy and registry
    "server_unknown", "server_not_registered", "server_deprecated", "server_retired",
    "version_mismatch", "server_required", "tool_unknown", "scope_missing",
    "query_param_invalid", "query_param_unknown",
    # per-user downstream tokens (oauth backend)
    "token_exchange_denied", "token_endpoint_refused", "token_endpoint_unavailable",
    "token_endpoint_bad_response", "subject_token_required", "subject_token_unavailable",
    "bad_gateway",
    "agent_unbound", "agent_mismatch", "agent_missing", "agent_unknown",
    "agent_denied_server", "agent_not_granted", "overloaded",
    # user tokens and resolution tokens
    "token_missing", "token_malformed", "token_expired", "token_not_yet_valid",
    "token_bad_signature", "token_claims_invalid", "token_forbidden_header",
    "token_ttl_too_long", "token_unknown_key", "token_untrusted_issuer",
    "token_wrong_algorithm", "token_wrong_type", "token_too_large", "token_replayed",
    "issuer_mismatch", "audience_mismatch", "jwks_unavailable", "arguments_mismatch",
    # approvals
    "approval_conflict", "approval_denied", "approval_mismatch", "approval_not_due",
    "approval_not_found", "approval_pending", "approval_approved", "approval_expired",
    "approval_redeemed", "approval_self_approval", "reason_required",
    # leases
    "lease_not_found", "lease_conflict", "bad_lease_id", "lease_active", "lease_released",
    "lease_expired", "lease_revoked",
    # secrets and backends
    "backend_unavailable", "secret_not_found", "secret_unknown", "secret_deleted",
    "secret_empty", "secret_exists", "secret_key_not_found", "secret_too_large",
    "secret_version_not_found", "invalid_secret_name", "rotate_unsupported",
    "secret_input_unreadable",
    # state, audit, config
    "state_unavailable", "state_corrupt", "state_db_empty", "state_schema_too_new",
    "store_too_large", "audit_unavailable", "config_rejected",
    # files and keys (start-up refusals; listed so they are never _other)
    "dir_unsafe", "file_owner_unsafe", "key_file_unsafe", "socket_dir_unsafe", "unsafe_path",
    # egress with injection (sidekey.daemon.egress)
    "gateway_timeout", "egress_bad_target", "egress_not_allowed",
    "egress_request_too_large", "egress_request_limit", "egress_concurrency_limit",
    "egress_upstream_unavailable", "egress_upstream_timeout", "egress_tls_failed",
    "egress_response_too_large", "egress_lease_ended", "egress_ca_file_unreadable",
})

# Quota limits as a fixed set: the config's per-tool and per-department limits are
# named after the tool or department (``per_tool.<tool>.requests_per_minute``); the
# metric names the kind of limit, the decision counter names the tool.
QUOTA_LIMITS: frozenset[str] = frozenset({
    "per_user.concurrent_sessions", "per_user.requests_per_minute",
    "per_user.requests_per_hour", "per_tool.requests_per_minute",
    "per_department.monthly_tool_calls", "in_flight_cap",
    "approvals.max_pending_per_user",
})

DECISIONS: frozenset[str] = frozenset({"allow", "deny", "pending_approval"})

# Seconds. A request may be a long-poll (approval wait, up to approvals.max_wait_seconds):
# those land in the top buckets.
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)
# A fetch is a cache hit (microseconds), the local store (a file read), or Vault/AWS
# (milliseconds to the 20 s backend timeout).
FETCH_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                 1.0, 2.5, 5.0, 10.0, 20.0)
# One audit batch: write + fsync (a fast disk: ~0.1-1 ms).
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, 2.5)


def quota_limit_kind(limit: str) -> str:
    """The fixed-set name of a quota limit: ``per_tool.create_article.requests_per_minute``
    is ``per_tool.requests_per_minute``; an unknown one is ``_other``."""
    head, _, rest = limit.partition(".")
    if head in ("per_tool", "per_department"):
        limit = f"{head}.{rest.rpartition('.')[2]}"
    return limit if limit in QUOTA_LIMITS else OTHER


def bounded_code(code: str | None) -> str:
    """``code`` if it is one of :data:`CODES`, else ``_other`` (None is ``ok``)."""
    if code is None:
        return "ok"
    return code if code in CODES else OTHER


# --------------------------------------------------------------------------- scrape-time facts


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A caching backend's counts (``backends.cache``)."""

    backend: str
    hits: int
    misses: int
    entries: int


@dataclass(frozen=True, slots=True)
class SinkStats:
    """One audit sink as its health reports it: ``lines_behind`` committed (or queued)
    lines it has not delivered yet; ``spool_bytes`` the bytes they take (in the
    forwarder's queue, or in the audit file for a webhook sink, whose spool is the file)."""

    sink: str
    type: str
    up: bool
    lines_behind: int
    spool_bytes: int
    dropped: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the daemon knows at scrape time (gathered by the daemon, bounded work)."""

    leases_active: int
    approvals_pending: int | None  # None: the state store could not say
    approvals_waiting: int
    connections: int
    in_flight: int
    config_generation: int
    store: str
    store_up: bool
    store_errors: Mapping[str, int] = field(default_factory=dict)
    caches: Sequence[CacheStats] = ()
    sinks: Sequence[SinkStats] = ()


class _SnapshotCollector(Collector):
    """Yields the samples of the snapshot :meth:`Metrics.render` was given."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def collect(self) -> Iterable[Metric]:
        s = self.snapshot
        if s is None:
            return
        yield from _gauges(s)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _gauges(s: Snapshot) -> Iterator[Metric]:
    yield _gauge("sidekey_leases_active", "Leases this daemon holds active (secrets handed out "
                 "for a tool call that has not ended).", s.leases_active)
    if s.approvals_pending is not None:
        # Fleet-wide with the Redis store; at most store.MAX_APPROVALS_LISTED are counted.
        yield _gauge("sidekey_approvals_pending", "Held calls waiting for an approver's "
                     "verdict (as the state store lists them).", s.approvals_pending)
    yield _gauge("sidekey_approvals_waiting", "Long-polls waiting for an approval verdict.",
                 s.approvals_waiting)
    yield _gauge("sidekey_connections", "Open connections on the daemon's socket.",
                 s.connections)
    yield _gauge("sidekey_requests_in_flight", "Requests being answered.", s.in_flight)
    yield _gauge("sidekey_config_generation", "Config generation (bumped by every applied "
                 "reload).", s.config_generation)
    up = GaugeMetricFamily("sidekey_state_store_up", "1 while the state store answers, "
                           "else 0 (calls fail closed).", labels=["store"])
    up.add_metric([s.store], 1.0 if s.store_up else 0.0)
    yield up
    errors = CounterMetricFamily("sidekey_state_store_errors", "State store operations that "
                                 "failed, by kind (failed, corrupt, queue_full).",
                                 labels=["store", "kind"])
    for kind, count in sorted(s.store_errors.items()):
        errors.add_metric([s.store, kind], count)
    yield errors
    hits = CounterMetricFamily("sidekey_backend_cache_hits", "Secret fetches answered from "
                               "the backend's value cache.", labels=["backend"])
    misses = CounterMetricFamily("sidekey_backend_cache_misses", "Secret fetches of cacheable "
                                 "secrets that waited for the backend.", labels=["backend"])
    entries = GaugeMetricFamily("sidekey_backend_cache_entries", "Values in the backend's "
                                "cache.", labels=["backend"])
    for c in s.caches:
        hits.add_metric([c.backend], c.hits)
        misses.add_metric([c.backend], c.misses)
        entries.add_metric([c.backend], c.entries)
    yield from (hits, misses, entries)
    sink_up = GaugeMetricFamily("sidekey_audit_sink_up", "1 while the audit sink records or "
                                "delivers, else 0.", labels=["sink", "type"])
    behind = GaugeMetricFamily("sidekey_audit_sink_lines_behind", "Audit lines committed to "
                               "the file and not yet delivered by the sink (for the file: "
                               "queued, not yet committed).", labels=["sink", "type"])
    spool = GaugeMetricFamily("sidekey_audit_sink_spool_bytes", "Bytes of the lines the sink "
                              "has yet to deliver (spool depth).", labels=["sink", "type"])
    dropped = CounterMetricFamily("sidekey_audit_sink_dropped", "Audit lines a forwarding "
                                  "sink dropped (queue or spool full).", labels=["sink", "type"])
    for k in s.sinks:
        labels = [k.sink, k.type]
        sink_up.add_metric(labels, 1.0 if k.up else 0.0)
        behind.add_metric(labels, k.lines_behind)
        spool.add_metric(labels, k.spool_bytes)
        dropped.add_metric(labels, k.dropped)
    yield from (sink_up, behind, spool, dropped)


# --------------------------------------------------------------------------- the facade


class _Bounds:
    """Which server and tool names may be label values (from one config)."""

    __slots__ = ("backends", "config", "tools")

    def __init__(self, config: Config) -> None:
        self.config = config
        self.tools: dict[str, frozenset[str]] = {
            name: frozenset(spec.tool_scopes) for name, spec in config.servers.items()}
        self.backends = frozenset(config.backends)

    def call(self, server: str, tool: str) -> tuple[str, str]:
        tools = self.tools.get(server)
        if tools is None:
            return OTHER, OTHER
        return server, tool if tool in tools else OTHER


class Metrics:
    """The daemon's metrics. ``config`` returns the running config (read per hook, so a
    reload changes the accepted server and tool names without re-registering)."""

    def __init__(self, config: Callable[[], Config]) -> None:
        # The _created series double every counter's output and say nothing a scraper
        # needs (process-wide switch: this module is imported by the daemon only).
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self._config = config
        self._bounds = _Bounds(config())
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self._requests = Counter(
            "sidekey_requests", "Requests answered, by endpoint (route template), the server "
            "and tool the request is about (empty for none), and the outcome's code (ok, "
            "pending_approval, or the error code).",
            ["endpoint", "server", "tool", "code"], registry=r)
        self._request_seconds = Histogram(
            "sidekey_request_duration_seconds", "Time to answer a request (from parsed to "
            "response ready), by endpoint.", ["endpoint"], buckets=REQUEST_BUCKETS, registry=r)
        self._decisions = Counter(
            "sidekey_decisions", "Authorization verdicts of governed calls (policy, quotas, "
            "approvals): decision allow, deny or pending_approval, and its code.",
            ["server", "tool", "decision", "code"], registry=r)
        self._quota_refusals = Counter(
            "sidekey_quota_refusals", "Calls refused by a quota (rate_limited) or by load "
            "shedding (overloaded), by the kind of limit that fired.", ["limit"], registry=r)
        self._refusals = Counter(
            "sidekey_transport_refusals", "Connections or requests the listener refused "
            "before any endpoint saw them (malformed HTTP, too large, too slow, connection "
            "caps, unattestable peers), by code.", ["code"], registry=r)
        self._fetch_seconds = Histogram(
            "sidekey_backend_fetch_duration_seconds", "Time to fetch one secret for a lease "
            "(a cache hit included), by backend and outcome (ok, error).",
            ["backend", "outcome"], buckets=FETCH_BUCKETS, registry=r)
        self._commit_seconds = Histogram(
            "sidekey_audit_commit_duration_seconds", "Time to commit one batch of audit "
            "events to the audit file (write + fsync).", buckets=COMMIT_BUCKETS, registry=r)
        # Label children cached by their values: labels() validates and locks on every
        # call, a dict lookup does not (this runs on the call path).
        self._request_children: dict[tuple[str, str, str, str], Any] = {}
        self._endpoint_children: dict[str, Any] = {}
        self._decision_children: dict[tuple[str, str, str, str], Any] = {}
        self._fetch_children: dict[tuple[str, bool], Any] = {}
        self._commit = self._commit_seconds  # no labels: the histogram itself
        self._snapshot = _SnapshotCollector()
        r.register(self._snapshot)
        # The daemon process: process_cpu_seconds_total, process_resident_memory_bytes,
        # process_open_fds... (read from /proc/self at scrape time; the usual names).
        prometheus_client.ProcessCollector(registry=r)

    def _current(self) -> _Bounds:
        config = self._config()
        bounds = self._bounds
        if bounds.config is not config:
            bounds = self._bounds = _Bounds(config)
        return bounds

    # ------------------------------------------------------------------ hooks

    def request(self, endpoint: str, call: tuple[str, str] | None, code: str,
                seconds: float) -> None:
        """One answered request. ``endpoint``: a route template (bounded by the caller);
        ``call``: (server, tool) the request is about, if known."""
        server, tool = self._current().call(*call) if call is not None else (NONE, NONE)
        key = (endpoint, server, tool, code if code in CODES else OTHER)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self._requests.labels(*key)
        child.inc()
        timer = self._endpoint_children.get(endpoint)
        if timer is None:
            timer = self._endpoint_children[endpoint] = self._request_seconds.labels(endpoint)
        timer.observe(seconds)

    def decision(self, server: str, tool: str, decision: str, code: str | None) -> None:
        """One authorize verdict (``code`` None for an allow)."""
        server, tool = self._current().call(server, tool)
        key = (server, tool, decision if decision in DECISIONS else OTHER, bounded_code(code))
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self._decisions.labels(*key)
        child.inc()

    def quota_refused(self, limit: str) -> None:
        """A call refused by the quota ``limit`` (its config name, e.g.
        ``per_tool.create_article.requests_per_minute``)."""
        self._quota_refusals.labels(quota_limit_kind(limit)).inc()

    def refused(self, code: str) -> None:
        """A refusal by the listener itself (not a request an endpoint answered)."""
        self._refusals.labels(bounded_code(code)).inc()

    def backend_fetch(self, backend: str, seconds: float, *, ok: bool) -> None:
        """One secret fetched (or failed) from ``backend`` for a lease."""
        key = (backend, ok)
        child = self._fetch_children.get(key)
        if child is None:
            name = backend if backend in self._current().backends else OTHER
            child = self._fetch_children[key] = self._fetch_seconds.labels(
                name, "ok" if ok else "error")
        child.observe(seconds)

    def audit_commit(self, seconds: float) -> None:
        """One audit batch committed (called by the file sink's writer task, after the
        commit, on the trio thread)."""
        if math.isfinite(seconds):
            self._commit.observe(seconds)

    # ------------------------------------------------------------------ scrape

    def render(self, snapshot: Snapshot) -> bytes:
        """The registry in the Prometheus text format 0.0.4, with ``snapshot``'s facts.
        Synchronous, no I/O: the hooks' values and the snapshot only."""
        self._snapshot.snapshot = snapshot
        try:
            return generate_latest(self.registry)
        finally:
            self._snapshot.snapshot = None


__all__ = ["CODES", "CONTENT_TYPE", "CacheStats", "Metrics", "SinkStats", "Snapshot",
           "bounded_code", "quota_limit_kind"]
