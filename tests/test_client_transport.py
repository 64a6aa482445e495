"""sidekey.client's own HTTP/1.1 transport (h11 over the Unix socket), against a real
daemon and against scripted socket servers run in forked processes.

What is pinned here: one kept-alive connection carries many calls; a daemon restart
between two calls costs a reconnect, not an error; a request that may have reached the
daemon is never sent twice; a socket served by another uid gets nothing; garbage, an
endless answer and a silent or trickling server end in ProtocolError / RequestTimeout
within the client's timeout; a forked child never uses its parent's connection. Each of
sync, asyncio and trio is driven where the code paths differ.

The scripted servers are processes, not threads (forking a threaded pytest process is
unsafe), and report every accepted connection on a pipe.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from harness import Daemon
from sidekey import client as sk
from sidekey.client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    DaemonIdentityError,
    ProtocolError,
    RequestTimeout,
    SidekeyClientError,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NOBODY, NOGROUP = 65534, 65534
FLAVOURS = ["sync", "asyncio", "trio"]
SERVER_LIFETIME_S = 60.0  # a scripted server never outlives this, whatever the test does


# --------------------------------------------------------------------------- scripted server


class FakeServer:
    """A socket server in a forked process (as ``uid``), answering per ``behaviour``:

    - ``ok``: HTTP/1.1 keep-alive, ``{"status": "ok"}`` to every request;
    - ``garbage``: bytes that are not HTTP;
    - ``endless``: a 200 head without a length, then body bytes until the client leaves;
    - ``silent``: reads, never answers;
    - ``trickle``: a 200 head with a length, then one body byte every 0.1 s;
    - ``drop_second``: answers the first request of a connection, reads the second in
      full and closes without answering;
    - ``early_413``: as ``ok``, but a request head announcing over 64 KiB gets a 413 at
      once and the connection is closed without reading the body.

    Every accepted connection writes ``A`` and every complete request ``R`` to a pipe.
    """

    def __init__(self, behaviour: str, uid: int = 0) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="skt-"))
        os.chmod(self.dir, 0o777)
        self.path = str(self.dir / "sock")
        self._events = ""
        ready_r, ready_w = os.pipe()
        self._report_r, report_w = os.pipe()
        self._stop_r, self._stop_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - child
            code = 0
            try:
                os.close(ready_r)
                os.close(self._report_r)
                os.close(self._stop_w)
                if uid != 0:
                    os.setgroups([])
                    os.setgid(NOGROUP)
                    os.setuid(uid)
                _serve(self.path, behaviour, ready_w, report_w, self._stop_r)
            except BaseException as exc:
                os.write(2, f"fake server failed: {exc!r}\n".encode())
                code = 1
            finally:
                os._exit(code)
        os.close(ready_w)
        os.close(report_w)
        os.close(self._stop_r)
        os.set_blocking(self._report_r, False)
        ready = select.select([ready_r], [], [], 10)[0]
        assert ready and os.read(ready_r, 1) == b"R", "fake server did not start"
        os.close(ready_r)

    def _drain(self) -> str:
        while True:
            try:
                chunk = os.read(self._report_r, 4096)
            except BlockingIOError:
                return self._events
            if not chunk:
                return self._events
            self._events += chunk.decode()

    def accepted(self, at_least: int = 0) -> int:
        """Connections accepted so far (waiting up to 5 s for ``at_least``)."""
        deadline = time.monotonic() + 5
        while self._drain().count("A") < at_least and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._drain().count("A")

    def requests(self, at_least: int = 0) -> int:
        deadline = time.monotonic() + 5
        while self._drain().count("R") < at_least and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._drain().count("R")

    def stop(self) -> None:
        os.close(self._stop_w)
        os.waitpid(self.pid, 0)
        self._drain()
        os.close(self._report_r)
        for name in os.listdir(self.dir):
            os.unlink(self.dir / name)
        os.rmdir(self.dir)


def _serve(path: str, behaviour: str, ready_w: int, report_w: int,
           stop_r: int) -> None:  # pragma: no cover - runs in the child
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o666)
    srv.listen(64)
    os.write(ready_w, b"R")
    conns: dict[socket.socket, h11.Connection] = {}
    served: dict[socket.socket, int] = {}
    streaming: set[socket.socket] = set()
    trickling: dict[socket.socket, int] = {}
    deadline = time.monotonic() + SERVER_LIFETIME_S

    def drop(c: socket.socket) -> None:
        conns.pop(c, None)
        streaming.discard(c)
        trickling.pop(c, None)
        c.close()

    def answer(c: socket.socket, h: h11.Connection) -> None:
        body = b'{"status": "ok"}'
        c.sendall(h.send(h11.Response(status_code=200, headers=[
            ("content-type", "application/json"), ("content-length", str(len(body)))])) or b"")
        c.sendall((h.send(h11.Data(data=body)) or b"") + (h.send(h11.EndOfMessage()) or b""))
        h.start_next_cycle()

    while time.monotonic() < deadline:
        wait = 0.1 if trickling else (0 if streaming else 0.5)
        readable, _, _ = select.select([srv, stop_r, *conns], [], [], wait)
        if stop_r in readable:
            break
        if srv in readable:
            c, _ = srv.accept()
            conns[c] = h11.Connection(h11.SERVER)
            served[c] = 0
            os.write(report_w, b"A")
        for c in [r for r in readable if r in conns]:
            try:
                data = c.recv(65536)
            except OSError:
                drop(c)
                continue
            h = conns[c]
            h.receive_data(data)
            if not data:
                drop(c)
                continue
            while True:
                try:
                    event = h.next_event()
                except h11.RemoteProtocolError:
                    drop(c)
                    break
                if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                    break
                if (behaviour == "early_413" and isinstance(event, h11.Request)
                        and int(dict(event.headers).get(b"content-length", b"0")) > 65536):
                    body = b'{"error": {"code": "body_too_large", "message": "too large"}}'
                    c.sendall(h.send(h11.Response(status_code=413, headers=[
                        ("content-length", str(len(body))), ("connection", "close")])) or b"")
                    c.sendall(h.send(h11.Data(data=body)) or b"")
                    drop(c)  # unread: the body still on its way
                    break
                if not isinstance(event, h11.EndOfMessage):
                    continue
                os.write(report_w, b"R")
                served[c] += 1
                if behaviour in ("ok", "early_413") or (
                        behaviour == "drop_second" and served[c] == 1):
                    answer(c, h)
                elif behaviour == "drop_second":
                    drop(c)
                elif behaviour == "garbage":
                    c.sendall(b"SIDEKEY? no: \x00\xff garbage, not HTTP\r\n\r\n")
                elif behaviour == "endless":
                    c.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n")
                    streaming.add(c)
                elif behaviour == "trickle":
                    c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n")
                    trickling[c] = 0
                break  # "silent": nothing
        for c in list(streaming):
            try:
                c.send(b"x" * 65536)
            except OSError:
                drop(c)
        for c in list(trickling):
            try:
                c.send(b"x")
            except OSError:
                drop(c)


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeServer]]:
    made: list[FakeServer] = []

    def make(behaviour: str, uid: int = 0) -> FakeServer:
        server = FakeServer(behaviour, uid)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.stop()


# --------------------------------------------------------------------------- drivers


def run_client(flavour: str, sock: str, calls: list[Callable[[Any], Any]],
               **kw: Any) -> list[Any]:
    """Run each of ``calls`` (``lambda c: c.health()``) with ONE client object of
    ``flavour``; return their results, or the SidekeyClientError each raised."""
    results: list[Any] = []
    if flavour == "sync":
        with Client(sock, **kw) as c:
            for call in calls:
                try:
                    results.append(call(c))
                except SidekeyClientError as exc:
                    results.append(exc)
        return results

    async def main() -> None:
        async with AsyncClient(sock, **kw) as c:
            for call in calls:
                try:
                    results.append(await call(c))
                except SidekeyClientError as exc:
                    results.append(exc)

    if flavour == "trio":
        trio.run(main)  # bounded by the module's pytest timeout and each client timeout
    else:
        asyncio.run(asyncio.wait_for(main(), 60))
    return results


def health(c: Any) -> Any:
    return c.health()


# --------------------------------------------------------------------------- keep-alive


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_one_connection_carries_many_calls(fake_server: Callable[..., FakeServer],
                                           flavour: str) -> None:
    server = fake_server("ok")
    results = run_client(flavour, server.path, [health] * 20, timeout=5)
    assert results == [{"status": "ok"}] * 20
    assert server.requests(20) == 20
    assert server.accepted() == 1


def test_tool_calls_on_a_real_daemon_share_one_connection(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """authorize+redeem and release of many tool calls, against the real daemon: the
    client opens one connection (counted at the client's connect), and the daemon sees
    one open connection from it (its status counts them; the status request itself
    rides on the same one)."""
    token = daemon.user_token("content-api")
    connects: list[str] = []
    real_connect = sk._SyncPool._connect

    def counting(self: Any, deadline: float, what: str) -> Any:
        connects.append(what)
        return real_connect(self, deadline, what)

    monkeypatch.setattr(sk._SyncPool, "_connect", counting)
    seen: list[int] = []
    with Client(daemon.socket, timeout=10) as c:
        for _ in range(10):
            with c.tool_call("content-api", "list_articles", user_token=token,
                             agent_id="content-writer", arguments={}) as lease:
                assert lease.secrets
            seen.append(c.status()["connections"])
    assert connects == ["POST /v1/authorize"]
    assert seen == [1] * 10


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_reconnect_after_daemon_restart(daemon: Daemon, flavour: str) -> None:
    token = daemon.user_token("content-api")

    def tool_call(c: Any) -> Any:
        if isinstance(c, Client):
            with c.tool_call("content-api", "list_articles", user_token=token,
                             agent_id="content-writer", arguments={}) as lease:
                return sorted(lease.secrets)

        async def body() -> Any:
            async with c.tool_call("content-api", "list_articles", user_token=token,
                                   agent_id="content-writer", arguments={}) as lease:
                return sorted(lease.secrets)

        return body()

    def restart(c: Any) -> Any:
        daemon.restart()
        if isinstance(c, Client):
            return "restarted"

        async def done() -> str:
            return "restarted"

        return done()

    results = run_client(flavour, daemon.socket, [tool_call, restart, tool_call], timeout=10)
    assert results == [["CONTENT_API_KEY"], "restarted", ["CONTENT_API_KEY"]], results


def test_send_failure_on_a_reused_connection_is_retried_once(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other way a restart shows: the liveness peek misses the close (a race), the
    write fails (EPIPE): nothing was delivered, so one reconnect is safe."""
    monkeypatch.setattr(sk, "_peer_closed", lambda sock: False)
    with Client(daemon.socket, timeout=10) as c:
        assert c.health()["status"] == "ok"
        daemon.restart()
        assert c.health()["status"] == "ok"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_request_that_may_have_arrived_is_never_sent_twice(
        fake_server: Callable[..., FakeServer], flavour: str) -> None:
    """The server reads the second request on a kept-alive connection in full, then
    closes without answering (a daemon that crashed mid-redeem): the client reports the
    failure and does NOT send the redeem again, on this or a new connection."""
    server = fake_server("drop_second")
    results = run_client(flavour, server.path,
                         [health, lambda c: c.redeem("rt.token.once")], timeout=5)
    assert results[0] == {"status": "ok"}
    assert isinstance(results[1], ProtocolError | ConnectionFailed), results
    time.sleep(0.3)  # a (wrong) retry would be on its way by now
    assert server.requests() == 2
    assert server.accepted() == 1


# --------------------------------------------------------------------------- identity


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_socket_served_by_another_uid_is_refused_before_sending(
        fake_server: Callable[..., FakeServer], flavour: str) -> None:
    server = fake_server("ok", uid=NOBODY)
    results = run_client(flavour, server.path, [health, health], timeout=5, expected_uid=0)
    for exc in results:
        assert isinstance(exc, DaemonIdentityError), results
        assert exc.code == "daemon_identity" and "uid 65534" in str(exc)
    assert server.accepted(2) == 2  # it connected (twice: nothing kept), then refused
    assert server.requests() == 0  # not one request reached it


def test_same_server_accepted_when_its_uid_is_expected(
        fake_server: Callable[..., FakeServer]) -> None:
    """The control for the refusal above: told to expect nobody, the client talks."""
    server = fake_server("ok", uid=NOBODY)
    assert run_client("sync", server.path, [health], timeout=5, expected_uid="nobody") == [
        {"status": "ok"}]


# --------------------------------------------------------------------------- hostile answers


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_garbage_answer_is_protocol_error(fake_server: Callable[..., FakeServer],
                                          flavour: str) -> None:
    server = fake_server("garbage")
    (exc,) = run_client(flavour, server.path, [health], timeout=5)
    assert isinstance(exc, ProtocolError) and exc.code == "protocol_error", exc


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_endless_answer_is_capped(fake_server: Callable[..., FakeServer],
                                  monkeypatch: pytest.MonkeyPatch, flavour: str) -> None:
    monkeypatch.setattr(sk, "MAX_RESPONSE_BYTES", 256 * 1024)
    server = fake_server("endless")
    # A long timeout: the cap, not the clock, must end this.
    (exc,) = run_client(flavour, server.path, [health], timeout=30)
    assert isinstance(exc, ProtocolError), exc
    assert "response over 262144 bytes" in exc.message and exc.status == 200


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("behaviour", ["silent", "trickle"])
def test_server_that_never_finishes_times_out(fake_server: Callable[..., FakeServer],
                                              flavour: str, behaviour: str) -> None:
    """``timeout`` bounds the whole request: a server that never answers, and one that
    sends a byte every 0.1 s (each read is quick, the answer never completes)."""
    server = fake_server(behaviour)
    started = time.monotonic()
    (exc,) = run_client(flavour, server.path, [health], timeout=0.5)
    elapsed = time.monotonic() - started
    assert isinstance(exc, RequestTimeout) and exc.code == "timeout", exc
    # Not a speed assertion: a per-read timeout would run for the whole 10,000 s trickle.
    assert elapsed < 30, elapsed


# --------------------------------------------------------------------------- fork


def _in_child(fn: Callable[[], Any]) -> Any:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.write(w, json.dumps(fn()).encode())
        except BaseException as exc:
            os.write(w, json.dumps({"child_error": repr(exc)}).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    ready = select.select([r], [], [], 30)[0]
    while ready and (chunk := os.read(r, 65536)):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def test_forked_child_opens_its_own_connection_sync(
        fake_server: Callable[..., FakeServer]) -> None:
    server = fake_server("ok")
    with Client(server.path, timeout=5) as c:
        assert c.health() == {"status": "ok"}
        assert server.accepted(1) == 1
        assert _in_child(lambda: [c.health(), c.health()]) == [{"status": "ok"}] * 2
        assert server.accepted(2) == 2  # the child's own, one for both of its calls
        assert c.health() == {"status": "ok"}  # the parent's connection is intact
        assert server.requests(4) == 4
        assert server.accepted() == 2


def test_forked_child_opens_its_own_connection_asyncio(
        fake_server: Callable[..., FakeServer]) -> None:
    server = fake_server("ok")
    c = AsyncClient(server.path, timeout=5)

    async def twice() -> list[Any]:
        return [await c.health(), await c.health()]

    assert asyncio.run(twice()) == [{"status": "ok"}] * 2
    # The pool belongs to a finished loop now; a new loop (here, the child's) opens anew.
    assert _in_child(lambda: asyncio.run(twice())) == [{"status": "ok"}] * 2
    assert server.accepted(2) == 2
    asyncio.run(c.close())


@pytest.mark.parametrize("flavour", ["asyncio", "trio"])
def test_pid_change_in_a_running_loop_opens_a_new_connection(
        fake_server: Callable[..., FakeServer], monkeypatch: pytest.MonkeyPatch,
        flavour: str) -> None:
    """The async pool's pid check on its own: a process that forked inside a running
    loop and goes on with the same loop object. (A real fork there would share the
    loop's epoll instance with the parent, so the new pid is simulated.)"""
    server = fake_server("ok")
    real_pid = os.getpid()

    def forked(c: Any) -> Any:
        monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)
        return c.health()

    results = run_client(flavour, server.path, [health, health, forked, health], timeout=5)
    assert results == [{"status": "ok"}] * 4
    assert server.requests(4) == 4
    assert server.accepted() == 2  # the "child" did not use the first connection


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_early_answer_to_an_oversized_request_is_read(daemon: Daemon, flavour: str) -> None:
    """The daemon refuses a body over its cap from the Content-Length alone (413) and
    closes while the client is still writing: the client reads that answer instead of
    reporting a broken pipe, on a fresh and on a kept-alive connection."""
    token = daemon.user_token("content-api")
    huge = {"title": "x" * (8 * 1024 * 1024)}

    def oversized(c: Any) -> Any:
        return c.authorize("content-api", "create_article", user_token=token,
                           agent_id="content-writer", arguments=huge)

    results = run_client(flavour, daemon.socket, [oversized, health, oversized], timeout=20)
    for exc in (results[0], results[2]):
        assert isinstance(exc, sk.RequestTooLarge), results
        assert exc.code == "body_too_large" and exc.status == 413
    assert results[1]["status"] == "ok"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_early_answer_before_the_body_is_read_is_not_a_broken_pipe(
        fake_server: Callable[..., FakeServer], flavour: str) -> None:
    """A server that answers 413 from the head and closes without reading the body: the
    client's write fails (EPIPE), and the answer it did get is what is reported, on a
    fresh connection and on a kept-alive one (where it is also not taken for a stale
    connection: the request is not sent again)."""
    server = fake_server("early_413")

    def oversized(c: Any) -> Any:
        return c.authorize("content-api", "create_article",
                           arguments={"title": "x" * (4 * 1024 * 1024)})

    results = run_client(flavour, server.path, [oversized, health, oversized], timeout=20)
    for exc in (results[0], results[2]):
        assert isinstance(exc, sk.RequestTooLarge), results
        assert exc.code == "body_too_large" and exc.status == 413
    assert results[1] == {"status": "ok"}
    # The first 413 closed its connection; the health call opened the one the second
    # oversized request then reused (and the 413 closed): not one request sent twice.
    assert server.accepted() == 2
    assert server.requests() == 1  # the health call (the 413s never read a whole request)


# --------------------------------------------------------------------------- concurrency


def test_threads_share_a_capped_pool(fake_server: Callable[..., FakeServer],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """12 threads x 10 calls on one Client capped at 3 connections: every call answered,
    never more than 3 connections (all kept alive: at most 3 opened in all)."""
    import threading

    monkeypatch.setattr(sk, "MAX_CONNECTIONS", 3)
    server = fake_server("ok")
    results: list[Any] = []
    with Client(server.path, timeout=20) as c:
        def work() -> None:
            for _ in range(10):
                try:
                    results.append(c.health())
                except SidekeyClientError as exc:
                    results.append(exc)

        threads = [threading.Thread(target=work) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    assert results == [{"status": "ok"}] * 120
    assert 1 <= server.accepted() <= 3, server.accepted()


@pytest.mark.parametrize("flavour", ["asyncio", "trio"])
def test_tasks_share_a_capped_pool(fake_server: Callable[..., FakeServer],
                                   monkeypatch: pytest.MonkeyPatch, flavour: str) -> None:
    """20 concurrent tasks on one AsyncClient capped at 4 connections: all answered,
    waiting for a connection instead of opening more."""
    monkeypatch.setattr(sk, "MAX_CONNECTIONS", 4)
    server = fake_server("ok")

    async def main() -> list[Any]:
        out: list[Any] = []
        async with AsyncClient(server.path, timeout=20) as c:
            async def work() -> None:
                for _ in range(5):
                    out.append(await c.health())

            if flavour == "trio":
                async with trio.open_nursery() as nursery:
                    for _ in range(20):
                        nursery.start_soon(work)
            else:
                await asyncio.gather(*(work() for _ in range(20)))
        return out

    out = trio.run(main) if flavour == "trio" else asyncio.run(asyncio.wait_for(main(), 60))
    assert out == [{"status": "ok"}] * 100
    assert 1 <= server.accepted() <= 4
