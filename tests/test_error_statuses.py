"""Issue 10, item 6: every error class fixes its own HTTP status.

No code sets ``status`` on an error instance after construction (it used to, in nine
places: a 405 picked by comparing code strings, ``err.status = 500``, a plain
SidekeyError given 400 where BadRequest exists, ...). Where the status is data (a
policy decision, a framing error) the class is picked from
:data:`sidekey.protocol.ERROR_CLASS_BY_STATUS`. The wire is unchanged: the daemon test
at the end checks status, code and audited status of the refusals whose errors moved to
the new classes and that no other test pins (405, 431, 501).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import sidekey
from harness import Daemon
from sidekey import protocol, quotas
from sidekey.daemon.context import _denial
from sidekey.oauth import AudienceMismatch
from sidekey.policy import Decision
from sidekey.protocol import SidekeyError, TokenError

SRC = Path(sidekey.__file__).parent

FIXED = [
    (protocol.BadRequest, 400, "bad_request"),
    (protocol.TokenError, 401, "token_invalid"),
    (protocol.Denied, 403, "denied"),
    (protocol.NotFound, 404, "not_found"),
    (protocol.MethodNotAllowed, 405, "method_not_allowed"),
    (protocol.RequestTimeout, 408, "request_timeout"),
    (protocol.Conflict, 409, "conflict"),
    (protocol.TooLarge, 413, "body_too_large"),
    (protocol.Unprocessable, 422, "unprocessable"),
    (protocol.TooManyRequests, 429, "rate_limited"),
    (protocol.HeadersTooLarge, 431, "headers_too_large"),
    (protocol.Internal, 500, "internal"),
    (protocol.Unsupported, 501, "not_implemented"),
    (protocol.Unavailable, 503, "unavailable"),
    (protocol.BadGateway, 502, "bad_gateway"),
    (protocol.GatewayTimeout, 504, "gateway_timeout"),
]


@pytest.mark.parametrize(("cls", "status", "code"), FIXED, ids=[c.__name__ for c, _, _ in FIXED])
def test_each_class_fixes_its_status(cls: type[SidekeyError], status: int, code: str) -> None:
    assert cls.status == status and cls.code == code
    err = cls("m", code="other", extra=1)
    assert (err.status, err.code, err.message, err.details) == (status, "other", "m", {"extra": 1})
    assert protocol.ERROR_CLASS_BY_STATUS[status] is cls


def _all_error_classes() -> set[type[SidekeyError]]:
    for mod in pkgutil.walk_packages([str(SRC)], prefix="sidekey."):
        if not mod.name.endswith("__main__"):  # that one runs the CLI
            importlib.import_module(mod.name)
    found: set[type[SidekeyError]] = set()
    todo = [SidekeyError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("sidekey.") and sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def test_every_status_a_class_fixes_has_a_class_for_data_driven_statuses() -> None:
    """A denial carries the status of whatever error stopped the call (approval errors,
    backend errors, ...): each such status must map to a class, or _denial would fail."""
    classes = _all_error_classes()
    assert len(classes) >= len(FIXED)
    missing = {c.__qualname__: c.status for c in classes if c.status not in protocol.ERROR_CLASS_BY_STATUS}
    assert not missing


def test_error_for_status() -> None:
    err = protocol.error_for_status(429, "slow down", code="rate_limited", retry_after_s=2.0)
    assert type(err) is protocol.TooManyRequests
    assert (err.status, err.code, err.message, err.details) == (
        429, "rate_limited", "slow down", {"retry_after_s": 2.0})
    with pytest.raises(ValueError, match="418"):
        protocol.error_for_status(418, "teapot", code="teapot")


def test_no_status_assigned_after_construction() -> None:
    """Only a constructor may set ``self.status`` (client.py's SidekeyClientError)."""
    offenders: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]:
            for node in ast.walk(func):
                targets: list[ast.expr] = []
                if isinstance(node, ast.Assign):
                    targets = list(node.targets)
                elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                    targets = [node.target]
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                      and node.func.id == "setattr" and len(node.args) >= 2
                      and isinstance(node.args[1], ast.Constant) and node.args[1].value == "status"):
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} setattr")
                for t in targets:
                    if isinstance(t, ast.Attribute) and t.attr == "status":
                        own = isinstance(t.value, ast.Name) and t.value.id == "self"
                        if not (own and func.name == "__init__"):
                            offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders


def _decision(status: int, code: str | None, **details: object) -> Decision:
    return Decision(outcome="deny", rules_matched=("r",), user_id="u", code=code,
                    message="no", status=status, details=details)


@pytest.mark.parametrize(
    ("status", "cls"),
    [(401, protocol.TokenError), (403, protocol.Denied), (404, protocol.NotFound),
     (409, protocol.Conflict), (429, protocol.TooManyRequests), (503, protocol.Unavailable)],
)
def test_denial_takes_the_class_of_the_decisions_status(status: int, cls: type[SidekeyError]) -> None:
    err = _denial(_decision(status, "some_code", retry_after_s=1.5))
    assert type(err) is cls
    assert (err.status, err.code, err.message, err.details) == (
        status, "some_code", "no", {"retry_after_s": 1.5})


def test_denial_without_a_code_keeps_the_old_defaults() -> None:
    assert _denial(_decision(404, None)).code == "not_found"
    assert _denial(_decision(401, None)).code == "denied"


def test_denial_of_a_status_no_class_fixes_fails_closed() -> None:
    with pytest.raises(ValueError):
        _denial(_decision(418, "teapot"))


def test_quota_denial_errors() -> None:
    too_many = quotas.QuotaDenial(code="rate_limited", message="m", status=429, limit="l",
                                  details={"retry_after_s": 1.0}).to_error()
    assert type(too_many) is protocol.TooManyRequests and too_many.status == 429
    overloaded = quotas.QuotaDenial(code="overloaded", message="m", status=503, limit="l").to_error()
    assert type(overloaded) is protocol.Unavailable
    assert (overloaded.status, overloaded.code) == (503, "overloaded")


def test_audience_mismatch_is_a_403_token_error() -> None:
    err = AudienceMismatch("wrong audience", code="audience_mismatch")
    assert isinstance(err, TokenError)  # audited as token.rejected, like every token error
    assert (err.status, err.code) == (403, "audience_mismatch")
    assert TokenError("x").status == 401


def _status_line(resp: bytes) -> bytes:
    return resp.split(b"\r\n", 1)[0]


def test_wire_statuses_of_moved_errors(daemon: Daemon) -> None:
    """405, 431 and 501 on the wire and in the audit record, as before the change."""
    status, body = daemon.request("GET", "/v1/authorize", timeout=10)
    assert status == 405 and body["error"]["code"] == "method_not_allowed", body

    big = b"GET /v1/health HTTP/1.1\r\nhost: s\r\nx-pad: " + b"a" * 70_000 + b"\r\n\r\n"
    resp = daemon.raw(big, timeout=10)
    assert _status_line(resp).startswith(b"HTTP/1.1 431"), resp[:200]
    assert b'"code":"headers_too_large"' in resp

    # Two Transfer-Encoding headers: refused with 501 (an unsupported transfer coding).
    te = (b"POST /v1/authorize HTTP/1.1\r\nhost: s\r\ntransfer-encoding: chunked\r\n"
          b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n")
    resp = daemon.raw(te, timeout=10)
    assert _status_line(resp).startswith(b"HTTP/1.1 501"), resp[:200]
    assert b'"code":"bad_http"' in resp

    daemon.wait_events("request.rejected", 3, timeout=10)
    audited = {(e["error"]["code"], e["error"]["status"]) for e in daemon.events_of("request.rejected")}
    assert {("method_not_allowed", 405), ("headers_too_large", 431), ("bad_http", 501)} <= audited
