"""Audit events (pure), the JSON-lines sink with group commit, and AuditLog fan-out."""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import stat
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sidekey.audit import AuditLog, AuditUnavailable, jsonl
from sidekey.audit.events import (
    EVENT_TYPES,
    MAX_ARGUMENTS_BYTES,
    REDACTED,
    SEED_KEYS,
    make_event,
    redact,
)
from sidekey.audit.jsonl import JsonlSink, open_jsonl_sink

SEED_FILE = (
    Path(__file__).resolve().parents[2] / "shared" / "seed-configs" / "audit-event-example.json"
)
SEED_EXAMPLE: dict[str, Any] = {
    "event_id": "evt_8f3a2b1c-4d5e-6f7a-8b9c-0d1e2f3a4b5c",
    "timestamp": "2026-04-07T14:23:11.847Z",
    "event_type": "mcp.tool_call",
    "server": "content-api",
    "tool": "create_article",
    "user_id": "usr_29384756",
    "agent_id": "agent_content-writer",
    "session_id": "sess_a1b2c3d4",
    "arguments": {"title": "Q2 Product Update", "category": "announcements", "draft": True},
    "result": {"status": "success", "article_id": "art_57392846", "duration_ms": 342},
    "auth": {
        "token_issuer": "https://auth.example.com",
        "scopes": ["content:write"],
        "token_exp": "2026-04-07T14:28:11Z",
    },
    "policy": {
        "evaluated": True,
        "rules_matched": ["require-draft-mode-for-new-articles"],
        "decision": "allow",
    },
}
NOW = datetime.datetime(2026, 4, 7, 14, 23, 11, 847_123, tzinfo=datetime.UTC)
REDACT = ["password", "secret", "token", "key", "credential", "authorization"]
EVT_ID = re.compile(r"^evt_[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def ev(event_type: str = "mcp.tool_call", **fields: Any) -> dict[str, Any]:
    return make_event(event_type, host="host-1", now=NOW, redact_keys=REDACT, **fields)


# --------------------------------------------------------------------------- events (pure)


def test_seed_example_is_what_the_tests_assume() -> None:
    if SEED_FILE.exists():  # the shared seed sits beside the checkout on dev machines
        assert json.loads(SEED_FILE.read_text()) == SEED_EXAMPLE
    elif os.environ.get("CI"):  # CI runs with ../shared beside the checkout: never pass on missing ground
        pytest.fail(f"{SEED_FILE} not beside the checkout (CI is set: not skipping)")
    assert tuple(SEED_EXAMPLE) == SEED_KEYS


def test_event_reproduces_the_seed_example() -> None:
    fields = {
        k: v for k, v in SEED_EXAMPLE.items() if k not in ("event_id", "timestamp", "event_type")
    }
    event = ev(**fields, lease_id="lse_1", peer={"pid": 42, "uid": 1001}, request_id="req_1")
    assert tuple(event)[: len(SEED_KEYS)] == SEED_KEYS
    assert EVT_ID.match(event["event_id"])
    for key in SEED_KEYS:
        if key != "event_id":
            assert event[key] == SEED_EXAMPLE[key], key
    assert event["schema_version"] == 3
    assert event["host"] == "host-1"
    assert (
        event["lease_id"] == "lse_1"
        and event["peer"]["pid"] == 42
        and event["request_id"] == "req_1"
    )
    assert "error" not in event


def test_seed_keys_stay_present_and_optional_keys_are_omitted() -> None:
    event = ev("daemon.started", extra={"pid": 7, "ignored": None})
    for key in SEED_KEYS:
        assert key in event
    assert event["server"] is None and event["arguments"] is None
    for key in ("lease_id", "peer", "request_id", "error", "ignored"):
        assert key not in event
    assert event["pid"] == 7
    assert ev()["event_id"] != ev()["event_id"]


def test_event_type_and_extra_are_checked() -> None:
    assert "token.replayed" in EVENT_TYPES and "daemon.stopped" in EVENT_TYPES
    with pytest.raises(ValueError, match="event type"):
        ev("Not A Type")
    with pytest.raises(ValueError, match="shadow"):
        ev(extra={"user_id": "forged"})


def test_timestamp_is_utc_with_milliseconds() -> None:
    plus2 = datetime.timezone(datetime.timedelta(hours=2))
    local = datetime.datetime(2026, 1, 1, 2, 0, 0, 5_000, tzinfo=plus2)
    assert make_event("daemon.started", host="h", now=local, redact_keys=[])["timestamp"] == (
        "2026-01-01T00:00:00.005Z"
    )
    naive = datetime.datetime(2026, 1, 1, 0, 0, 0)
    assert make_event("daemon.started", host="h", now=naive, redact_keys=[])["timestamp"] == (
        "2026-01-01T00:00:00.000Z"
    )


def test_redaction_is_recursive_and_case_insensitive() -> None:
    args = {
        "title": "ok",
        "API_Key": "k-1",
        "nested": {
            "db_password": "p-1",
            "Authorization": "Bearer t",
            "depth": {"client_secret": 1},
        },
        "items": [{"accessToken": "t-2", "name": "n"}, "plain"],
        "tokens": ["a", "b"],
    }
    out = redact(args, REDACT)
    assert out == {
        "title": "ok",
        "API_Key": REDACTED,
        "nested": {
            "db_password": REDACTED,
            "Authorization": REDACTED,
            "depth": {"client_secret": REDACTED},
        },
        "items": [{"accessToken": REDACTED, "name": "n"}, "plain"],
        "tokens": REDACTED,
    }
    assert args["API_Key"] == "k-1"  # the input is not modified
    assert ev(arguments=args)["arguments"] == out


def test_oversized_arguments_become_a_digest_of_the_redacted_form() -> None:
    args = {"password": "hunter2-secret-value", "blob": "x" * (MAX_ARGUMENTS_BYTES + 1)}
    out = redact(args, REDACT)
    assert out["_truncated"] is True
    assert out["size"] > MAX_ARGUMENTS_BYTES
    assert re.fullmatch(r"[0-9a-f]{64}", out["sha256"])
    assert "hunter2" not in json.dumps(out)
    # The digest is of the redacted arguments: same with any password value.
    assert redact({**args, "password": "other"}, REDACT)["sha256"] == out["sha256"]


def test_deep_nesting_is_cut_and_odd_values_are_not_repr_ed() -> None:
    deep: Any = "leaf"
    for _ in range(200):
        deep = {"d": deep}
    out = redact({"deep": deep, "obj": object(), "raw": b"\x00secret"}, REDACT)
    assert "[TOO_DEEP]" in json.dumps(out)
    assert out["obj"] == "[object]" and out["raw"] == "[bytes]"


# --------------------------------------------------------------------------- JSON-lines sink


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line]


@asynccontextmanager
async def running(sink: JsonlSink) -> AsyncIterator[JsonlSink]:
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        try:
            yield sink
        finally:
            await sink.aclose()


def count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    real: Callable[..., Any] = getattr(os, name)

    def wrapper(fd: int, *args: Any) -> Any:
        calls.append(fd)
        return real(fd, *args)

    monkeypatch.setattr(jsonl.os, name, wrapper)
    return calls


async def test_group_commit_uses_far_fewer_fsyncs_than_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    sink = open_jsonl_sink(path, fsync=True)
    fsyncs = count_calls(monkeypatch, "fsync")
    writes = count_calls(monkeypatch, "write")
    ids: list[str] = []
    with trio.fail_after(30):
        async with running(sink), trio.open_nursery() as nursery:
            for i in range(200):
                event = ev(arguments={"i": i})
                ids.append(event["event_id"])
                nursery.start_soon(sink.write, event)
    events = lines(path)
    assert sorted(e["event_id"] for e in events) == sorted(ids)
    assert {e["arguments"]["i"] for e in events} == set(range(200))
    assert 1 <= len(fsyncs) <= 10, len(fsyncs)
    assert len(writes) == len(fsyncs)  # one write per batch
    health = sink.health()
    assert health["events_written"] == 200 and health["batches_written"] == len(fsyncs)


async def test_each_write_returns_after_its_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    sink = open_jsonl_sink(path, fsync=True)
    fsyncs = count_calls(monkeypatch, "fsync")
    with trio.fail_after(10):
        async with running(sink):
            for i in range(3):
                await sink.write(ev(arguments={"i": i}))
                assert len(fsyncs) == i + 1
                assert len(lines(path)) == i + 1


async def test_no_fsync_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    sink = open_jsonl_sink(path, fsync=False)
    fsyncs = count_calls(monkeypatch, "fsync")
    with trio.fail_after(10):
        async with running(sink):
            await sink.write(ev())
    assert fsyncs == [] and len(lines(path)) == 1


async def test_write_failure_fails_the_whole_batch_then_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    sink = open_jsonl_sink(path, fsync=True)
    real_write = os.write
    broken = True

    def write(fd: int, data: Any) -> int:
        if broken:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(jsonl.os, "write", write)
    failures: list[AuditUnavailable] = []

    async def one(i: int) -> None:
        try:
            await sink.write(ev(arguments={"i": i}))
        except AuditUnavailable as exc:
            failures.append(exc)

    with trio.fail_after(10):
        async with running(sink):
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(one, i)
            assert len(failures) == 20
            assert failures[0].code == "audit_unavailable" and failures[0].status == 503
            health = sink.health()
            assert health["ok"] is False and "ENOSPC" in health["last_error"]
            broken = False
            await sink.write(ev(arguments={"i": "after"}))
            assert sink.health()["ok"] is True
    assert [e["arguments"]["i"] for e in lines(path)] == ["after"]


async def test_fsync_failure_fails_the_waiters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = open_jsonl_sink(tmp_path / "audit.jsonl", fsync=True)

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(jsonl.os, "fsync", fsync)
    with trio.fail_after(10):
        async with running(sink):
            with pytest.raises(AuditUnavailable):
                await sink.write(ev())
    assert sink.health()["ok"] is False


async def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    sink = open_jsonl_sink(path, fsync=True)
    real_write = os.write
    monkeypatch.setattr(jsonl.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    with trio.fail_after(10):
        async with running(sink), trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(sink.write, ev(arguments={"i": i}))
    assert sorted(e["arguments"]["i"] for e in lines(path)) == list(range(10))


async def test_a_torn_last_line_is_terminated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"event_id": "evt_whole"}\n{"event_id": "evt_to')
    sink = open_jsonl_sink(path, fsync=True)
    with trio.fail_after(10):
        async with running(sink):
            await sink.write(ev())
    raw = path.read_bytes().split(b"\n")
    assert raw[1] == b'{"event_id": "evt_to'
    assert json.loads(raw[2])["event_type"] == "mcp.tool_call"


async def test_full_queue_fails_immediately(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = open_jsonl_sink(tmp_path / "audit.jsonl", fsync=True, inline=False)
    monkeypatch.setattr(jsonl, "MAX_PENDING_EVENTS", 3)
    release = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(jsonl.os, "fsync", slow_fsync)
    with trio.fail_after(20):
        async with running(sink), trio.open_nursery() as nursery:
            nursery.start_soon(sink.write, ev())  # in flight, stuck in fsync
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(3):
                nursery.start_soon(sink.write, ev())  # the next batch, now full
            await trio.testing.wait_all_tasks_blocked()
            assert sink.health()["pending"] == 3
            with pytest.raises(AuditUnavailable, match="queue is full"):
                await sink.write(ev())
            release.set()
    assert sink.health()["rejected"] == 1


async def test_writer_not_running_or_closed_fails_closed(tmp_path: Path) -> None:
    sink = open_jsonl_sink(tmp_path / "audit.jsonl", fsync=True)
    with pytest.raises(AuditUnavailable, match="not running"):
        await sink.write(ev())
    await sink.aclose()
    with pytest.raises(AuditUnavailable, match="closed"):
        await sink.write(ev())
    with pytest.raises(AuditUnavailable, match="closed"):
        sink.write_sync(ev())
    assert sink.health()["ok"] is False


async def test_cancelled_writer_finishes_its_batch_and_fails_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    sink = open_jsonl_sink(path, fsync=True, inline=False)
    release = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(jsonl.os, "fsync", slow_fsync)
    outcome: dict[str, str] = {}

    async def waiter(name: str) -> None:
        try:
            await sink.write(ev(arguments={"name": name}))
            outcome[name] = "written"
        except AuditUnavailable:
            outcome[name] = "unavailable"

    with trio.fail_after(20):
        async with trio.open_nursery() as outer, trio.open_nursery() as writer:
            await writer.start(sink.run)
            outer.start_soon(waiter, "in-flight")
            await trio.testing.wait_all_tasks_blocked()  # the writer is in fsync
            outer.start_soon(waiter, "queued")
            await trio.testing.wait_all_tasks_blocked()
            writer.cancel_scope.cancel()
            release.set()
    # The started commit completed; nobody was left waiting forever.
    assert outcome == {"in-flight": "written", "queued": "unavailable"}
    assert [e["arguments"]["name"] for e in lines(path)] == ["in-flight"]
    await sink.aclose()


def test_write_sync_and_unencodable_events(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = open_jsonl_sink(path, fsync=True)
    sink.write_sync(ev())
    with pytest.raises(AuditUnavailable, match="encoded"):
        sink.write_sync({"event_id": "x", "bad": object()})
    trio.run(sink.aclose)
    assert len(lines(path)) == 1


def test_file_is_created_0600_in_a_new_0700_directory(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "new" / "dir" / "audit.jsonl"
        sink = open_jsonl_sink(path, fsync=True)
    finally:
        os.umask(old)
    sink.write_sync(ev())
    trio.run(sink.aclose)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    flags = os.O_APPEND
    assert jsonl._OPEN_FLAGS & flags == flags


def test_unopenable_path_fails_at_startup(tmp_path: Path) -> None:
    (tmp_path / "a-dir").mkdir()
    with pytest.raises(AuditUnavailable, match="cannot open audit log"):
        open_jsonl_sink(tmp_path / "a-dir", fsync=True)
    target = tmp_path / "elsewhere.jsonl"
    (tmp_path / "link.jsonl").symlink_to(target)
    with pytest.raises(AuditUnavailable):
        open_jsonl_sink(tmp_path / "link.jsonl", fsync=True)
    assert not target.exists()


# --------------------------------------------------------------------------- AuditLog


class FakeSink:
    def __init__(self, ok: bool) -> None:
        self.ok = ok
        self.events: list[dict[str, Any]] = []
        self.closed = False

    async def write(self, event: dict[str, Any], *, durable: bool = True) -> None:
        await trio.lowlevel.checkpoint()
        if not self.ok:
            raise AuditUnavailable("down")
        self.events.append(event)

    async def aclose(self) -> None:
        self.closed = True

    def health(self) -> dict[str, Any]:
        return {"ok": self.ok}


async def test_audit_log_needs_one_sink_to_record() -> None:
    good, bad = FakeSink(True), FakeSink(False)
    log = AuditLog([good, bad])
    await log.emit(ev())
    assert len(good.events) == 1
    assert log.health()["ok"] is True
    good.ok = False
    with pytest.raises(AuditUnavailable, match="no audit sink"):
        await log.emit(ev())
    assert log.health()["ok"] is False
    await log.aclose()
    assert good.closed and bad.closed
    with pytest.raises(ValueError):
        AuditLog([])


async def test_audit_log_over_a_jsonl_sink(tmp_path: Path) -> None:
    sink = open_jsonl_sink(tmp_path / "audit.jsonl", fsync=True)
    log = AuditLog([sink])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            await log.emit(ev("token.replayed", error={"code": "token_replayed"}))
            assert log.health()["ok"] is True
            await log.aclose()
    assert lines(tmp_path / "audit.jsonl")[0]["error"] == {"code": "token_replayed"}


async def test_slow_fsync_moves_commits_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    """Commits run inline while fsync is fast; a streak of slow fsyncs switches to a
    worker thread (so a sick disk cannot freeze health checks), and events still land."""
    path = tmp_path / "audit.jsonl"
    sink = open_jsonl_sink(path, fsync=True)
    threads: list[str] = []
    delay = {"s": 0.0}

    def fsync(fd: int) -> None:
        # Simulated on trio's (virtual) clock, which the sink times commits with: a real
        # fsync, or a real sleep, on a busy box can take any time and flip the mode early.
        threads.append(threading.current_thread().name)
        if delay["s"]:
            mock_clock.jump(delay["s"])

    monkeypatch.setattr(jsonl.os, "fsync", fsync)
    with trio.fail_after(20):
        async with running(sink):
            await sink.write(ev())
            assert threads[-1] == threading.main_thread().name
            assert sink.health()["commit_mode"] == "inline"
            delay["s"] = jsonl.INLINE_COMMIT_MAX_S * 2
            await sink.write(ev())  # one slow commit is tolerated
            delay["s"] = 0.0
            await sink.write(ev())  # and a fast one resets the streak
            delay["s"] = jsonl.INLINE_COMMIT_MAX_S * 2
            for _ in range(jsonl.SLOW_STREAK - 1):
                await sink.write(ev())
                assert sink.health()["commit_mode"] == "inline"
            await sink.write(ev())  # slow, still inline: it is what reveals the streak
            assert sink.health()["commit_mode"] == "thread"
            delay["s"] = 0.0
            await sink.write(ev())
            assert threads[-1] != threading.main_thread().name
            await sink.write(ev(), durable=False)
            await sink.write(ev())  # a durable write after a queued one covers both
    assert len(lines(path)) == 6 + jsonl.SLOW_STREAK


async def test_queued_events_join_the_next_durable_commit(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = open_jsonl_sink(path, fsync=True)
    with trio.fail_after(10):
        async with running(sink):
            before = sink.health()["batches_written"]
            await sink.write(ev(arguments={"n": 1}), durable=False)
            await sink.write(ev(arguments={"n": 2}))  # one commit covers both
            assert sink.health()["batches_written"] == before + 1
            assert [e["arguments"]["n"] for e in lines(path)] == [1, 2]
            # alone, a queued event still goes out by itself (after DEFERRED_FLUSH_S): poll
            # for it, bounded by the fail_after above, rather than sleep a guessed time
            await sink.write(ev(arguments={"n": 3}), durable=False)
            assert len(lines(path)) == 2
            while len(lines(path)) < 3:
                await trio.sleep(jsonl.DEFERRED_FLUSH_S / 5)
            assert [e["arguments"]["n"] for e in lines(path)] == [1, 2, 3]
        # and closing flushes what is queued
        sink2 = open_jsonl_sink(path, fsync=True)
        async with running(sink2):
            await sink2.write(ev(arguments={"n": 4}), durable=False)
    assert [e["arguments"]["n"] for e in lines(path)] == [1, 2, 3, 4]
