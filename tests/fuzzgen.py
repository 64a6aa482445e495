"""The daemon fuzzer's generator and clients, shared by tests/test_fuzz_daemon.py and
benchmarks/bench_fuzz.py.

Each *case* is the bytes one connection sends (one request or several pipelined), and
how it ends: read every response after a half-close (``SHUT_WR``), or close abruptly
without reading. The mix, drawn from a seeded ``random.Random``:

- malformed HTTP: bad request lines, bad header names and values, obs-fold, NULs,
  conflicting or non-numeric Content-Length, Content-Length with Transfer-Encoding,
  bad chunked framing, invalid UTF-8 in the path and body, oversized heads and bodies;
- JSON for every endpoint (authorize, redeem, release, tokens, rotate, approvals,
  reload) with wrong types in each field, unknown and missing fields, deep nesting
  (up to 100,000 levels), huge strings and numbers, invalid UTF-8, truncated JSON;
- pipelining (up to 16 requests per connection), half-closed connections in the middle
  of a request, abrupt closes with unread responses; a few valid call flows (authorize,
  redeem, release) so the success paths are exercised under the same load.

Clients are forked processes (root or another uid, e.g. nobody); each returns counts
of response statuses and of connections that ended without a response, by case kind,
and every 5xx it saw (status, case kind, the first bytes sent).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Kinds whose connection may end without any response: the client stops sending in the
# middle of a request (the server sees EOF and closes) or does not read at all.
SILENT_OK = frozenset({"half_close_mid_request", "abrupt_close", "abrupt_after_send"})
# Statuses a request may legitimately get; anything else (any 500 above all) is a finding.
EXPECTED_STATUSES = frozenset(
    {200, 202, 400, 401, 403, 404, 405, 408, 409, 411, 413, 422, 429, 431, 501, 503, 505})
SOCKET_TIMEOUT_S = 15.0


@dataclass(slots=True)
class Case:
    kind: str
    data: bytes
    requests: int = 1  # HTTP requests in ``data`` (pipelined)
    abrupt: bool = False  # close right after sending, read nothing


@dataclass(slots=True)
class Context:
    """What a client may put in valid-looking requests (strings only: fork-safe)."""

    user_tokens: dict[str, str] = field(default_factory=dict)
    approval_id: str = "apr_fuzz0000"


# --------------------------------------------------------------------------- HTTP pieces


def request(method: bytes, target: bytes, body: bytes | None = None, *,
            headers: list[tuple[bytes, bytes]] | None = None, version: bytes = b"HTTP/1.1",
            content_length: bool = True) -> bytes:
    head = [method + b" " + target + b" " + version, b"host: sidekey"]
    for k, v in headers or []:
        head.append(k + b": " + v)
    if body is not None and content_length:
        head.append(b"content-type: application/json")
        head.append(b"content-length: " + str(len(body)).encode())
    return b"\r\n".join(head) + b"\r\n\r\n" + (body or b"")


WRONG_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, 10**300, 1.5, -0.0, 1e308,
    "", " ", "x" * 300, "x" * 70_000, "\u0000", "\ud800", "é\u202e", "../../etc/passwd", "%00%ff",
    [], {}, [1, "a", None], {"a": {"b": [1]}}, ["x" * 10] * 100, "apr_" + "A" * 64, "lse_x",
]


def nested(depth: int, *, objects: bool = False) -> str:
    """A placeholder for JSON nested ``depth`` levels (json.dumps itself would recurse):
    :func:`dumps` puts the raw text in its place."""
    return f"__DEEP_{depth}_{int(objects)}__"


_DEEP = re.compile(rb'"__DEEP_(\d+)_([01])__"')


def _deep_text(depth: int, objects: bool) -> bytes:
    if not objects:
        return b"[" * depth + b"1" + b"]" * depth
    return b'[{"k":' * (depth // 2) + b"1" + b"}]" * (depth // 2)


def dumps(value: Any) -> bytes:
    text = json.dumps(value).encode()
    return _DEEP.sub(lambda m: _deep_text(int(m[1]), m[2] == b"1"), text)


def deep_json(depth: int) -> bytes:
    return b'{"a":' * (depth // 2) + b"1" + b"}" * (depth // 2)


class Generator:
    def __init__(self, rng: random.Random, ctx: Context) -> None:
        self.rng = rng
        self.ctx = ctx

    # -- bodies ------------------------------------------------------------------------

    def arguments(self) -> Any:
        r = self.rng.random()
        if r < 0.5:
            return {"title": "hello", "n": self.rng.randint(0, 10)}
        if r < 0.6:
            return {"deep": nested(self.rng.choice([31, 32, 33, 40, 200, 1000]))}
        if r < 0.7:
            return {"big": "x" * self.rng.choice([1_000, 33_000, 120_000])}
        if r < 0.8:
            return {"n": self.rng.choice([10**30, 2**64, -(2**70), 1e308, 0.1])}
        return self.rng.choice(WRONG_VALUES)

    def template(self, endpoint: str) -> dict[str, Any]:
        token = self.ctx.user_tokens.get("content-api", "x.y.z")
        if endpoint == "authorize":
            return {"server": "content-api", "tool": self.rng.choice(
                        ["create_article", "list_articles", "nope", "delete_record"]),
                    "agent_id": "content-writer", "session_id": "fuzz",
                    "user_token": token, "arguments": self.arguments()}
        if endpoint == "redeem":
            return {"resolution_token": self.rng.choice(["a.b.c", token, "x" * 9000,
                                                         "eyJ.eyJ.sig"]),
                    "arguments": self.arguments()}
        if endpoint == "release":
            return {"lease_id": "lse_" + os.urandom(8).hex(), "status": "success",
                    "duration_ms": 5, "result_size_bytes": 10, "error": "e"}
        if endpoint == "tokens":
            return {"server": "content-api", "tool": "list_articles", "user": "fuzz",
                    "agent_id": "content-writer", "session_id": "s", "arguments": self.arguments(),
                    "ttl_seconds": 60}
        if endpoint == "rotate":
            return {"generate": 32, "backend": "local", "revoke_leases": False}
        return {"reason": "fuzz"}  # approvals approve/deny

    def mutate(self, body: dict[str, Any]) -> dict[str, Any] | Any:
        rng = self.rng
        for _ in range(rng.randint(1, 3)):
            op = rng.random()
            if op < 0.45 and body:
                body[rng.choice(list(body))] = rng.choice(WRONG_VALUES)
            elif op < 0.6 and body:
                body.pop(rng.choice(list(body)))
            elif op < 0.7:
                body[rng.choice(["extra", "Server", "", "\u0000"])] = 1
            elif op < 0.8 and body:
                body[rng.choice(list(body))] = nested(rng.choice([2, 40, 5000]), objects=True)
        if rng.random() < 0.05:
            return rng.choice(WRONG_VALUES)  # not even an object
        return body

    def json_body(self, endpoint: str) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.06:
            return deep_json(rng.choice([100, 1_000, 20_000, 200_000]))
        if r < 0.09:
            return b"[" * rng.choice([40, 1_000, 100_000])
        if r < 0.12:
            return rng.choice([b"", b"{", b"nul", b"{}", b"[]", b'{"a":1,"a":2}', b"\xff\xfe{}",
                               b'{"server": "\xff\xfe"}', b"1" * 5000, b'"\\ud800"'])
        body = dumps(self.mutate(self.template(endpoint)))
        if rng.random() < 0.05:
            cut = rng.randint(0, len(body))
            body = body[:cut] + rng.choice([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\x00"]) + body[cut:]
        if rng.random() < 0.03:
            body = body[: rng.randint(0, len(body))]
        return body

    def endpoint_request(self) -> bytes:
        rng = self.rng
        endpoint = rng.choice(["authorize", "authorize", "redeem", "release", "tokens", "rotate",
                               "approve", "deny", "wait", "list", "status", "health", "reload",
                               "unknown"])
        if endpoint == "authorize":
            return request(b"POST", b"/v1/authorize", self.json_body("authorize"))
        if endpoint in ("redeem", "release", "tokens"):
            return request(b"POST", b"/v1/" + endpoint.encode(), self.json_body(endpoint))
        if endpoint == "rotate":
            name = rng.choice([b"fuzz-nothing", b"%zz%ff", b"%2e%2e%2f", b"\xff\xfe", b"a" * 2000,
                               b"%00", b"content-api%2Fnope"])
            return request(b"POST", b"/v1/admin/secrets/" + name + b"/rotate",
                           self.json_body("rotate"))
        if endpoint in ("approve", "deny"):
            ident = rng.choice([self.ctx.approval_id.encode(), b"apr_", b"x", b"apr_%ff",
                                b"apr_" + b"A" * 70, b"\xff"])
            return request(b"POST", b"/v1/approvals/" + ident + b"/" + endpoint.encode(),
                           self.json_body("approve"))
        if endpoint == "wait":
            query = rng.choice([b"timeout=0", b"timeout=nan", b"timeout=-1", b"timeout=1e999",
                                b"timeout=%ff", b"timeout=" + b"9" * 5000, b""])
            return request(b"GET", b"/v1/approvals/apr_fuzz" + os.urandom(3).hex().encode()
                           + b"/wait?" + query)
        if endpoint == "list":
            query = rng.choice([b"state=pending", b"state=all&limit=1", b"limit=0",
                                b"limit=" + b"9" * 5000, b"limit=%ff&state=%zz", b"state=\xff",
                                b"&&&==&", b"limit=1e3", b"state=" + b"x" * 3000])
            return request(b"GET", b"/v1/approvals?" + query)
        if endpoint == "status":
            return request(b"GET", b"/v1/status")
        if endpoint == "health":
            return request(b"GET", b"/v1/health")
        if endpoint == "reload":
            # Never an empty body: a real reload is not what is being fuzzed here.
            return request(b"POST", b"/v1/admin/reload", b'{"x": 1}')
        target = rng.choice([b"/", b"/v1", b"/v1/authorize/", b"/v1/%ff", b"/\xff\xfe",
                             b"/v1/authorize", b"/v1/health", b"/v1/status", b"/v1/approvals",
                             b"/v1/" + b"a" * 8000, b"*", b"http://x/v1/health", b"/v1/health?\xff"])
        return request(rng.choice([b"GET", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"POST"]),
                       target, rng.choice([None, b"{}"]))

    def malformed_http(self) -> bytes:
        rng = self.rng
        ok = b"/v1/health"
        choices: list[Callable[[], bytes]] = [
            lambda: os.urandom(rng.randint(1, 200)) + b"\r\n\r\n",
            lambda: b"GET\r\n\r\n",
            lambda: b"GET " + ok + b"\r\n\r\n",
            lambda: b"GET " + ok + b" HTTP/9.9\r\n\r\n",
            lambda: b"GET " + ok + b" HTTP/1.1 extra\r\n\r\n",
            lambda: b"G\x00T " + ok + b" HTTP/1.1\r\nhost: x\r\n\r\n",
            lambda: b"GET " + ok + b" HTTP/1.1\r\nno-colon-here\r\n\r\n",
            lambda: b"GET " + ok + b" HTTP/1.1\r\nbad name: v\r\n\r\n",
            lambda: b"GET " + ok + b" HTTP/1.1\r\nhost : v\r\n\r\n",
            lambda: b"GET " + ok + b" HTTP/1.1\r\nx: a\r\n folded\r\n\r\n",
            lambda: b"GET " + ok + b" HTTP/1.1\r\nx: \x00\x01\x7f\r\n\r\n",
            lambda: b"GET " + ok + b" HTTP/1.1\r\nx: " + b"v" * 20_000 + b"\r\n\r\n",
            lambda: b"GET " + ok + b" HTTP/1.1\r\n" + b"h: v\r\n" * 3000 + b"\r\n",
            lambda: b"GET " + b"/" * 20_000 + b" HTTP/1.1\r\n\r\n",
            lambda: b"GET /v1/\xff\xfe\xc3( HTTP/1.1\r\nhost: x\r\n\r\n",
            lambda: b"POST /v1/authorize HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 7\r\n\r\n{}{}{}{",
            lambda: b"POST /v1/authorize HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
            lambda: b"POST /v1/authorize HTTP/1.1\r\ncontent-length: 1e3\r\n\r\n",
            lambda: b"POST /v1/authorize HTTP/1.1\r\ncontent-length: +5\r\n\r\n{}{}{",
            lambda: b"POST /v1/authorize HTTP/1.1\r\ncontent-length: \xb2\r\n\r\n{}",
            lambda: b"POST /v1/authorize HTTP/1.1\r\ncontent-length: " + b"9" * 40 + b"\r\n\r\n{}",
            lambda: b"POST /v1/authorize HTTP/1.1\r\ncontent-length: 99999999\r\n\r\n{}",
            lambda: b"POST /v1/authorize HTTP/1.1\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            lambda: b"POST /v1/authorize HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
            lambda: b"POST /v1/authorize HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",
            lambda: b"POST /v1/authorize HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\n{}\r\n0\r\n\r\n",
            lambda: b"POST /v1/authorize HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{}\r\n0\r\n\r\n",
            lambda: b"POST /v1/authorize HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            lambda: b"POST /v1/authorize HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2;ext=\xff\r\n{}\r\n0\r\nx-trailer: \xff\r\n\r\n",
            lambda: b"POST /v1/authorize HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n" + b"1\r\n[\r\n" * 3000 + b"0\r\n\r\n",
            lambda: b"POST /v1/authorize HTTP/1.0\r\n\r\n{}",
            lambda: b"GET /v1/health HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n{}",
            lambda: b"GET /v1/health HTTP/1.1\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n",
            lambda: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            lambda: b"\r\n\r\n\r\nGET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n",
            lambda: b"GET /v1/health HTTP/1.1\nhost: x\n\n",
            lambda: request(b"POST", b"/v1/authorize", b"x" * rng.choice([300_000, 2_000_000])),
        ]
        return rng.choice(choices)()

    # -- cases -------------------------------------------------------------------------

    def case(self) -> Case:
        rng = self.rng
        r = rng.random()
        if r < 0.30:
            return Case("malformed_http", self.malformed_http())
        if r < 0.62:
            return Case("endpoint", self.endpoint_request())
        if r < 0.80:
            n = rng.randint(2, 16)
            parts = [self.endpoint_request() if rng.random() < 0.8 else request(b"GET", b"/v1/health")
                     for _ in range(n)]
            if rng.random() < 0.2:
                parts.append(self.malformed_http())
                n += 1
            return Case("pipelined", b"".join(parts), requests=n)
        if r < 0.88:
            full = self.endpoint_request() if rng.random() < 0.7 else self.malformed_http()
            cut = rng.randint(1, max(1, len(full) - 1))
            return Case("half_close_mid_request", full[:cut])
        if r < 0.94:
            full = self.endpoint_request()
            return Case("abrupt_close", full[: rng.randint(0, len(full))], abrupt=True)
        return Case("abrupt_after_send", self.endpoint_request(), abrupt=True)


# --------------------------------------------------------------------------- the client


def parse_responses(data: bytes) -> tuple[list[int], bool]:
    """Status codes of the complete HTTP responses in ``data``, and whether bytes that
    are not a complete response remain (a torn or garbled answer)."""
    statuses: list[int] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return statuses, True
        head = data[pos:end].split(b"\r\n")
        parts = head[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] != b"HTTP/1.1" or not parts[1].isdigit():
            return statuses, True
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if end + 4 + length > len(data):
            return statuses, True
        statuses.append(int(parts[1]))
        pos = end + 4 + length
    return statuses, False


def send_case(path: str, case: Case) -> tuple[list[int], bool, bytes]:
    """Send one case on a new connection; return (statuses, torn, raw answer)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(SOCKET_TIMEOUT_S)
        s.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(case.data)
        if case.abrupt:
            # close() with unread input: the daemon sees a reset or EOF mid-request
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return [], False, b""
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        chunks: list[bytes] = []
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
        raw = b"".join(chunks)
        statuses, torn = parse_responses(raw)
        return statuses, torn, raw
    finally:
        s.close()


def run_client(path: str, ctx: Context, *, seed: int, max_requests: int, deadline: float
               ) -> dict[str, Any]:
    """Send cases until ``max_requests`` requests went out or ``deadline`` (monotonic)
    passed. Returns JSON-able counts."""
    gen = Generator(random.Random(seed), ctx)
    statuses: Counter[str] = Counter()
    silent: Counter[str] = Counter()
    cases: Counter[str] = Counter()
    findings: list[dict[str, Any]] = []
    sent = 0
    while sent < max_requests and time.monotonic() < deadline:
        case = gen.case()
        cases[case.kind] += 1
        sent += case.requests
        try:
            got, torn, raw = send_case(path, case)
        except OSError as exc:  # connect refused (e.g. the listen backlog was full)
            statuses[f"error:{type(exc).__name__}"] += 1
            continue
        for status in got:
            statuses[str(status)] += 1
            if status not in EXPECTED_STATUSES and len(findings) < 20:
                findings.append({"status": status, "kind": case.kind,
                                 "sent": case.data[:300].decode("latin-1"),
                                 "answer": raw[:600].decode("latin-1")})
        if torn and len(findings) < 20:
            findings.append({"torn": True, "kind": case.kind, "answer": raw[:300].decode("latin-1")})
        if not got and not case.abrupt:
            silent[case.kind] += 1
    return {"sent": sent, "statuses": dict(statuses), "silent": dict(silent),
            "cases": dict(cases), "findings": findings}


def fork_client(uid: int, gid: int, fn: Callable[[], dict[str, Any]]) -> tuple[int, int]:
    """Fork a child that drops to uid/gid and writes ``fn()``'s JSON to a pipe;
    returns (pid, read fd)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            if uid != os.getuid():
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            data = json.dumps(fn()).encode()
        except BaseException as exc:
            data = json.dumps({"child_error": repr(exc)}).encode()
        try:
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def collect(pid: int, fd: int) -> dict[str, Any]:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(data)
    return result


def run_fuzz(path: str, ctx: Context, clients: list[tuple[int, int]], *, seed: int,
             max_requests: int, seconds: float) -> list[dict[str, Any]]:
    """Run one forked client per (uid, gid) in ``clients``, each sending about
    ``max_requests / len(clients)`` requests within ``seconds``; their results."""
    deadline = time.monotonic() + seconds
    per_client = -(-max_requests // len(clients))
    children = [
        fork_client(uid, gid, lambda i=i: run_client(
            path, ctx, seed=seed * 1000 + i, max_requests=per_client, deadline=deadline))
        for i, (uid, gid) in enumerate(clients)
    ]
    return [collect(pid, fd) for pid, fd in children]


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    silent: Counter[str] = Counter()
    cases: Counter[str] = Counter()
    findings: list[dict[str, Any]] = []
    errors = []
    sent = 0
    for res in results:
        if "child_error" in res:
            errors.append(res["child_error"])
            continue
        sent += res["sent"]
        statuses.update(res["statuses"])
        silent.update(res["silent"])
        cases.update(res["cases"])
        findings.extend(res["findings"])
    return {"sent": sent, "statuses": dict(sorted(statuses.items())), "silent": dict(silent),
            "cases": dict(cases), "findings": findings, "child_errors": errors}
