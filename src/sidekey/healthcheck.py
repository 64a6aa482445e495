"""Health checks of the servers listed in the central registry.

For every registry entry with ``url``, ``health_check`` and ``health_interval_seconds``,
:class:`RegistryHealth` polls ``url + health_check`` (HTTP GET) at that interval and
keeps the latest result per server for ``GET /v1/status``. It never sits in a tool
call's path: :meth:`RegistryHealth.status` only reads what the pollers recorded, and a
poller never raises (every failure becomes an ``unhealthy`` state with the reason).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import trio

from .config import Registry
from .encoding import iso_utc

log = logging.getLogger(__name__)

MAX_CHECK_TIMEOUT_S = 5.0  # one check never waits longer than this (or the interval)
MAX_ERROR_CHARS = 200
USER_AGENT = "sidekey-healthcheck"

State = Literal["healthy", "unhealthy", "unknown"]


@dataclass(frozen=True, slots=True)
class HealthTarget:
    url: str
    interval_s: float


def _join(url: str, path: str) -> str:
    if path.startswith(("http://", "https://")):
        return path
    return url.rstrip("/") + "/" + path.lstrip("/")


def health_targets(registry: Registry) -> dict[str, HealthTarget]:
    """The servers of ``registry`` that declare a health check, with what to poll."""
    targets: dict[str, HealthTarget] = {}
    for name, entry in registry.servers.items():
        if entry.url and entry.health_check and entry.health_interval_seconds:
            targets[name] = HealthTarget(
                url=_join(entry.url, entry.health_check),
                interval_s=float(entry.health_interval_seconds),
            )
    return targets


@dataclass(slots=True)
class _Health:
    """One server's latest check (mutated only by that server's poller)."""

    url: str
    state: State = "unknown"
    last_checked: str | None = None
    last_error: str | None = None
    status_code: int | None = None
    latency_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "url": self.url,
            "last_checked": self.last_checked,
            "last_error": self.last_error,
            "status_code": self.status_code,
            "latency_ms": self.latency_ms,
        }


def _iso(ts: float) -> str:
    return iso_utc(ts, "milliseconds")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.ConnectError):
        text = f"connection failed: {exc}"
    elif isinstance(exc, httpx.TimeoutException):
        text = f"timed out: {exc}" if str(exc) else "timed out"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:MAX_ERROR_CHARS]


class RegistryHealth:
    """Polls the registry's health endpoints; start :meth:`run` in the daemon's nursery.

    ``max_timeout_s`` caps one check (the interval caps it too). ``clock`` gives the
    wall time recorded as ``last_checked``; ``transport`` replaces httpx's network
    transport (tests). Proxy and netrc settings from the environment are ignored:
    health checks go straight to the registry's URLs and never carry credentials.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        max_timeout_s: float = MAX_CHECK_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._max_timeout_s = max_timeout_s
        self._clock = clock
        self._transport = transport
        self._targets: dict[str, HealthTarget] = {}
        self._health: dict[str, _Health] = {}
        self._pollers: dict[str, tuple[HealthTarget, trio.CancelScope]] = {}
        self._nursery: trio.Nursery | None = None
        self._client: httpx.AsyncClient | None = None
        self.update_config(registry)

    @property
    def targets(self) -> Mapping[str, HealthTarget]:
        return self._targets

    def status(self) -> dict[str, dict[str, Any]]:
        """Latest result per monitored server, for ``/v1/status``: ``state``
        (healthy/unhealthy/unknown), ``url``, ``last_checked`` (ISO-8601 UTC or None),
        ``last_error``, ``status_code``, ``latency_ms``."""
        return {name: self._health[name].as_dict() for name in sorted(self._health)}

    def update_config(self, registry: Registry) -> None:
        """Adopt a reloaded registry: stop pollers of removed or changed servers, keep
        unchanged ones (and their last result), start new ones. Call from the trio
        thread (or before :meth:`run`)."""
        targets = health_targets(registry)
        for name in list(self._health):
            old = self._targets.get(name)
            if targets.get(name) != old:
                del self._health[name]
        for name, target in targets.items():
            if name not in self._health:
                self._health[name] = _Health(url=target.url)
        self._targets = targets
        self._sync_pollers()

    def _sync_pollers(self) -> None:
        for name, (target, scope) in list(self._pollers.items()):
            if self._targets.get(name) != target:
                scope.cancel()
                del self._pollers[name]
        nursery = self._nursery
        if nursery is None:
            return
        for name, target in self._targets.items():
            if name not in self._pollers:
                scope = trio.CancelScope()
                self._pollers[name] = (target, scope)
                # The poller keeps its own _Health: after a reload replaced it, a late
                # result of the old poller lands in an object nobody reads any more.
                nursery.start_soon(self._poll, name, target, self._health[name], scope)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll until cancelled. Reports started once the first checks are scheduled."""
        if self._nursery is not None:
            raise RuntimeError("RegistryHealth.run is already running")
        client = httpx.AsyncClient(
            transport=self._transport,
            trust_env=False,
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
        )
        try:
            async with client, trio.open_nursery() as nursery:
                self._client = client
                self._nursery = nursery
                self._sync_pollers()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._client = None
            self._pollers.clear()

    async def _poll(
        self, name: str, target: HealthTarget, health: _Health, scope: trio.CancelScope
    ) -> None:
        with scope:
            while True:
                await self._check(name, target, health)
                await trio.sleep(target.interval_s)

    async def _check(self, name: str, target: HealthTarget, health: _Health) -> None:
        client = self._client
        if client is None:  # run() is shutting down
            return
        timeout = min(self._max_timeout_s, target.interval_s)
        status_code: int | None = None
        error: str | None = None
        started = trio.current_time()
        try:
            # httpx's own timeouts are per phase; fail_after bounds the whole check.
            with trio.fail_after(timeout):
                async with client.stream("GET", target.url, timeout=timeout) as resp:
                    status_code = resp.status_code  # the body is never read
        except (trio.TooSlowError, httpx.TimeoutException):
            error = f"timed out after {timeout:g} s"
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            error = _describe(exc)
        except Exception as exc:  # a poller must never take the daemon down
            log.exception("health check of %s (%s) failed unexpectedly", name, target.url)
            error = _describe(exc)
        latency_ms = None
        if status_code is not None:
            latency_ms = round((trio.current_time() - started) * 1000, 3)
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}"
        state: State = "healthy" if error is None else "unhealthy"
        if state != health.state:
            if state == "healthy":
                log.info("registry server %s is healthy (%s)", name, target.url)
            else:
                log.warning("registry server %s is unhealthy (%s): %s", name, target.url, error)
        health.state = state
        health.last_checked = _iso(self._clock())
        health.last_error = error
        health.status_code = status_code
        health.latency_ms = latency_ms
