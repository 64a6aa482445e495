"""End-to-end cost of one governed tool call: authorize + redeem + release.

Starts a real daemon (subprocess, quickstart config, local store, SQLite state,
fsynced audit) in a temporary directory and drives it over its Unix socket:

- ``client c=1``: the shipped ``sidekey.client.Client`` (httpx), sequential calls,
  in a separate process — what an MCP server author gets;
- ``raw c=1`` and ``raw c=32``: a minimal pre-encoded HTTP/1.1 client on trio in a
  separate process (keep-alive connection per worker), so the figures are the daemon's
  cost rather than the client library's.

``--users N`` (default 1) pre-mints N distinct user tokens (``sub`` = ``user-00000``,
``user-00001``, ...) before anything is timed, and every run spreads its calls
round-robin over them (one cycle shared by all workers of a run, starting at user 0), so
each call touches that user's own quota keys (sessions, per-user and per-user-per-tool
rate limits): the figures at 10 and 10,000 users show whether the per-call cost grows
with the key space. A warm-up (not timed) first makes one call per user (at least 100
calls in all; ``--warmup`` to change), so every token is verified and cached and every
user's quota rows exist, as in a steady state; the daemon's verified-token cache holds
10,000 tokens, so beyond that the runs also pay token verification. The warm-up also
leaves its calls' history (burned jtis, leases, WAL, audit) in the daemon: to compare
user counts at equal history, give both the same ``--warmup`` (e.g. 10000).

Prints calls/s and per-call p50/p99 latency. Targets on the 2-core reference machine:
p50 <= 1 ms at c=1, >= 2000 calls/s at c=32. ``--profile`` runs the daemon under
cProfile and prints its top functions afterwards.

    python benchmarks/bench_call.py [--calls 2000] [--users 1] [--state sqlite|redis]
                                    [--profile] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import pstats
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from sidekey.devissuer import create_issuer, kid_of, mint_user_token

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart"

SERVER, TOOL = "content-api", "create_article"
ARGS = {"title": "Q2 update", "draft": True}


# --------------------------------------------------------------------------- daemon


def setup(root: Path) -> Path:
    from sidekey.backends.local import LocalStore, generate_key_file, load_key

    for f in QUICKSTART.glob("*.yaml"):
        shutil.copy(f, root / f.name)
    # The seed's per-user limits (10 create_article calls a minute, human approval beyond
    # 5 an hour) are enforced: one benchmark user would be throttled or held at once.
    # Keep the limits (their checks are part of the measured work) but far above the load.
    limits = yaml.safe_load((root / "rate-limits.yaml").read_text())
    for section in [limits["limits"]["per_user"], *limits["limits"]["per_tool"].values()]:
        for key in ("requests_per_minute", "requests_per_hour", "concurrent_sessions",
                    "requires_approval_above"):
            if key in section:
                section[key] = 10_000_000
    (root / "rate-limits.yaml").write_text(yaml.safe_dump(limits))
    cfg = yaml.safe_load((QUICKSTART / "sidekey.yaml").read_text())
    cfg["listen"]["socket"] = "run/sock"
    config = root / "sidekey.yaml"
    config.write_text(yaml.safe_dump(cfg))
    (root / "run").mkdir()
    (root / "state").mkdir(mode=0o700)
    generate_key_file(root / "keys" / "local.key")
    store = LocalStore(root / "state" / "secrets.enc", load_key(root / "keys" / "local.key", None))
    for name in ("content-api/read-key", "content-api/write-key", "content-api/publish-key",
                 "analytics-db/readonly-dsn"):
        store.put(name, os.urandom(16).hex())
    # The quickstart's local demo issuer: the calls carry a real (EdDSA) user token.
    create_issuer(root / "keys" / "demo-issuer.pem", root / "keys" / "demo-issuer-jwks.json")
    return config


def user_token(root: Path, subject: str = "bench-user") -> str:
    """A bearer token for ``subject``, as an agent would present (verified once, then cached)."""
    return mint_user_token(
        root / "keys" / "demo-issuer.pem", kid=kid_of(root / "keys" / "demo-issuer-jwks.json"),
        issuer="https://auth.example.com", audience="mcp:content-api", subject=subject,
        scopes=["content:read", "content:write", "content:publish"],
    )


def user_tokens(root: Path, n: int) -> list[str]:
    """``n`` tokens of distinct users ``user-00000``, ``user-00001``, ..."""
    return [user_token(root, f"user-{i:05d}") for i in range(n)]


def start_daemon(root: Path, config: Path, profile: Path | None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += ["-m", "sidekey", *serve_args(config)]
    return spawn_daemon(root, cmd)


def serve_args(config: Path) -> list[str]:
    """The daemon's command line after ``sidekey`` (or whatever runs its main)."""
    return ["--log-level", "warning", "serve", "--config", str(config)]


def spawn_daemon(root: Path, cmd: list[str]) -> subprocess.Popen[bytes]:
    """Run ``cmd`` (a daemon of ``setup(root)``'s config) in ``root`` with its stderr in
    daemon.log; return once its socket accepts a connection (SystemExit after 20 s, or if
    it exits)."""
    log = open(root / "daemon.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    sock_path = str(root / "run" / "sock")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited: {(root / 'daemon.log').read_text()}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock_path)
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("daemon did not start")


# --------------------------------------------------------------------------- raw client


def _post(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: sidekey\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


class _Conn:
    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buf = b""

    async def call(self, req: bytes) -> tuple[int, dict[str, Any]]:
        await self.stream.send_all(req)
        while (got := split_response(self.buf)) is None:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            self.buf += chunk
        status, body, self.buf = got
        return status, json.loads(body)


def split_response(buf: bytes) -> tuple[int, bytes, bytes] | None:
    """The first response in ``buf`` (framed by content-length) as (status, body, what
    follows it), or None while it is incomplete."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buf[:head_end].decode("latin-1")
    length = 0
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.lower() == "content-length":
            length = int(v)
    end = head_end + 4 + length
    if len(buf) < end:
        return None
    return int(head.split(" ", 2)[1]), buf[head_end + 4 : end], buf[end:]


def _authorize_request(token: str) -> bytes:
    return _post("/v1/authorize", json.dumps({
        "server": SERVER, "tool": TOOL, "agent_id": "content-writer", "session_id": "bench",
        "user_token": token, "arguments": ARGS}).encode())


async def _raw_worker(sock_path: str, auth_reqs: Iterator[bytes], n: int, lat: list[float]) -> None:
    """``n`` calls on one connection; each takes the next user's pre-encoded authorize
    request from ``auth_reqs`` (shared by the run's workers: round-robin over users)."""
    import trio

    stream = await trio.open_unix_socket(sock_path)
    conn = _Conn(stream)
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            st, a = await conn.call(next(auth_reqs))
            assert st == 200, a
            st, lease = await conn.call(_post("/v1/redeem", json.dumps(
                {"resolution_token": a["resolution_token"], "arguments": ARGS}).encode()))
            assert st == 200, lease
            st, r = await conn.call(_post("/v1/release", json.dumps(
                {"lease_id": lease["lease_id"], "status": "success", "duration_ms": 1}).encode()))
            assert st == 200, r
            lat.append(time.perf_counter() - t0)
    finally:
        await stream.aclose()


def _raw_process(sock_path: str, tokens: list[str], concurrency: int, per_worker: int,
                 q: Any) -> None:
    import trio

    lat: list[float] = []
    auth_reqs = itertools.cycle([_authorize_request(t) for t in tokens])  # before the clock

    async def main() -> float:
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(_raw_worker, sock_path, auth_reqs, per_worker, lat)
        return time.perf_counter() - t0

    wall = trio.run(main)
    q.put((wall, lat))


def _client_process(sock_path: str, tokens: list[str], n: int, q: Any) -> None:
    from sidekey.client import Client

    lat: list[float] = []
    with Client(socket_path=sock_path) as c:
        t_start = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            auth = c.authorize(server=SERVER, tool=TOOL, agent_id="content-writer",
                               session_id="bench", arguments=ARGS,
                               user_token=tokens[i % len(tokens)])
            assert auth.resolution_token is not None, auth
            lease = c.redeem(auth.resolution_token, arguments=ARGS)
            c.release(lease.lease_id, status="success", duration_ms=1)
            lat.append(time.perf_counter() - t0)
        wall = time.perf_counter() - t_start
    q.put((wall, lat))


def run_in_process(target: Any, *args: Any) -> tuple[float, list[float]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    deadline = time.monotonic() + 600
    while True:  # fail fast if the run's process dies (a failed assertion) before answering
        try:
            result: tuple[float, list[float]] = q.get(timeout=1)
            break
        except queue.Empty:
            if not p.is_alive() or time.monotonic() > deadline:
                p.kill()
                raise SystemExit(f"{getattr(target, '__name__', target)}: no result "
                                 f"(exit code {p.exitcode})") from None
    p.join(30)
    return result


def report(label: str, wall: float, lat: list[float]) -> dict[str, Any]:
    lat = sorted(lat)
    n = len(lat)
    out = {
        "run": label,
        "calls": n,
        "calls_per_s": round(n / wall),
        "p50_ms": round(lat[n // 2] * 1000, 3),
        "p99_ms": round(lat[min(n - 1, int(n * 0.99))] * 1000, 3),
    }
    print(f"{label:<14} calls={n:<6} calls/s={out['calls_per_s']:<6} "
          f"p50={out['p50_ms']:.3f} ms  p99={out['p99_ms']:.3f} ms", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per run (default 2000)")
    ap.add_argument("--concurrency", type=int, default=32, help="workers for the concurrent run")
    ap.add_argument("--users", type=int, default=1,
                    help="distinct users (tokens), calls round-robin over them (default 1)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed calls first, round-robin over the users "
                         "(default: one per user, at least 100)")
    ap.add_argument("--profile", action="store_true", help="profile the daemon with cProfile")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    ap.add_argument("--state", choices=["sqlite", "redis"], default="sqlite",
                    help="state store (redis: a redis-server started here on loopback)")
    args = ap.parse_args()
    if args.users < 1:
        ap.error("--users must be at least 1")
    warmup = max(100, args.users) if args.warmup is None else args.warmup

    root = Path(tempfile.mkdtemp(prefix="skb-"))
    profile = root / "daemon.prof" if args.profile else None
    redis = None
    try:
        config = setup(root)
        if args.state == "redis":
            sys.path.insert(0, str(ROOT / "tests"))
            from redis_server import RedisServer  # type: ignore[import-not-found]

            (root / "redis").mkdir()
            redis = RedisServer(root / "redis").start()
            cfg = yaml.safe_load(config.read_text())
            cfg["state"] = {**cfg["state"], "backend": "redis", "redis_url": redis.url}
            config.write_text(yaml.safe_dump(cfg))
        print(f"state store: {args.state}, users: {args.users}, warm-up calls: {warmup}",
              flush=True)
        t0 = time.perf_counter()
        tokens = user_tokens(root, args.users)
        print(f"minted {args.users} user token(s) in {time.perf_counter() - t0:.1f} s (not timed)",
              flush=True)
        proc = start_daemon(root, config, profile)
        sock_path = str(root / "run" / "sock")
        try:
            results = []
            # Warm-up: every user once (tokens verified and cached, quota rows created).
            warm_c = max(1, min(args.concurrency, args.users, warmup))
            if warmup > 0:
                run_in_process(_raw_process, sock_path, tokens, warm_c, -(-warmup // warm_c))
            results.append(report("client c=1", *run_in_process(_client_process, sock_path,
                                                                tokens, args.calls)))
            results.append(report("raw c=1", *run_in_process(_raw_process, sock_path, tokens, 1,
                                                             args.calls)))
            per = max(1, args.calls // args.concurrency) * 2
            results.append(report(f"raw c={args.concurrency}",
                                  *run_in_process(_raw_process, sock_path, tokens,
                                                  args.concurrency, per)))
            for r in results:
                r.update(state=args.state, users=args.users)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        lines = (root / "state" / "audit.jsonl").read_text().count("\n")
        print(f"audit lines written: {lines}")
        if args.json:
            print(json.dumps(results))
        if profile is not None and profile.exists():
            print("\ndaemon profile, top 25 by internal time:")
            pstats.Stats(str(profile)).sort_stats("tottime").print_stats(25)
            if os.environ.get("SIDEKEY_BENCH_KEEP_PROFILE"):
                shutil.copy(profile, os.environ["SIDEKEY_BENCH_KEEP_PROFILE"])
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
