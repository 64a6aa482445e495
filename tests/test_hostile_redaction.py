"""Issue 9 item 15: audit redaction covers the common spellings of secrets.

Pure unit tests of :mod:`sidekey.audit.events` (no daemon), then one real daemon that
authorizes a call carrying every spelling (nested, in header lists) and a grep of the
audit file and the approvals list for the values.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest

from harness import BOTH_LOG_FORMATS, Daemon
from sidekey.audit.events import REDACTED, make_event, redact, sensitive_key
from sidekey.audit.hmackey import ValueHasher, load_key
from test_approvals_daemon import hold_every_call

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)

# Every spelling the issue names, and more: each must be redacted with the defaults.
SENSITIVE_KEYS = [
    "password", "Password", "PASSWORD", "db_password", "passwd", "pwd", "DB_PWD", "pw",
    "db_pass", "passphrase", "passcode", "auth", "x-auth", "basic_auth", "authHeader",
    "oauth", "cookie", "Cookie", "set-cookie", "Set-Cookie", "cookies", "dsn", "sentry_dsn",
    "SENTRY_DSN", "token", "access_token", "refresh_token", "session_token", "idToken",
    "jwt", "bearer", "secret", "client_secret", "clientSecret", "secrets", "api_key",
    "apiKey", "APIKey", "x-api-key", "X-API-KEY", "private_key", "privateKey",
    "credentials", "credential", "creds", "authorization", "Authorization",
    "proxy-authorization", "Proxy-Authorization", "connection_string", "connectionString",
    "conn_str", "connstr", "pin", "otp", "cvv",
    "\uff50\uff41\uff53\uff53\uff57\uff4f\uff52\uff44",  # full-width "password" (NFKC)
]
# Keys that merely look alike: must stay readable (over-redaction hides the call's
# meaning from approvers and auditors).
PLAIN_KEYS = ["author", "authority", "title", "channel", "article_id", "passenger",
              "compass", "dsname", "ads_network", "spinner", "pinned", "description"]


@pytest.mark.parametrize("key", SENSITIVE_KEYS)
def test_default_spellings_are_sensitive(key: str) -> None:
    assert sensitive_key(key, ())
    out = redact({"outer": {"list": [{key: "v4lue-in-clear"}]}}, [])
    assert out == {"outer": {"list": [{key: REDACTED}]}}


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_lookalikes_stay_readable(key: str) -> None:
    assert not sensitive_key(key, ())
    assert redact({key: "x"}, []) == {key: "x"}


def test_defaults_cannot_be_switched_off_and_configured_keys_add_normalised() -> None:
    """An operator who sets ``redact_keys: [ssn]`` adds to the built-in list; their
    entries match in any spelling (``ssn`` matches ``customer-SSN``)."""
    args = {"password": "p", "customer-SSN": "123", "Body_Markdown": "text", "title": "t"}
    assert redact(args, ["ssn"]) == {"password": REDACTED, "customer-SSN": REDACTED,
                                     "Body_Markdown": "text", "title": "t"}
    assert redact(args, ["ssn"], ["body_markdown"])["Body_Markdown"] == REDACTED


def test_header_lists_and_name_value_objects() -> None:
    args = {
        "headers": [["Authorization", "Bearer abc"], ["Accept", "application/json"],
                    ("Cookie", "sid=1"), ["X-Api-Key", {"nested": "k"}]],
        "header_objects": [{"name": "Authorization", "value": "Bearer def"},
                           {"Name": "Set-Cookie", "Value": "sid=2"},
                           {"key": "proxy-authorization", "value": "Basic ghi"},
                           {"name": "Accept", "value": "text/plain"}],
        "raw_headers": ["Authorization: Bearer jkl", "Accept: */*"],
        "argv": ["psql", "--password", "mno", "--dsn=postgres://u:pqr@db/x", "-v"],
        "url": "postgres://user:stu@db.example:5432/app",
        "pair": ["password", "vwx"],
    }
    out = redact(args, [])
    text = json.dumps(out)
    for value in ("abc", "sid=1", "def", "sid=2", "ghi", "jkl", "mno", "pqr", "stu", "vwx",
                  '"k"'):
        assert value not in text, (value, text)
    assert out["headers"][0] == ["Authorization", REDACTED]
    assert out["headers"][1] == ["Accept", "application/json"]
    assert out["header_objects"][0] == {"name": "Authorization", "value": REDACTED}
    assert out["header_objects"][3] == {"name": "Accept", "value": "text/plain"}
    assert out["raw_headers"] == [f"Authorization: {REDACTED}", "Accept: */*"]
    assert out["argv"][:3] == ["psql", "--password", REDACTED] and out["argv"][-1] == "-v"
    assert out["url"] == f"postgres://user:{REDACTED}@db.example:5432/app"


def test_make_event_applies_the_tool_fields_of_its_tool_only() -> None:
    fields = {"create_article": ["body_markdown"]}
    args = {"body_markdown": "draft", "title": "t"}
    ev = make_event("mcp.authorize", host="h", now=NOW, tool="create_article", arguments=args,
                    redact_keys=[], redact_tool_fields=fields)
    assert ev["arguments"] == {"body_markdown": REDACTED, "title": "t"}
    ev = make_event("mcp.authorize", host="h", now=NOW, tool="publish_article",
                    arguments=args, redact_keys=[], redact_tool_fields=fields)
    assert ev["arguments"] == args


def test_without_a_hasher_the_plain_marker() -> None:
    """Without an HMAC key (the approvals list, library callers) values are replaced by
    the plain marker; the input is not modified, odd values are not repr'ed."""
    args = {"tokens": ["a", "b"], "obj": object(), "n": {"API_Key": "k"}}
    out = redact(args, [])
    assert out == {"tokens": REDACTED, "obj": "[object]", "n": {"API_Key": REDACTED}}
    assert args["n"] == {"API_Key": "k"}


def test_hostile_key_names_are_cheap_and_safe() -> None:
    """Huge or many distinct key names: classified (not cached past the cap), no error."""
    args = {("k" * 100_000) + "x": 1, **{f"f{i}": i for i in range(10_000)}}
    out = redact(args, [])
    assert out.get("_truncated") is True  # too big to keep, as before


# --------------------------------------------------------------------------- real daemon

SECRETS = {f"S3CR3T-{i:02d}-value" for i in range(40)}
BODY = "the article body, a tool field of publish_article only"


def hostile_arguments() -> dict[str, Any]:
    values = iter(sorted(SECRETS))
    return {
        "title": "a normal title",
        "passwd": next(values), "pwd": next(values), "auth": next(values),
        "cookie": next(values), "dsn": next(values), "token": next(values),
        "secret": next(values),
        "deep": {"list": [{"nested": {"apiKey": next(values), "x-api-key": next(values),
                                      "client_secret": next(values)}}]},
        "oauth": {"access_token": next(values), "refresh_token": next(values),
                  "session_token": next(values)},
        "set-cookie": next(values), "private_key": next(values),
        "credentials": next(values), "db": {"user": "svc", "pass": next(values)},
        "proxy-authorization": next(values), "connection_string": next(values),
        "conn_str": next(values),
        "headers": [["Authorization", "Bearer " + next(values)],
                    ["Accept", "application/json"]],
        "header_objects": [{"name": "Authorization", "value": next(values)}],
        "raw": ["Cookie: " + next(values)],
        "database_url": f"postgres://app:{next(values)}@db:5432/app",
        "body_markdown": BODY,
    }


@pytest.mark.integration
@pytest.mark.timeout(120)
@BOTH_LOG_FORMATS
def test_no_secret_spelling_reaches_the_audit_file(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"audit": {"redact_tool_fields": {"publish_article": ["body_markdown"]}}})
    hold_every_call(d)
    d.start()
    args = hostile_arguments()
    status, body = d.authorize("content-api", "create_article", arguments=args)
    assert status == 200, body
    status, body = d.authorize("content-api", "publish_article", arguments=args)
    assert status == 202, body
    status, listed = d.request("GET", "/v1/approvals")
    assert status == 200, listed
    d.wait_events("mcp.authorize", 1)
    assert d.stop(timeout=30) == 0  # everything flushed
    written = d.audit_path.read_text()
    # The daemon's own log (debug level, each log.format) neither.
    logged = d.log()
    leaked = sorted(s for s in SECRETS if s in written or s in json.dumps(listed) or s in logged)
    assert leaked == [], leaked
    assert "a normal title" in written  # arguments are there, only the secrets are not
    events = [json.loads(line) for line in written.splitlines()]
    [authorized] = [e for e in events
                    if e["event_type"] == "mcp.authorize" and e["tool"] == "create_article"]
    # Not a tool field of create_article: in clear there; publish_article hides it.
    assert authorized["arguments"]["body_markdown"] == BODY
    # In audit: the value's HMAC under the host's audit key (schema 3, issue 12 item 5).
    hasher = ValueHasher(load_key(d.root / "state" / "audit-hmac.key", None))
    assert authorized["arguments"]["db"] == {"user": "svc", "pass": hasher.digest(
        args["db"]["pass"])}
    held = [e for e in events if e["tool"] == "publish_article" and e.get("arguments")]
    assert held and all(e["arguments"]["body_markdown"] == hasher.digest(BODY) for e in held)
    # Approvers see the plain marker (an HMAC there would only help them guess).
    [shown] = listed["approvals"]
    assert shown["arguments"]["body_markdown"] == REDACTED
