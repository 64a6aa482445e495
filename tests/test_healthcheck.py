"""Registry health checks against a real loopback HTTP server (every wait is bounded)."""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import trio

from sidekey.config import Registry
from sidekey.healthcheck import HealthTarget, RegistryHealth, health_targets

TEST_LIMIT_S = 10  # no test may run longer, whatever goes wrong
WAIT_S = 5


class Backend:
    """A tiny HTTP/1.1 server: /ok -> 200, /fail -> 500, /slow -> never answers,
    /flip -> 500 until ``flip_ok`` is set."""

    def __init__(self) -> None:
        self.port = 0
        self.flip_ok = False
        self.hits: dict[str, int] = {}

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        with trio.move_on_after(WAIT_S):
            while b"\r\n\r\n" not in data and len(data) < 16384:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
        path = data.split(b" ", 2)[1].decode() if data.count(b" ") >= 2 else "/"
        self.hits[path] = self.hits.get(path, 0) + 1
        if path == "/slow":
            await trio.sleep(WAIT_S)
            return
        code = 200 if path == "/ok" or (path == "/flip" and self.flip_ok) else 500
        body = b"ok" if code == 200 else b"boom"
        reason = b"OK" if code == 200 else b"Internal Server Error"
        head = b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
            code, reason, len(body))
        try:
            await stream.send_all(head + body)
            await stream.aclose()
        except trio.BrokenResourceError:
            pass

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, b.handle, 0, host="127.0.0.1"))
        b.port = listeners[0].socket.getsockname()[1]
        yield b
        nursery.cancel_scope.cancel()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def registry(servers: dict[str, dict[str, Any]]) -> Registry:
    return msgspec.convert({"servers": servers}, Registry)


def entry(url: str, path: str, interval: int = 30) -> dict[str, Any]:
    return {"url": url, "health_check": path, "health_interval_seconds": interval}


@asynccontextmanager
async def running(health: RegistryHealth) -> AsyncIterator[RegistryHealth]:
    async with trio.open_nursery() as nursery:
        await nursery.start(health.run)
        yield health
        nursery.cancel_scope.cancel()


async def wait_until(pred: Callable[[], bool]) -> None:
    with trio.fail_after(WAIT_S):
        while not pred():
            await trio.sleep(0.01)


def checked(health: RegistryHealth, name: str) -> Callable[[], bool]:
    return lambda: health.status().get(name, {}).get("last_checked") is not None


def test_targets_need_url_check_and_interval() -> None:
    reg = registry({
        "a": entry("http://h/base/", "/health", 30),
        "b": {"url": "http://h", "health_check": "/health"},  # no interval
        "c": {"status": "active"},
    })
    assert health_targets(reg) == {"a": HealthTarget(url="http://h/base/health", interval_s=30.0)}
    health = RegistryHealth(reg)
    assert health.status() == {"a": {"state": "unknown", "url": "http://h/base/health",
                                     "last_checked": None, "last_error": None,
                                     "status_code": None, "latency_ms": None}}


async def test_healthy_unhealthy_unreachable_and_slow() -> None:
    with trio.fail_after(TEST_LIMIT_S):
        async with backend() as b:
            dead = f"http://127.0.0.1:{closed_port()}"
            health = RegistryHealth(registry({
                "good": entry(b.url(), "/ok"),
                "bad": entry(b.url(), "/fail"),
                "gone": entry(dead, "/health"),
                "slow": entry(b.url(), "/slow"),
            }), max_timeout_s=0.3, clock=lambda: 1_780_000_000.0)
            async with running(health):
                for name in ("good", "bad", "gone", "slow"):
                    await wait_until(checked(health, name))
                status = health.status()
    good = status["good"]
    assert good["state"] == "healthy" and good["status_code"] == 200 and good["last_error"] is None
    assert isinstance(good["latency_ms"], float) and 0 <= good["latency_ms"] < 5000
    assert good["last_checked"] == "2026-05-28T20:26:40.000Z"
    bad = status["bad"]
    assert bad["state"] == "unhealthy" and bad["status_code"] == 500 and bad["last_error"] == "HTTP 500"
    gone = status["gone"]
    assert gone["state"] == "unhealthy" and gone["status_code"] is None and gone["latency_ms"] is None
    assert "connection failed" in gone["last_error"]
    slow = status["slow"]
    assert slow["state"] == "unhealthy" and slow["status_code"] is None
    assert slow["last_error"] == "timed out after 0.3 s"


async def test_polls_every_interval_and_recovers() -> None:
    with trio.fail_after(TEST_LIMIT_S):
        async with backend() as b:
            health = RegistryHealth(registry({"s": entry(b.url(), "/flip", interval=1)}))
            async with running(health):
                await wait_until(checked(health, "s"))
                assert health.status()["s"]["state"] == "unhealthy"
                b.flip_ok = True
                await wait_until(lambda: health.status()["s"]["state"] == "healthy")
            assert b.hits["/flip"] >= 2


async def test_update_config_restarts_only_what_changed() -> None:
    with trio.fail_after(TEST_LIMIT_S):
        async with backend() as b:
            health = RegistryHealth(registry({
                "keep": entry(b.url(), "/ok"),
                "drop": entry(b.url(), "/ok"),
                "move": entry(b.url(), "/fail"),
            }))
            async with running(health):
                for name in ("keep", "drop", "move"):
                    await wait_until(checked(health, name))
                kept = health.status()["keep"]
                health.update_config(registry({
                    "keep": entry(b.url(), "/ok"),
                    "move": entry(b.url(), "/ok"),
                    "new": entry(b.url(), "/fail"),
                }))
                status = health.status()
                assert set(status) == {"keep", "move", "new"}
                assert status["keep"] == kept  # unchanged: result kept, not re-polled
                assert status["move"]["state"] == "unknown"
                assert status["move"]["url"].endswith("/ok")
                await wait_until(lambda: health.status()["move"]["state"] == "healthy")
                await wait_until(lambda: health.status()["new"]["state"] == "unhealthy")
                assert b.hits["/ok"] == 3  # keep + drop once, move once after the reload
                health.update_config(registry({}))
                assert health.status() == {}


async def test_run_without_targets_and_cancel() -> None:
    with trio.fail_after(TEST_LIMIT_S):
        health = RegistryHealth(registry({}))
        async with running(health):
            assert health.status() == {}
        # run() returned: it can be started again (e.g. by a restarted nursery).
        async with running(health):
            pass


async def test_run_twice_concurrently_is_refused() -> None:
    with trio.fail_after(TEST_LIMIT_S):
        health = RegistryHealth(registry({}))
        async with running(health):
            with pytest.raises(RuntimeError):
                await health.run()


async def test_cancel_while_a_check_is_in_flight() -> None:
    with trio.fail_after(TEST_LIMIT_S):
        async with backend() as b:
            health = RegistryHealth(registry({"slow": entry(b.url(), "/slow")}), max_timeout_s=5)
            async with running(health):
                await wait_until(lambda: b.hits.get("/slow", 0) == 1)
            # Cancelled mid-request: no result recorded, no error, returned promptly.
            assert health.status()["slow"]["state"] == "unknown"
