"""Issue 9 item 4: four eyes must compare people, not only uids.

The requesting MCP server runs as nobody; the approvers run as ``daemon`` (uid 1) and
``bin`` (uid 2), both in the approver tier. The held call is made for OAuth2 subject
``alice`` (the harness's default user token). Comparing uids alone let the person the
call is for approve it from their approver account; ``approvals.approver_identities``
says who each approver account is, and the approver's own user name counts too.
"""

from __future__ import annotations

import datetime
import pwd
from typing import Any

import pytest

from harness import Daemon, run_as
from sidekey import approvals
from sidekey.approvals import new_approval, self_approval
from test_approvals_daemon import ARGS, hold_every_call

NOBODY, NOBODY_GID = pwd.getpwnam("nobody")[2:4]
DAEMON, DAEMON_GID = pwd.getpwnam("daemon")[2:4]
BIN, BIN_GID = pwd.getpwnam("bin")[2:4]


def approvers_daemon(make_daemon: Any, identities: dict[str, list[str]] | None) -> Daemon:
    overrides: dict[str, Any] = {
        "peers": {"content-api": [{"uid": NOBODY}]},
        "rbac": {"approver": {"uids": [DAEMON, BIN]}},
    }
    if identities is not None:
        overrides["approvals"] = {"approver_identities": identities}
    d: Daemon = make_daemon(overrides)
    hold_every_call(d)
    return d.start()


def hold_as_nobody(d: Daemon, token: str | None = None) -> str:
    """The MCP server (nobody) asks for a call that is held; the approval id."""
    extra = {} if token is None else {"user_token": token}

    def ask(dd: Daemon) -> Any:
        return list(dd.authorize("content-api", "publish_article", arguments=ARGS, **extra))

    status, body = run_as(d, NOBODY, NOBODY_GID, ask)
    assert status == 202 and body["decision"] == "pending_approval", body
    approval_id: str = body["approval_id"]
    return approval_id


def decide_as(d: Daemon, uid: int, gid: int, approval_id: str, verb: str = "approve",
              reason: str = "looked at it") -> tuple[int, dict[str, Any]]:
    got = run_as(d, uid, gid, lambda dd: list(
        dd.request("POST", f"/v1/approvals/{approval_id}/{verb}", {"reason": reason})))
    assert "child_error" not in got, got
    return got[0], got[1]


def state_of(d: Daemon, approval_id: str) -> str:
    status, body = d.request("GET", "/v1/approvals?state=all")
    assert status == 200, body
    [found] = [a for a in body["approvals"] if a["id"] == approval_id]
    state: str = found["state"]
    return state


def rejections(d: Daemon, code: str) -> list[dict[str, Any]]:
    return [e for e in d.events_of("request.rejected") if e.get("error", {}).get("code") == code]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_an_approver_mapped_to_the_calls_user_cannot_approve_it(make_daemon: Any) -> None:
    """The attack: alice's approver account (uid 1, user ``daemon``) approves the call
    made for alice. Refused 403 approval_self_approval, audited, still pending; another
    approver (uid 2) approves it."""
    d = approvers_daemon(make_daemon, {"daemon": ["alice", "alice@example.com"]})
    approval_id = hold_as_nobody(d)

    status, body = decide_as(d, DAEMON, DAEMON_GID, approval_id)
    assert status == 403 and body["error"]["code"] == "approval_self_approval", body
    assert "alice" in body["error"]["message"]
    [event] = rejections(d, "approval_self_approval")
    assert event["peer"]["uid"] == DAEMON and approval_id in event["path"]
    assert event["error"]["status"] == 403
    assert state_of(d, approval_id) == approvals.PENDING
    assert d.events_of("approval.approved") == []

    # Denying is still open to alice's account: it cannot make her call run.
    other_id = hold_as_nobody(d)
    status, body = decide_as(d, DAEMON, DAEMON_GID, other_id, "deny", "not mine to run")
    assert status == 200 and body["approval"]["state"] == "denied", body

    status, body = decide_as(d, BIN, BIN_GID, approval_id)
    assert status == 200 and body["approval"]["state"] == "approved", body
    [approved] = d.events_of("approval.approved")
    assert approved["peer"]["uid"] == BIN and approved["user_id"] == "alice"
    # The approved call runs (for alice, presented by the server that asked).
    status, body = run_as(d, NOBODY, NOBODY_GID, lambda dd: list(dd.authorize(
        "content-api", "publish_article", arguments=ARGS, approval_id=approval_id)))
    assert status == 200 and body["decision"] == "allow", body


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_mapping_by_uid_and_case_insensitive_user_ids(make_daemon: Any) -> None:
    """``uid:N`` keys name an approver without a passwd entry; the user id matches
    whatever case the token's subject uses."""
    d = approvers_daemon(make_daemon, {f"uid:{BIN}": ["Alice"]})
    approval_id = hold_as_nobody(d)
    status, body = decide_as(d, BIN, BIN_GID, approval_id)
    assert status == 403 and body["error"]["code"] == "approval_self_approval", body
    status, body = decide_as(d, DAEMON, DAEMON_GID, approval_id)
    assert status == 200, body


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_an_approver_cannot_approve_a_call_made_for_their_own_user_name(
    make_daemon: Any,
) -> None:
    """Without any mapping: the approver's unix user name (``daemon``) is one of the user
    ids they are known as, so a call made for subject ``daemon`` is not theirs to
    approve. (Red on the code before item 4: it compared uids only.)"""
    d = approvers_daemon(make_daemon, None)
    token = d.user_token("content-api", user="daemon")
    approval_id = hold_as_nobody(d, token)
    status, body = decide_as(d, DAEMON, DAEMON_GID, approval_id)
    assert status == 403 and body["error"]["code"] == "approval_self_approval", body
    assert len(rejections(d, "approval_self_approval")) == 1
    assert state_of(d, approval_id) == approvals.PENDING
    status, body = decide_as(d, BIN, BIN_GID, approval_id)
    assert status == 200, body


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_owner_is_not_excepted_from_the_user_id_rule(make_daemon: Any) -> None:
    """The owner (root here: the daemon's uid) may approve a call its own uid asked for
    (the uid rule's exception), but not one made for a person it is mapped to: to
    do that it would have to change the mapping first, visibly (config.reloaded)."""
    d: Daemon = make_daemon({"approvals": {"approver_identities": {"root": ["alice"]}}})
    hold_every_call(d)
    d.start()
    status, body = d.authorize("content-api", "publish_article", arguments=ARGS)
    assert status == 202, body
    status, body = d.request("POST", f"/v1/approvals/{body['approval_id']}/approve", {})
    assert status == 403 and body["error"]["code"] == "approval_self_approval", body


# --------------------------------------------------------------------------- pure rule

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def held(user: str, requested_uid: int | None = 65534) -> approvals.Approval:
    return new_approval(server="s", tool="t", user=user, agent=None, args_digest="d",
                        now=NOW, requested_uid=requested_uid)


@pytest.mark.parametrize(("user", "approver_uid", "approver_user", "identities", "owner", "refused"), [
    ("alice", 1001, "bob", {}, False, False),
    ("alice", 1001, "alice", {}, False, True),  # own user name
    ("local:alice", 1001, "alice", {}, False, True),  # sidekey's id for a local user
    ("uid:1001", 1001, None, {}, False, True),  # ... or for a uid without a name
    ("alice", 1001, "bob", {"bob": ["alice@example.com", "alice"]}, False, True),
    ("ALICE@example.com", 1001, "bob", {"bob": ["alice@example.com"]}, False, True),
    ("alice", 1001, None, {"uid:1001": ["alice"]}, False, True),
    ("alice", 1001, "bob", {"carol": ["alice"]}, False, False),
    ("alice", 65534, "nobody", {}, False, True),  # the requesting uid (existing rule)
    ("alice", 65534, "nobody", {}, True, False),  # ... which excepts the owner
    ("alice", 0, "root", {"root": ["alice"]}, True, True),  # the user-id rule does not
    ("root", 0, "root", {}, True, True),  # ... nor the user name
    ("local:root", 0, "root", {}, True, False),  # the owner's own account: the uid rule
    ("local:root", 0, "root", {"root": ["local:root"]}, True, True),  # unless mapped
])
def test_self_approval_rule(user: str, approver_uid: int, approver_user: str | None,
                            identities: dict[str, list[str]], owner: bool, refused: bool) -> None:
    why = self_approval(held(user), approver_uid=approver_uid, approver_user=approver_user,
                        identities=identities, owner=owner)
    assert (why is not None) == refused, why
