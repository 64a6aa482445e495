"""Issue 9, items 5 and 6: no caller can exhaust the daemon for others.

A real daemon; the attacker is a forked child running as ``nobody`` (tier anonymous),
the MCP server a forked child running as another uid that the config's ``peers`` attest
as ``content-api``.

- Audit amplification (item 5): pipelined refusals with ~15 KB paths used to write two
  copies of the path per refusal, fsynced, without limit. Now each refusal of an
  anonymous caller counts against ``audit.rejections_per_uid`` and the audit file grows
  by at most ``windows x (burst + 1) x (REJECTION_EVENT_BYTES + 1)`` bytes for that uid.
- Connection slots (item 6): one uid holding idle connections used to take every slot
  (503 ``too_many_connections`` for the MCP servers). Now an anonymous uid has
  ``listen.max_connections_per_anonymous_uid`` slots, silent connections are closed after
  ``listen.first_request_timeout_s``, and the refusals are audited within the same bound.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pwd
import resource
import select
import selectors
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from harness import Daemon
from sidekey.config import ListenConfig
from sidekey.daemon import REJECTION_EVENT_BYTES

pytestmark = pytest.mark.integration

NOBODY = pwd.getpwnam("nobody")
SERVICE = pwd.getpwnam("daemon")  # uid 1: the MCP server "content-api" in these tests
CHILD_TIMEOUT_S = 120.0
LINE_MAX = REJECTION_EVENT_BYTES + 1  # one refusal (or summary) event and its newline


# --------------------------------------------------------------------------- a child as another uid


class Child:
    """A forked child running ``fn(ready)`` as another uid; ``ready()`` tells the parent
    it reached its hold point. Its JSON result is read with :meth:`result`."""

    def __init__(self, uid: int, gid: int, fn: Callable[[Callable[[], None]], Any]) -> None:
        res_r, res_w = os.pipe()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                os.close(res_r)
                os.close(ready_r)
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                out = fn(lambda: os.write(ready_w, b"r") and None)
                data = json.dumps(out).encode()
            except BaseException as exc:
                data = json.dumps({"child_error": repr(exc)}).encode()
            with contextlib.suppress(BaseException):
                os.write(ready_w, b"r")  # never leave the parent waiting
                view = memoryview(data)
                while view:
                    view = view[os.write(res_w, view):]
            os._exit(0)
        os.close(res_w)
        os.close(ready_w)
        self.pid, self._res, self._ready = pid, res_r, ready_r

    def wait_ready(self, timeout: float = 60.0) -> None:
        readable, _, _ = select.select([self._ready], [], [], timeout)
        assert readable, "child did not reach its hold point in time"
        os.read(self._ready, 1)

    def running(self) -> bool:
        return os.waitpid(self.pid, os.WNOHANG) == (0, 0)

    def result(self, timeout: float = CHILD_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout
        data = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
                raise AssertionError("child did not finish in time")
            readable, _, _ = select.select([self._res], [], [], left)
            if not readable:
                continue
            chunk = os.read(self._res, 65536)
            if not chunk:
                break
            data += chunk
        os.close(self._res)
        os.close(self._ready)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        out = json.loads(data)
        assert not (isinstance(out, dict) and "child_error" in out), out
        return out


def _responses(buf: bytearray, statuses: Counter[int], bodies: list[bytes]) -> None:
    """Consume the complete HTTP responses at the start of ``buf``."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(buf) < end + 4 + length:
            return
        statuses[int(head[0].split()[1])] += 1
        if len(bodies) < 3:
            bodies.append(bytes(buf[end + 4 : end + 4 + length]))
        del buf[: end + 4 + length]


def _pipeline_flood(sock_path: str, *, connections: int, per_connection: int,
                    path_len: int) -> dict[str, Any]:
    """Send ``per_connection`` pipelined ``GET /v1/<path_len bytes>`` on each of
    ``connections`` connections, read every response; count the statuses."""
    request = f"GET /v1/{'a' * path_len} HTTP/1.1\r\nhost: s\r\n\r\n".encode()
    sel = selectors.DefaultSelector()
    state: dict[socket.socket, dict[str, Any]] = {}
    statuses: Counter[int] = Counter()
    bodies: list[bytes] = []
    for _ in range(connections):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        s.setblocking(False)
        state[s] = {"out": memoryview(request * per_connection), "in": bytearray(), "done": 0}
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    deadline = time.monotonic() + CHILD_TIMEOUT_S - 10
    expected = connections * per_connection
    closed = 0
    while sum(statuses.values()) < expected and closed < connections:
        assert time.monotonic() < deadline, f"flood stalled at {dict(statuses)}"
        for key, mask in sel.select(timeout=1.0):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            st = state[s]
            if mask & selectors.EVENT_WRITE and st["out"]:
                with contextlib.suppress(BlockingIOError):
                    st["out"] = st["out"][s.send(st["out"][:262144]):]
                if not st["out"]:
                    sel.modify(s, selectors.EVENT_READ)
            if mask & selectors.EVENT_READ:
                try:
                    data = s.recv(1 << 20)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                if not data:
                    sel.unregister(s)
                    closed += 1
                    continue
                st["in"] += data
                _responses(st["in"], statuses, bodies)
    for s in state:
        s.close()
    return {"statuses": {str(k): v for k, v in statuses.items()},
            "sample": [b.decode("utf-8", "replace")[:400] for b in bodies]}


def _lines_of_uid(d: Daemon, uid: int) -> list[tuple[dict[str, Any], int]]:
    """(event, size of its line) for every event about ``uid``'s refusals."""
    out = []
    for line in d.audit_path.read_bytes().splitlines():
        if not line:
            continue
        event = json.loads(line)
        if (event.get("peer") or {}).get("uid") == uid:
            out.append((event, len(line) + 1))
    return out


def _wait_accounted(d: Daemon, uid: int, code: str, total: int, timeout: float) -> list[
        tuple[dict[str, Any], int]]:
    """Wait until the full events plus the suppressed counts for ``code`` reach ``total``
    (summaries are written when their window closes)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = _lines_of_uid(d, uid)
        if _accounted(lines, code) >= total or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def _accounted(lines: list[tuple[dict[str, Any], int]], code: str) -> int:
    full = sum(1 for e, _ in lines
               if e["event_type"] != "request.rejected.suppressed" and e["error"]["code"] == code)
    suppressed = sum(e["by_code"].get(code, 0) for e, _ in lines
                     if e["event_type"] == "request.rejected.suppressed")
    return full + suppressed


def _bound(elapsed_s: float, burst: int, per_seconds: float) -> int:
    """Bytes one uid's refusals may add in ``elapsed_s``: per window (a window starts at
    a refusal after the previous one ended) burst full events plus one summary."""
    windows = math.floor(elapsed_s / per_seconds) + 1
    return windows * (burst + 1) * LINE_MAX


# --------------------------------------------------------------------------- item 5


BURST = 20
PER_SECONDS = 2.0


def test_anonymous_refusal_flood_is_audited_within_the_stated_bound(make_daemon: Any) -> None:
    """2,000 pipelined refusals with 15 KB paths as nobody: the audit file grows by at
    most the bound, the counts are all there (full events + request.rejected.suppressed),
    health stays 200. On the old code this wrote ~2,000 x 30 KB (60 MB)."""
    d: Daemon = make_daemon(
        {"audit": {"rejections_per_uid": {"burst": BURST, "per_seconds": PER_SECONDS}}}).start()
    connections, per_connection = 4, 500
    total = connections * per_connection
    path_len = 15_000  # the head stays under listen.max_header_bytes (16 KiB): 404, keep-alive
    size0 = d.audit_path.stat().st_size
    t0 = time.monotonic()
    child = Child(NOBODY.pw_uid, NOBODY.pw_gid, lambda ready: _pipeline_flood(
        d.socket, connections=connections, per_connection=per_connection, path_len=path_len))
    health = Counter()
    while child.running():
        health[d.request("GET", "/v1/health", timeout=10)[0]] += 1
        time.sleep(0.05)
    flood = child.result()
    assert flood["statuses"] == {"404": total}, flood
    lines = _wait_accounted(d, NOBODY.pw_uid, "not_found", total, timeout=PER_SECONDS + 10)
    elapsed = time.monotonic() - t0
    grown = d.audit_path.stat().st_size - size0
    bound = _bound(elapsed, BURST, PER_SECONDS)
    assert grown <= bound, f"audit grew {grown} bytes in {elapsed:.1f} s; bound {bound}"
    health[d.request("GET", "/v1/health")[0]] += 1
    assert set(health) == {200}, health

    assert _accounted(lines, "not_found") == total
    summaries = [e for e, _ in lines if e["event_type"] == "request.rejected.suppressed"]
    assert summaries and all(s["closed"] in ("interval", "evicted") for s in summaries)
    assert all(s["written"] == BURST for s in summaries)
    full = [e for e, _ in lines if e["event_type"] == "request.rejected"]
    assert len(full) <= (math.floor(elapsed / PER_SECONDS) + 1) * BURST
    assert sum(size for _, size in lines) == grown, "only nobody's refusals were audited"
    assert "truncated" in flood["sample"][0]  # the path in the message is cut (200 chars)
    assert len(flood["sample"][0]) < 400
    # every full event has the path cut, both in the message and in extra.path
    for event, size in lines:
        if event["event_type"] == "request.rejected":
            assert len(event["path"]) < 250 and len(event["error"]["message"]) < 300
            assert size < 4096


def test_attested_service_refusals_stay_fully_audited(make_daemon: Any) -> None:
    """Rejections of a process attested above anonymous are security decisions about a
    known principal: never suppressed (here: 3 x burst refusals of the owner uid)."""
    d: Daemon = make_daemon({"audit": {"rejections_per_uid": {"burst": 2, "per_seconds": 60}}}).start()
    for _ in range(6):
        assert d.request("GET", "/v1/nope")[0] == 404
    assert len([e for e in d.events_of("request.rejected") if e["error"]["code"] == "not_found"]) == 6
    assert d.events_of("request.rejected.suppressed") == []


def test_suppressed_counts_are_written_at_shutdown(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"audit": {"rejections_per_uid": {"burst": 2, "per_seconds": 3600}}}).start()
    got = Child(NOBODY.pw_uid, NOBODY.pw_gid, lambda ready: [
        d.request("GET", "/v1/nope")[0] for _ in range(7)]).result()
    assert got == [404] * 7
    assert d.stop() == 0
    [summary] = d.events_of("request.rejected.suppressed")
    assert summary["closed"] == "shutdown" and summary["by_code"] == {"not_found": 5}
    assert summary["peer"] == {"uid": NOBODY.pw_uid}
    assert d.audit_events()[-1]["event_type"] == "daemon.stopped"


# --------------------------------------------------------------------------- item 6


def _hold_connections(sock_path: str, count: int, ready: Callable[[], None],
                      hold_s: float) -> dict[str, Any]:
    """Open ``count`` connections and send nothing; report how each one ended."""
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        socks.append(s)
    opened = time.monotonic()
    ready()
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    got_503 = silent = 0
    codes: Counter[str] = Counter()
    open_left = len(socks)
    while open_left and time.monotonic() - opened < hold_s:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if data.startswith(b"HTTP/1.1 503"):
                got_503 += 1
                codes[json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"]] += 1
            else:
                assert data == b"", data[:200]
                silent += 1
            sel.unregister(s)
            s.close()
            open_left -= 1
    for s in socks:
        s.close()
    return {"refused_503": got_503, "closed_silently": silent, "still_open": open_left,
            "codes": dict(codes)}


def _service_call(d: Daemon) -> list[Any]:
    status, body = d.authorize("content-api", "create_article")
    return [status, body.get("decision") or body.get("error", {}).get("code")]


@pytest.mark.parametrize("selector", ["uid", "gid"])
def test_a_flooding_uid_never_takes_an_attested_servers_slots(make_daemon: Any, selector: str) -> None:
    """nobody opens 600 connections and holds them idle. content-api (uid daemon) still
    connects and is served; nobody gets max_connections_per_anonymous_uid slots, the rest
    503 too_many_connections (audited within the item-5 bound), and its silent
    connections are closed after first_request_timeout_s, long before idle_timeout_s.

    ``uid``: the selector pins the uid, so nobody is refused at accept. ``gid``: the
    selector could match any uid, so nobody's connections are counted as possible
    services at accept and refused right after attestation.
    """
    listen = ListenConfig()
    per_anon = listen.max_connections_per_anonymous_uid
    first_s = listen.first_request_timeout_s
    assert first_s * 4 < listen.idle_timeout_s
    peer_selector = {"uid": SERVICE.pw_uid} if selector == "uid" else {"gid": SERVICE.pw_gid}
    d: Daemon = make_daemon({
        "peers": {"content-api": [peer_selector]},
        "audit": {"rejections_per_uid": {"burst": BURST, "per_seconds": PER_SECONDS}},
    }).start()
    d.user_token("content-api")  # minted while the issuer key is readable (cached)
    attempts = 600
    t0 = time.monotonic()
    # How long the child waits for the silent ones to be closed: it returns as soon as
    # they all are (first_request_timeout_s), so this is a hang guard that still tells
    # the two timeouts apart, not a bound on how fast a loaded daemon gets to them.
    hold_s = listen.idle_timeout_s / 2
    flood = Child(NOBODY.pw_uid, NOBODY.pw_gid,
                  lambda ready: _hold_connections(d.socket, attempts, ready, hold_s))
    flood.wait_ready()
    # While nobody holds what it could get: the MCP server connects and is served.
    served = Child(SERVICE.pw_uid, SERVICE.pw_gid, lambda ready: [
        _service_call(d), list(d.request("GET", "/v1/health"))[:1]]).result()
    assert served == [[200, "allow"], [200]], served
    held = flood.result(timeout=hold_s + 60)
    assert held["still_open"] == 0, held  # the silent ones were closed (first_request_timeout_s)
    assert held["refused_503"] + held["closed_silently"] == attempts
    assert held["refused_503"] >= 1 and set(held["codes"]) == {"too_many_connections"}, held
    # Every refusal is accounted for: per_anon slots were granted (a few more only if
    # the accepts took longer than first_request_timeout_s and slots came free again).
    refused = attempts - per_anon
    lines = _wait_accounted(d, NOBODY.pw_uid, "too_many_connections", refused,
                            timeout=PER_SECONDS + 10)
    elapsed = time.monotonic() - t0
    assert attempts - 3 * per_anon <= _accounted(lines, "too_many_connections") <= refused
    assert sum(size for _, size in lines) <= _bound(elapsed, BURST, PER_SECONDS)
    full = [e for e, _ in lines if e["event_type"] == "request.rejected"]
    assert full and all(e["error"]["status"] == 503 for e in full)
    assert len(full) <= (math.floor(elapsed / PER_SECONDS) + 1) * BURST
    assert d.request("GET", "/v1/health")[0] == 200


def test_silent_connection_closed_after_first_request_timeout(make_daemon: Any) -> None:
    """A connection that never sends is closed after first_request_timeout_s; one that
    made a request stays open (keep-alive: idle_timeout_s)."""
    d: Daemon = make_daemon({"listen": {"first_request_timeout_s": 1, "idle_timeout_s": 120}}).start()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    active = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.connect(d.socket)
        active.connect(d.socket)
        active.sendall(b"GET /v1/health HTTP/1.1\r\nhost: s\r\n\r\n")
        active.settimeout(10)
        assert active.recv(65536).startswith(b"HTTP/1.1 200")
        silent.settimeout(30)
        assert silent.recv(1) == b""  # closed by the daemon, long before 120 s
        # Both connected together, and the silent one was closed no sooner than
        # first_request_timeout_s after that: the active one is as old now, and unaffected.
        active.sendall(b"GET /v1/health HTTP/1.1\r\nhost: s\r\n\r\n")
        assert active.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        silent.close()
        active.close()


# --------------------------------------------------------------------------- the uid pre-filter (pure)


def _config(doc: dict[str, Any]) -> Any:
    import msgspec

    from sidekey.config import Config

    return msgspec.convert(doc, Config)


def test_uid_prefilter_classes_are_never_lower_than_after_attestation() -> None:
    """At accept only the uid is known: a uid is anonymous-class only if no peers/rbac
    selector could match it; a selector that pins no uid/user makes every uid a
    possible service (then the class is settled after attestation)."""
    from sidekey.daemon import _selector_uids

    pinned = _config({"peers": {"a": [{"uid": 1001}, {"user": "mcp-b", "unit": "b.service"}],
                                "self": [{"uid": "self"}]},
                      "rbac": {"approver": {"uids": [1002], "users": ["alice"]}}})
    assert _selector_uids(pinned, 999) == (False, frozenset({1001, 999, 1002}),
                                           frozenset({"mcp-b", "alice"}))
    for loose in ({"peers": {"a": [{"unit": "a.service"}]}},
                  {"peers": {"a": [{"gid": 5}]}},
                  {"peers": {"a": [{"exe": "/usr/bin/a", "supplementary_group": "g"}]}},
                  {"rbac": {"admin": {"groups": ["wheel"]}}},
                  {"rbac": {"service": {"units": ["x.service"]}}}):
        assert _selector_uids(_config(loose), 999)[0] is True, loose


def test_check_config_warns_when_anonymous_callers_can_take_every_slot() -> None:
    from sidekey.config import _cross_check

    loose = _config({"listen": {"max_connections": 64, "max_anonymous_connections": 64}})
    assert any("max_anonymous_connections" in w for w in _cross_check(loose, {}, "sidekey.yaml"))
    assert not any("max_anonymous_connections" in w
                   for w in _cross_check(_config({}), {}, "sidekey.yaml"))
