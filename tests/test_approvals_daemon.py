"""Human approval end to end: a real daemon, the ``sidekey`` CLI as an approver runs it,
the Python client as an MCP server uses it.

The seed's rate-limits.yaml holds create_article beyond 5 calls per user per hour
(``requires_approval_above: 5``); tests that need every call held add
``requires_human_approval: true`` for publish_article to their copy of the file.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from harness import Daemon, run_as
from sidekey.client import AccessDenied, ApprovalPending, Client, ConflictError
from test_cli import sidekey

pytestmark = pytest.mark.integration

ARGS = {"article_id": 7, "channel": "web"}


def hold_every_call(d: Daemon, tool: str = "publish_article") -> None:
    path = d.root / "rate-limits.yaml"
    limits = yaml.safe_load(path.read_text())
    limits["limits"]["per_tool"].setdefault(tool, {})["requires_human_approval"] = True
    path.write_text(yaml.safe_dump(limits))


def cli(d: Daemon, *argv: str, token: str | None = None) -> Any:
    env = {"SIDEKEY_USER_TOKEN": token} if token else None
    return sidekey(*argv, "--config", str(d.config_path), env=env)


def call_argv(arguments: dict[str, Any], *extra: str) -> list[str]:
    return ["call", "--server", "content-api", "--tool", "publish_article", "--agent",
            "content-writer", "--arguments", json.dumps(arguments), *extra]


def held(d: Daemon, arguments: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    status, body = d.authorize("content-api", "publish_article",
                               arguments=ARGS if arguments is None else arguments, **kw)
    assert status == 202, body
    assert body["decision"] == "pending_approval" and body["approval_id"].startswith("apr_")
    return body


def test_held_call_approved_with_the_cli_runs_once_and_only_with_its_arguments(
    make_daemon: Any,
) -> None:
    d: Daemon = make_daemon()
    hold_every_call(d)
    d.start()
    token = d.user_token("content-api")

    # The MCP server's call is held: exit 3, the approval id on stdout.
    out = cli(d, *call_argv(ARGS), token=token)
    assert out.returncode == 3, (out.stdout, out.stderr)
    pending = json.loads(out.stdout)
    approval_id = pending["approval_id"]
    assert pending["decision"] == "pending_approval" and approval_id.startswith("apr_")
    assert f"sidekey approvals approve {approval_id}" in out.stderr
    requested = d.events_of("approval.requested")
    assert len(requested) == 1 and requested[0]["approval_id"] == approval_id
    assert requested[0]["user_id"] == "alice" and requested[0]["arguments"] == ARGS
    assert requested[0]["policy"]["decision"] == "pending_approval"
    assert "requires_human_approval" in requested[0]["held_for"]

    assert "approvals pending: 1" in cli(d, "status").stdout
    # Presenting the id before a verdict is refused.
    out = cli(d, *call_argv(ARGS, "--approval-id", approval_id), token=token)
    assert out.returncode == 1 and "approval_pending" in out.stderr, out.stderr

    # The approver sees who asked for what, and approves.
    out = cli(d, "approvals", "list", "--json")
    assert out.returncode == 0, out.stderr
    [shown] = json.loads(out.stdout)
    assert shown["id"] == approval_id and shown["state"] == "pending"
    assert (shown["server"], shown["tool"], shown["user"], shown["agent"]) == (
        "content-api", "publish_article", "alice", "content-writer")
    assert shown["arguments"] == ARGS
    assert shown["requested_by"].startswith("root (uid 0, pid ")
    out = cli(d, "approvals", "list")
    assert approval_id in out.stdout and '"article_id": 7' in out.stdout
    out = cli(d, "approvals", "approve", approval_id, "--reason", "scheduled launch")
    assert out.returncode == 0, out.stderr
    assert "approved" in out.stdout and "scheduled launch" in out.stdout
    [approved] = d.events_of("approval.approved")
    assert approved["approval_id"] == approval_id and approved["reason"] == "scheduled launch"
    assert "uid 0" in approved["decided_by"] and approved["peer"]["uid"] == 0

    # Different arguments with the approved id: refused, and the approval stays usable.
    out = cli(d, *call_argv({**ARGS, "channel": "everywhere"}, "--approval-id", approval_id),
              token=token)
    assert out.returncode == 1 and "approval_mismatch" in out.stderr, out.stderr
    assert "arguments" in out.stderr
    mismatch = [e for e in d.events_of("mcp.authorize")
                if e.get("error", {}).get("code") == "approval_mismatch"]
    assert len(mismatch) == 1 and mismatch[0]["policy"]["decision"] == "deny"
    # The same id from another agent: refused too.
    status, body = d.authorize("content-api", "publish_article", arguments=ARGS,
                               approval_id=approval_id, agent_id="sales-assistant")
    assert status == 403, body

    # Exactly the approved call: it runs, once.
    out = cli(d, *call_argv(ARGS, "--approval-id", approval_id), token=token)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["decision"] == "allow" and summary["released"] == "released"
    assert any(r.startswith(f"approval.granted:{approval_id}") for r in summary["rules_matched"])
    out = cli(d, *call_argv(ARGS, "--approval-id", approval_id), token=token)
    assert out.returncode == 1 and "approval_redeemed" in out.stderr, out.stderr
    assert cli(d, "approvals", "list").stdout.strip() == "(no pending approvals)"
    out = cli(d, "approvals", "list", "--state", "redeemed", "--json")
    assert [a["id"] for a in json.loads(out.stdout)] == [approval_id]
    # A decided approval cannot be decided again.
    out = cli(d, "approvals", "deny", approval_id, "--reason", "too late")
    assert out.returncode == 1 and "approval_redeemed" in out.stderr, out.stderr


def test_denied_call_is_refused_with_the_reason(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    hold_every_call(d)
    d.start()
    token = d.user_token("content-api")
    approval_id = held(d)["approval_id"]

    out = cli(d, "approvals", "deny", approval_id)
    assert out.returncode == 2 and "--reason" in out.stderr  # argparse: required
    out = cli(d, "approvals", "deny", approval_id, "--reason", "not during the freeze")
    assert out.returncode == 0, out.stderr
    assert "denied" in out.stdout and "not during the freeze" in out.stdout
    [denied] = d.events_of("approval.denied")
    assert denied["approval_id"] == approval_id and denied["reason"] == "not during the freeze"
    out = cli(d, "approvals", "approve", approval_id)
    assert out.returncode == 1 and "approval_denied" in out.stderr, out.stderr
    out = cli(d, *call_argv(ARGS, "--approval-id", approval_id), token=token)
    assert out.returncode == 1 and "approval_denied" in out.stderr, out.stderr

    # A caller that waits for the verdict learns it as an error naming the reason.
    thread = threading.Thread(target=answer_when_asked, args=(d, "deny", "not today"))
    thread.start()
    with Client(socket_path=d.socket) as client, pytest.raises(AccessDenied) as info, \
            client.tool_call("content-api", "publish_article", user_token=token,
                             agent_id="content-writer", arguments=ARGS, approval_timeout_s=30):
        raise AssertionError("a denied call ran")
    thread.join()
    assert info.value.code == "approval_denied" and "not today" in info.value.message


def answer_when_asked(d: Daemon, verb: str, reason: str | None = None) -> None:
    """An approver polling the CLI: answers the first pending approval it sees."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        out = cli(d, "approvals", "list", "--json")
        found = json.loads(out.stdout) if out.returncode == 0 else []
        if found:
            extra = ["--reason", reason] if reason else []
            assert cli(d, "approvals", verb, found[0]["id"], *extra).returncode == 0
            return
        time.sleep(0.1)


def test_tool_call_waits_for_an_approver_then_runs(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    hold_every_call(d)
    d.start()
    token = d.user_token("content-api")

    thread = threading.Thread(target=answer_when_asked, args=(d, "approve"))
    thread.start()
    with Client(socket_path=d.socket) as client, client.tool_call(
        "content-api", "publish_article", user_token=token, agent_id="content-writer",
        arguments=ARGS, approval_timeout_s=30,
    ) as lease:
        assert lease.secrets["CONTENT_API_KEY"] == d.secrets["content-api/publish-key"]
    thread.join()
    assert len(d.events_of("approval.approved")) == 1
    assert d.wait_events("mcp.tool_call")[0]["result"]["status"] == "success"

    # Nobody answers: ApprovalPending with the id after the wait. That the client did
    # wait is shown by the daemon (a long-poll in progress while the call is blocked),
    # not by the wall clock: a caller parked with a long timeout is seen waiting...
    outcome: list[BaseException] = []

    def parked() -> None:
        with Client(socket_path=d.socket) as client:
            try:
                with client.tool_call("content-api", "publish_article", user_token=token,
                                      agent_id="content-writer", arguments=ARGS,
                                      approval_timeout_s=120):
                    raise AssertionError("a held call ran")
            except (ApprovalPending, AccessDenied) as exc:
                outcome.append(exc)

    thread = threading.Thread(target=parked)
    thread.start()
    assert wait_for_long_poll(d), "the client never waited on the approval"
    assert thread.is_alive() and outcome == []
    # ... and lets go at once when its approval is denied (the thread ends the test's wait).
    [pending_approval] = json.loads(cli(d, "approvals", "list", "--json").stdout)
    assert cli(d, "approvals", "deny", pending_approval["id"], "--reason", "no").returncode == 0
    thread.join(timeout=60)
    assert not thread.is_alive() and isinstance(outcome[0], AccessDenied)
    # A wait that runs out ends in ApprovalPending naming the approval to ask about later.
    with Client(socket_path=d.socket) as client:
        with pytest.raises(ApprovalPending) as info, client.tool_call(
            "content-api", "publish_article", user_token=token, agent_id="content-writer",
            arguments=ARGS, approval_timeout_s=0.5,
        ):
            pass
        assert info.value.approval_id.startswith("apr_")


def wait_for_long_poll(d: Daemon, timeout_s: float = 60) -> bool:
    """True once the daemon reports an approval long-poll in progress (bounded poll)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = d.request("GET", "/v1/status")
        if status == 200 and body["approvals"]["waiting"] > 0:
            return True
        time.sleep(0.05)
    return False


# Approvals the test must still act on (approve, redeem) before they expire live this
# long: a CLI run under load takes seconds, and a TTL of 2-3 s made such steps race it.
# Waiting for the expiry itself costs this much, no more (long-polls, polls).
ACT_WITHIN_S = 15


def test_approvals_expire(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"approvals": {"ttl_seconds": ACT_WITHIN_S}})
    hold_every_call(d)
    d.start()
    token = d.user_token("content-api")
    unanswered = held(d)["approval_id"]
    approved = held(d)["approval_id"]
    assert cli(d, "approvals", "approve", approved).returncode == 0

    # The long-poll returns when the approval expires, not at its own timeout (timed_out).
    status, body = d.request("GET", f"/v1/approvals/{unanswered}/wait?timeout=120", timeout=150)
    assert status == 200 and body["approval"]["state"] == "expired" and not body["timed_out"]
    out = cli(d, "approvals", "approve", unanswered)
    assert out.returncode == 1 and "approval_expired" in out.stderr, out.stderr
    out = cli(d, *call_argv(ARGS, "--approval-id", approved), token=token)
    assert out.returncode == 1 and "approval_expired" in out.stderr, out.stderr
    # The sweeper records each expiry once, with what it was.
    expired = d.wait_events("approval.expired", count=2, timeout=60)  # sweeps every 5 s
    assert sorted((e["approval_id"], e["was"]) for e in expired) == sorted(
        [(unanswered, "pending"), (approved, "approved")])
    out = cli(d, "approvals", "list", "--state", "expired", "--json")
    assert sorted(a["id"] for a in json.loads(out.stdout)) == sorted([unanswered, approved])


def test_requires_approval_above_holds_the_sixth_call_in_the_hour(make_daemon: Any) -> None:
    """Seed: create_article requires_approval_above 5 (and 10 a minute)."""
    d: Daemon = make_daemon(seed_limits=True).start()
    rules = []
    for _ in range(5):
        status, body = d.authorize("content-api", "create_article")
        assert status == 200, body
        rules.append([r for r in body["policy"]["rules_matched"] if r.startswith("approval.")])
    assert rules == [[f"approval.within:{i}/5"] for i in range(1, 6)]
    status, body = d.authorize("content-api", "create_article")
    assert status == 202 and body["decision"] == "pending_approval", body
    assert "beyond requires_approval_above (5)" in body["message"]
    # another user is not held
    status, _ = d.authorize("content-api", "create_article",
                            user_token=d.user_token("content-api", user="bob"))
    assert status == 200
    # the approved sixth call goes through without counting again
    assert cli(d, "approvals", "approve", body["approval_id"]).returncode == 0
    status, ok = d.authorize("content-api", "create_article", approval_id=body["approval_id"])
    assert status == 200, ok


def test_racing_approvers_one_verdict(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    hold_every_call(d)
    d.start()
    approval_id = held(d)["approval_id"]
    results: list[int] = []
    lock = threading.Lock()

    def verdict(i: int) -> None:
        verb = "approve" if i % 2 else "deny"
        status, _ = d.request("POST", f"/v1/approvals/{approval_id}/{verb}", {"reason": f"r{i}"})
        with lock:
            results.append(status)

    threads = [threading.Thread(target=verdict, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [200] + [409] * 11, results
    assert len(d.events_of("approval.approved")) + len(d.events_of("approval.denied")) == 1


def test_approval_survives_kill_and_pending_cap(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"approvals": {"max_pending_per_user": 2}})
    hold_every_call(d)
    d.start()
    first = held(d)["approval_id"]
    held(d, {"article_id": 8})
    status, body = d.authorize("content-api", "publish_article", arguments={"article_id": 9})
    assert status == 429 and body["error"]["code"] == "rate_limited", body
    assert body["error"]["details"]["limit"] == "approvals.max_pending_per_user"
    d.kill()
    d.start()
    assert cli(d, "approvals", "approve", first).returncode == 0
    status, body = d.authorize("content-api", "publish_article", arguments=ARGS, approval_id=first)
    assert status == 200, body


def test_bad_requests(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    hold_every_call(d)
    d.start()
    assert d.request("GET", "/v1/approvals?state=nonsense")[0] == 400
    assert d.request("GET", "/v1/approvals?limit=0")[0] == 400
    status, body = d.request("POST", "/v1/approvals/apr_nope/approve", {})
    assert status == 404 and body["error"]["code"] == "approval_not_found"
    assert d.request("POST", "/v1/approvals/../../etc/approve", {})[0] == 404
    approval_id = held(d)["approval_id"]
    assert d.request("POST", f"/v1/approvals/{approval_id}/x/approve", {"reason": "r"})[0] == 404
    assert d.request("POST", f"/v1/approvals/{approval_id}/x/deny", {"reason": "r"})[0] == 404
    assert d.request("GET", f"/v1/approvals/{approval_id}/wait")[1]["approval"]["state"] == "pending"
    assert d.request("GET", "/v1/approvals/apr_x/wait?timeout=-1")[0] == 400
    assert d.request("GET", "/v1/approvals/apr_x/approve")[0] in (404, 405)
    approval_id = held(d)["approval_id"]
    status, body = d.request("POST", f"/v1/approvals/{approval_id}/deny", {})
    assert status == 400 and body["error"]["code"] == "reason_required"
    status, body = d.request("POST", f"/v1/approvals/{approval_id}/approve", {"extra": 1})
    assert status == 400 and body["error"]["code"] == "invalid_request"
    status, body = d.authorize("content-api", "publish_article", approval_id="not-an-id")
    assert status == 400 and body["error"]["code"] == "invalid_request"


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        length = int(self.headers["content-length"])
        self.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_webhook_notifies_approvers_without_argument_values(make_daemon: Any, tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        d: Daemon = make_daemon({"approvals": {"webhook_url": url}})
        hold_every_call(d)
        d.start()
        approval_id = held(d, {"article_id": 7, "secret_note": "do-not-leak-123"})["approval_id"]
        deadline = time.monotonic() + 10
        while not _Hook.received and time.monotonic() < deadline:
            time.sleep(0.05)
        [notice] = _Hook.received
        assert notice["approval_id"] == approval_id and notice["type"] == "approval.requested"
        assert notice["tool"] == "publish_article" and notice["user"] == "alice"
        assert "arguments" not in notice and "do-not-leak-123" not in json.dumps(notice)
    finally:
        server.shutdown()
        server.server_close()


def test_webhook_must_be_https_or_loopback(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"approvals": {"webhook_url": "http://approvals.example.com/hook"}})
    out = cli(d, "check-config")
    assert out.returncode == 1 and "$.approvals.webhook_url" in out.stderr, out.stderr


def test_conflict_error_type_for_expired(make_daemon: Any) -> None:
    """The client raises ConflictError for an approval that expired while it waited."""
    d: Daemon = make_daemon({"approvals": {"ttl_seconds": 1}})
    hold_every_call(d)
    d.start()
    with Client(socket_path=d.socket) as client, pytest.raises(ConflictError) as info, \
            client.tool_call("content-api", "publish_article",
                             user_token=d.user_token("content-api"),
                             agent_id="content-writer", arguments=ARGS, approval_timeout_s=10):
        pass
    assert info.value.code == "approval_expired"


def test_two_hosts_sharing_redis_share_approvals(make_daemon: Any, tmp_path: Path) -> None:
    """Held on host A, approved with host B's CLI, redeemed once (on A; B refuses a
    second redemption); an expiry is audited by exactly one of the two hosts."""
    import shutil

    from redis_server import RedisServer

    server = RedisServer(tmp_path).start()
    try:
        state = {"state": {"backend": "redis", "redis_url": server.url,
                           "redis_key_prefix": "sk-apr:"},
                 "approvals": {"ttl_seconds": ACT_WITHIN_S}}
        a: Daemon = make_daemon(state)
        b: Daemon = make_daemon(state)
        for d in (a, b):
            hold_every_call(d)
        shutil.copy(a.issuer_jwks, b.issuer_jwks)
        a.start()
        b.start()
        token = a.user_token("content-api")
        approval_id = held(a, user_token=token)["approval_id"]
        out = cli(b, "approvals", "list", "--json")
        assert [x["id"] for x in json.loads(out.stdout)] == [approval_id]
        assert cli(b, "approvals", "approve", approval_id).returncode == 0
        status, body = a.authorize("content-api", "publish_article", arguments=ARGS,
                                   approval_id=approval_id, user_token=token)
        assert status == 200, body
        status, body = b.authorize("content-api", "publish_article", arguments=ARGS,
                                   approval_id=approval_id, user_token=token)
        assert status == 409 and body["error"]["code"] == "approval_redeemed", body

        lapsed = held(b, user_token=token)["approval_id"]
        deadline = time.monotonic() + ACT_WITHIN_S + 60  # a hang guard (sweeps every 5 s)
        while time.monotonic() < deadline:
            expired = a.events_of("approval.expired") + b.events_of("approval.expired")
            if expired:
                break
            time.sleep(0.2)
        # The winner wrote "expired" to the shared store before auditing it: from now on
        # no sweeper on either host lists the approval as live again. (Two sweepers that
        # both listed it live before either wrote are raced deterministically in
        # test_two_hosts_sweeping_at_once_audit_each_expiry_once, without waiting.)
        import redis

        with redis.Redis(host="127.0.0.1", port=server.port) as shared:
            assert shared.hget(f"sk-apr:apr:{lapsed}", "state") == b"expired"
        expired = a.events_of("approval.expired") + b.events_of("approval.expired")
        assert [e["approval_id"] for e in expired] == [lapsed]
    finally:
        server.stop()


class _Meet:
    """Holds each arriving task until ``parties`` have arrived (then lets all through,
    now and later)."""

    def __init__(self, parties: int) -> None:
        self.left = parties
        self.all_here = trio.Event()

    async def arrive(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.all_here.set()
        await self.all_here.wait()


class _ListedTogether:
    """A host's view of the shared store whose approval listing returns only once every
    host has listed: both sweepers see the approvals live before either writes, so the
    race the compare-and-set must settle happens every run, not by chance."""

    def __init__(self, store: Any, meet: _Meet) -> None:
        self._store = store
        self._meet = meet

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def list_approvals(self, *args: Any, **kw: Any) -> Any:
        found = await self._store.list_approvals(*args, **kw)
        await self._meet.arrive()
        return found


class _Sink:
    """An audit sink that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def write(self, event: dict[str, Any], *, durable: bool = True) -> None:
        self.events.append(event)

    async def aclose(self) -> None:
        pass

    def health(self) -> dict[str, Any]:
        return {"ok": True}


async def test_two_hosts_sweeping_at_once_audit_each_expiry_once(tmp_path: Path) -> None:
    """Two hosts' approval desks on one Redis both list three due approvals before
    either expires one; each expiry is written and audited by exactly one of them, and
    a later round by both finds nothing left. Their clocks are injected (two minutes
    ahead), so nothing waits for the approvals to fall due."""
    import datetime

    from redis_server import RedisServer
    from sidekey import approvals
    from sidekey.approval_desk import ApprovalDesk
    from sidekey.audit import AuditLog
    from sidekey.store.redis import RedisStore

    server = RedisServer(tmp_path).start()
    stores: list[RedisStore] = []
    try:
        meet = _Meet(2)
        desks: list[ApprovalDesk] = []
        sinks: list[_Sink] = []
        for _ in range(2):
            store = RedisStore.open(server.url, prefix="sk-apr:", timeout_s=5.0)
            stores.append(store)
            sinks.append(_Sink())
            desks.append(ApprovalDesk(
                store=_ListedTogether(store, meet),  # type: ignore[arg-type]
                audit=AuditLog([sinks[-1]]),
                event=lambda kind, **kw: {"type": kind, **kw},
                config=lambda: None,  # type: ignore[arg-type,return-value]
                clock=lambda: time.time() + 120,  # past the approvals' expiry
            ))
        now = datetime.datetime.now(datetime.UTC)
        lapsed = [approvals.new_approval(server="content-api", tool="publish_article",
                                         user="alice", agent=None, args_digest=f"{n:064x}",
                                         now=now, ttl_s=60) for n in range(3)]
        counts: list[int] = []

        async def sweep(desk: ApprovalDesk) -> None:
            counts.append(await desk.sweep())

        with trio.fail_after(30):  # a hang guard
            for approval in lapsed:
                await stores[0].put_approval(approval)
            async with trio.open_nursery() as nursery:
                for desk in desks:
                    nursery.start_soon(sweep, desk)
            assert meet.all_here.is_set()  # both listed before either wrote
            assert [await desk.sweep() for desk in desks] == [0, 0]
            stored = [await stores[1].get_approval(a.id) for a in lapsed]
        assert sum(counts) == 3
        assert [a.state if a else None for a in stored] == ["expired"] * 3
        audited = [e["extra"]["approval_id"] for sink in sinks for e in sink.events
                   if e["type"] == "approval.expired"]
        assert sorted(audited) == sorted(a.id for a in lapsed)
    finally:
        with trio.move_on_after(10):
            for store in stores:
                await store.aclose()
        server.stop()


def test_the_requesting_uid_cannot_approve_its_own_call(make_daemon: Any) -> None:
    """Four eyes: content-api runs as nobody, and nobody is (wrongly) also an approver.
    It may list and deny its held call but not approve it; another approver uid may."""
    import pwd

    nobody, nobody_gid = pwd.getpwnam("nobody")[2:4]
    other, other_gid = pwd.getpwnam("daemon")[2:4]
    d: Daemon = make_daemon({
        "peers": {"content-api": [{"uid": nobody}]},
        "rbac": {"approver": {"uids": [nobody, other]}},
    })
    hold_every_call(d)
    d.start()

    def request_and_self_approve(dd: Daemon) -> Any:
        status, body = dd.authorize("content-api", "publish_article", arguments=ARGS)
        assert status == 202, body
        approve = dd.request("POST", f"/v1/approvals/{body['approval_id']}/approve", {})
        listed = dd.request("GET", "/v1/approvals")
        return {"id": body["approval_id"], "approve": approve, "listed": listed[0]}

    got = run_as(d, nobody, nobody_gid, request_and_self_approve)
    assert "child_error" not in got, got
    status, body = got["approve"]
    assert status == 403 and body["error"]["code"] == "approval_self_approval", body
    assert got["listed"] == 200
    approved = run_as(d, other, other_gid, lambda dd: list(
        dd.request("POST", f"/v1/approvals/{got['id']}/approve", {"reason": "checked"})))
    assert approved[0] == 200, approved
    assert "uid 1" in approved[1]["approval"]["decided_by"]
    [event] = d.events_of("approval.approved")
    assert event["peer"]["uid"] == other
