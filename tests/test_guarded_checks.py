"""Issue 10, item 2: four security checks that no test guarded (their mutants survived).

Against a real daemon, with forked children that drop to other uids and keep one pid
for a whole conversation (the token and the lease are bound to the process, so
``run_as``'s one-shot children are not enough):

(a) redeem refuses a token issued to another process of the SAME uid, attested as the
    same server (403 peer_mismatch, audited peer.rejected), and the refusal does not
    burn the token: the binding is checked before the jti is burned, so a sibling
    process cannot destroy another's token (denial of service); the real holder then
    redeems it.
(b) redeem refuses arguments other than the ones the token was issued for (403
    arguments_mismatch, audited token.rejected); presenting them stays optional on the
    wire, and mcp.redeem says whether they were checked (``arguments_checked``).
(c) ``/v1/release`` from a process that does not hold the lease (same uid, same server)
    is refused (403 peer_mismatch, audited), the lease stays active, and the holder can
    release it.
(d) a service cannot wait on another server's approval: 404 approval_not_found (the
    same answer as for an id that does not exist, so ids of other servers' held calls
    are not confirmed), audited.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import select
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from harness import Daemon
from test_approvals_daemon import ARGS, hold_every_call

pytestmark = pytest.mark.integration

NOBODY, NOBODY_GID = pwd.getpwnam("nobody")[2:4]
DAEMON, DAEMON_GID = pwd.getpwnam("daemon")[2:4]
WAIT_S = 20.0  # bound on every wait for a child's answer or exit
CALL_ARGS = {"title": "hello"}


class Child:
    """A forked process that dropped to ``uid``/``gid`` and sends the requests it is
    given, one at a time, from its one pid: what the daemon sees as one MCP server
    process. No key is readable after the drop: user tokens are minted by the parent."""

    # The parent's ends of every live child's pipes. A child forked later inherits them
    # and must close them: holding an older sibling's write end would keep that sibling
    # from ever seeing EOF (so from exiting) until this one exits.
    _parent_fds: set[int] = set()

    def __init__(self, d: Daemon, uid: int, gid: int) -> None:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(to_w)
                os.close(from_r)
                for fd in Child._parent_fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                with os.fdopen(to_r, "rb") as inp, os.fdopen(from_w, "wb") as out:
                    for line in inp:
                        req = json.loads(line)
                        try:
                            res: Any = list(d.request(req["method"], req["path"], req["body"]))
                        except BaseException as exc:
                            res = {"child_error": repr(exc)}
                        out.write(json.dumps(res).encode() + b"\n")
                        out.flush()
            finally:
                os._exit(0)
        os.close(to_r)
        os.close(from_w)
        self.pid = pid
        self._to = to_w
        self._from = from_r
        Child._parent_fds.update((to_w, from_r))
        self._buf = b""
        self._closed = False

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        os.write(self._to, json.dumps({"method": method, "path": path, "body": body}).encode() + b"\n")
        deadline = time.monotonic() + WAIT_S
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"child {self.pid} did not answer {method} {path} in {WAIT_S} s")
            chunk = os.read(self._from, 65536)
            if not chunk:
                raise EOFError(f"child {self.pid} exited during {method} {path}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        got = json.loads(line)
        assert isinstance(got, list), got  # else {"child_error": ...}
        return got[0], got[1]

    def authorize(self, d: Daemon, server: str, tool: str, arguments: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return self.request("POST", "/v1/authorize", {
            "server": server, "tool": tool, "agent_id": "content-writer", "session_id": "s1",
            "arguments": arguments, "user_token": d.user_token(server)})

    def redeem(self, token: str, arguments: dict[str, Any] | None = CALL_ARGS) -> tuple[int, dict[str, Any]]:
        body: dict[str, Any] = {"resolution_token": token}
        if arguments is not None:
            body["arguments"] = arguments
        return self.request("POST", "/v1/redeem", body)

    def release(self, lease_id: str) -> tuple[int, dict[str, Any]]:
        return self.request("POST", "/v1/release", {"lease_id": lease_id, "status": "success"})

    def start_time(self) -> int:
        """Clock ticks since boot at which this process started (/proc/<pid>/stat field
        22, what the daemon binds a token to next to the pid)."""
        with open(f"/proc/{self.pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2:].split()[19])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        Child._parent_fds.difference_update((self._to, self._from))
        with contextlib.suppress(OSError):
            os.close(self._to)  # EOF: the child's loop ends and it exits
        os.close(self._from)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return
            time.sleep(0.02)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


@pytest.fixture
def d(make_daemon: Any) -> Daemon:
    """content-api is uid nobody, analytics-db uid daemon; neither is in an RBAC tier
    (root, the daemon's uid, is owner), so no admin/approver override applies."""
    daemon: Daemon = make_daemon({"peers": {"content-api": [{"uid": NOBODY}],
                                            "analytics-db": [{"uid": DAEMON}]}})
    hold_every_call(daemon)  # publish_article is held for approval; create_article is not
    for server in ("content-api", "analytics-db"):
        daemon.user_token(server)  # minted while the issuer key is readable
    return daemon.start()


@pytest.fixture
def spawn(d: Daemon) -> Iterator[Any]:
    children: list[Child] = []

    def make(uid: int = NOBODY, gid: int = NOBODY_GID) -> Child:
        c = Child(d, uid, gid)
        children.append(c)
        return c

    try:
        yield make
    finally:
        for c in children:
            c.close()


def _twins(spawn: Any) -> tuple[Child, Child]:
    """Two processes of uid nobody that started in the same clock tick: the daemon can
    tell them apart by pid only (a token bound to uid + start time alone would be
    redeemable by the other). Forked back to back, most pairs share a tick."""
    for _ in range(200):
        a, b = spawn(), spawn()
        if a.start_time() == b.start_time():
            return a, b
        a.close()
        b.close()
    pytest.fail("no two children started in the same clock tick in 200 tries")


def _token(d: Daemon, holder: Child) -> str:
    status, body = holder.authorize(d, "content-api", "create_article", CALL_ARGS)
    assert status == 200 and body["decision"] == "allow", body
    token: str = body["resolution_token"]
    return token


def _rejections(d: Daemon, event_type: str, code: str, count: int = 1) -> list[dict[str, Any]]:
    d.wait_events(event_type, count)
    return [e for e in d.events_of(event_type) if (e.get("error") or {}).get("code") == code]


def _active_leases(d: Daemon) -> int:
    status, body = d.request("GET", "/v1/status")  # root: owner tier
    assert status == 200, body
    active: int = body["leases"]["active"]
    return active


# --------------------------------------------------------------------------- (a)


def test_redeem_from_another_process_of_the_same_uid_and_server_is_refused_and_burns_nothing(
    d: Daemon, spawn: Any,
) -> None:
    a, b = _twins(spawn)  # same uid, same server, same start time: only the pid differs
    token = _token(d, a)

    status, body = b.redeem(token)
    assert status == 403 and body["error"]["code"] == "peer_mismatch", body
    assert "bound to another process" in body["error"]["message"]
    assert d.secrets["content-api/write-key"] not in json.dumps(body)
    [event] = _rejections(d, "peer.rejected", "peer_mismatch")
    assert event["peer"]["pid"] == b.pid and event["peer"]["uid"] == NOBODY
    assert event["server"] == "content-api" and event["tool"] == "create_article"
    assert d.events_of("mcp.redeem") == []

    # The binding is checked before the jti is burned: B's attempt did not use up
    # A's token (else any sibling could cancel every call of its server).
    status, body = a.redeem(token)
    assert status == 200, body
    assert body["secrets"] == {"CONTENT_API_KEY": d.secrets["content-api/write-key"]}
    [redeemed] = d.wait_events("mcp.redeem")
    assert redeemed["peer"]["pid"] == a.pid
    # ... and burned now: a second redeem, even by its holder, is a replay.
    status, body = a.redeem(token)
    assert status == 409 and body["error"]["code"] == "token_replayed", body


# --------------------------------------------------------------------------- (b)


def test_redeem_with_other_arguments_is_refused_audited_and_the_record_says_what_was_checked(
    d: Daemon, spawn: Any,
) -> None:
    a = spawn()
    token = _token(d, a)

    status, body = a.redeem(token, {"title": "something else"})
    assert status == 403 and body["error"]["code"] == "arguments_mismatch", body
    [event] = _rejections(d, "token.rejected", "arguments_mismatch")
    assert event["peer"]["pid"] == a.pid and event["tool"] == "create_article"
    assert d.events_of("mcp.redeem") == []

    # Not burned by the mismatch; the matching arguments redeem it, and the record says so.
    status, body = a.redeem(token, CALL_ARGS)
    assert status == 200, body
    [checked] = d.wait_events("mcp.redeem")
    assert checked["arguments_checked"] is True

    # Presenting them stays optional: the record then says the check did not run.
    status, body = a.redeem(_token(d, a), None)
    assert status == 200, body
    unchecked = d.wait_events("mcp.redeem", 2)[1]
    assert unchecked["arguments_checked"] is False


# --------------------------------------------------------------------------- (c)


def test_release_from_a_process_not_holding_the_lease_is_refused_and_the_lease_stays(
    d: Daemon, spawn: Any,
) -> None:
    a, b = spawn(), spawn()
    status, body = a.redeem(_token(d, a))
    assert status == 200, body
    lease_id = body["lease_id"]
    assert _active_leases(d) == 1

    status, body = b.release(lease_id)
    assert status == 403 and body["error"]["code"] == "peer_mismatch", body
    [event] = _rejections(d, "peer.rejected", "peer_mismatch")
    assert event["peer"]["pid"] == b.pid
    assert _active_leases(d) == 1
    assert d.events_of("mcp.tool_call") == []

    status, body = a.release(lease_id)
    assert status == 200 and body["state"] == "released", body
    assert _active_leases(d) == 0
    [call] = d.wait_events("mcp.tool_call")
    assert call["lease_id"] == lease_id and call["peer"]["pid"] == a.pid


# --------------------------------------------------------------------------- (d)


def test_a_service_cannot_wait_on_another_servers_approval(d: Daemon, spawn: Any) -> None:
    content, analytics = spawn(), spawn(DAEMON, DAEMON_GID)
    status, body = content.authorize(d, "content-api", "publish_article", ARGS)
    assert status == 202 and body["decision"] == "pending_approval", body
    approval_id = body["approval_id"]
    path = f"/v1/approvals/{approval_id}/wait?timeout=0"

    status, body = analytics.request("GET", path)
    assert status == 404 and body["error"]["code"] == "approval_not_found", body
    [event] = _rejections(d, "request.rejected", "approval_not_found")
    assert event["peer"]["uid"] == DAEMON and event["peer"]["pid"] == analytics.pid

    # The service the held call belongs to may wait on it (still pending).
    status, body = content.request("GET", path)
    assert status == 200 and body["timed_out"] is True, body
    assert body["approval"]["state"] == "pending"
