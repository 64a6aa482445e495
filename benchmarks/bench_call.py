"""End-to-end cost of one governed tool call: authorize + redeem + release.

Starts a real daemon (subprocess, quickstart config, local store, SQLite state,
fsynced audit) in a temporary directory and drives it over its Unix socket:

- ``client c=1``: the shipped ``sidekey.client.Client`` (h11 over the Unix socket,
  kept-alive connections), sequential calls, in a separate process — what an MCP server
  author gets;
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
cProfile and prints its top functions afterwards. ``--audit-key`` gives the daemon an
Ed25519 audit key (``sidekey keygen audit``), so it also writes signed
``audit.checkpoint`` events (every 1000 events or 1 s, the defaults).

Before/after in one run: ``--before REV`` (any git revision of this repository, e.g.
``7910066^``, the code before the audit hash chain) extracts that revision's ``src/`` with
``git archive REV src | tar -x`` into a temporary directory and runs two daemons side by
side, each in its own directory with the same setup (quickstart config, users, warm-up):

- ``before``: REV's code (``PYTHONPATH`` = the extracted ``src/``);
- ``after``: this tree's code (``PYTHONPATH`` = this tree's ``src/``), with an audit key
  configured (hash chain + signed checkpoints; checkpoint options are given to this
  daemon only, REV's config schema need not know them).

The raw client then drives them in alternating bursts, ``--rounds`` times (default 4) at
c=1 and at c=``--concurrency`` (the order flips every round, so a drifting machine load and
any first-or-second effect weigh on both alike), and prints each burst, then per
concurrency the medians and the after/before ratios (median of the per-round ratios) of
calls/s and p50, against the 10 % budget (calls/s >= 0.90x, p50 <= 1.10x), and of the
daemon's CPU time per call (user + system, from /proc: what the code costs, apart from
the fsync waits that dominate the latency on most disks). A burst during which a daemon
switched its audit commits to a worker thread (slow fsyncs: a disk shared with other
work; both old and new code do this for 30 s) is marked, as it pays thread hops. The setup
(store, keys, tokens, config) is written by this tree's code, so REV must read the same
formats (true back to before the chain); a daemon that cannot start stops the run with
its log. The load average is printed at the start and the end.

Against the floor in one run: ``--floor`` starts ``../shared/bench/floor_server.py`` (the
irreducible work of a governed call as a server answering the v1 wire shape, with group
commit; ``--floor-dir`` if elsewhere) next to one sidekey daemon per state store
(``--state both``, the default with ``--floor``: SQLite and Redis, a redis-server started
here on loopback; or only ``sqlite`` / ``redis``), all with this tree's code, and for
``--rounds`` rounds (the order rotates every round) drives each with the same raw client:

- ``raw c=1``: ``--calls`` (default 500) sequential calls;
- ``raw c=N`` (N = ``--concurrency``, default 32): about twice as many, N connections;
- ``client c=1``: the shipped ``sidekey.client.Client`` against each daemon, both as
  ``authorize()`` + ``redeem()`` + ``release()`` (three requests: a gateway's flow) and as
  the ``tool_call`` with-block an MCP server uses (which may authorize and redeem in one
  request), and ``../shared/bench/floor.py`` (the floor at c=1 with its own minimal
  client: the shipped client's yardstick) for as many calls.

Every burst line gives calls/s, p50 and the server's CPU time per call (user + system of
the process and its children, from the process CPU clock: nanoseconds; for the Redis
daemon also redis-server's). Then per server the medians, the sidekey/floor ratios (median
of the per-round ratios: both measured in the same round) of p50, calls/s and CPU per
call, the shipped client against floor.py, Redis against SQLite, and the issue 13 targets
next to them (raw c=1 p50 <= 1.5x floor, >= 3,000 calls/s at c=N, shipped client <= 2x
floor.py at c=1, Redis <= 2x SQLite), marked met / NOT MET (printed, never asserted).
With ``--before REV``, a daemon of REV's code per state store (``sqlite-before``,
``redis-before``; its shipped-client bursts import REV's client) joins the rotation, and
the summary adds this tree's after/before ratios, all measured in the same rounds as the
floor: the before/after table and both ratios to the floor from one run.
Last, untimed, ``strace -f -c`` is attached to each server (all threads) for a burst of
``--count-calls`` calls (default 300; 0 skips it) at c=1 and at c=N (at least 4 calls per
connection), and fsync + fdatasync, futex and all syscalls per call are printed (ptrace
slows the server several times, so at c=N its group-commit batches differ from the timed
runs'). Without strace (or
without the right to attach) the run says why and goes on without those figures. Every
burst is bounded (``--burst-timeout``, default 300 s); servers, bursts and the temporary
directory are cleaned up on every way out (also SIGTERM).

    python benchmarks/bench_call.py [--calls 2000] [--users 1] [--state sqlite|redis]
                                    [--audit-key] [--profile] [--json]
    python benchmarks/bench_call.py --before 7910066^ [--rounds 4] [--calls 500]
                                    [--concurrency 32] [--users 1] [--json]
    python benchmarks/bench_call.py --floor [--state both|sqlite|redis] [--rounds 4]
                                    [--calls 500] [--concurrency 32] [--count-calls 300]
                                    [--before REV] [--audit-key] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import pstats
import queue
import re
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
FLOOR_DIR = ROOT.parent / "shared" / "bench"  # ../shared/bench: floor.py, floor_server.py

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


def start_daemon(root: Path, config: Path, profile: Path | None,
                 env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += ["-m", "sidekey", *serve_args(config)]
    return spawn_daemon(root, cmd, env)


def serve_args(config: Path) -> list[str]:
    """The daemon's command line after ``sidekey`` (or whatever runs its main)."""
    return ["--log-level", "warning", "serve", "--config", str(config)]


def spawn_daemon(root: Path, cmd: list[str],
                 env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Run ``cmd`` (a daemon of ``setup(root)``'s config) in ``root`` with its stderr in
    daemon.log (and ``env``, default this process's); return once its socket accepts a
    connection (SystemExit after 20 s, or if it exits)."""
    log = open(root / "daemon.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=log, env=env)
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


def _use_src(src: str | None) -> None:
    """Import ``sidekey`` from ``src`` from now on (a ``--before`` revision's client): the
    spawned process already imported this tree's package with this module."""
    if src is None:
        return
    for name in [m for m in sys.modules if m == "sidekey" or m.startswith("sidekey.")]:
        del sys.modules[name]
    sys.path.insert(0, src)


def _client_process(sock_path: str, tokens: list[str], n: int, q: Any,
                    src: str | None = None) -> None:
    _use_src(src)
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


def _tool_call_process(sock_path: str, tokens: list[str], n: int, q: Any,
                       src: str | None = None) -> None:
    """``n`` sequential calls with the shipped client's ``tool_call`` context manager, the
    way an MCP server author is told to write one (authorize [+ redeem in the same request
    where the client does so] -> body -> release)."""
    _use_src(src)
    from sidekey.client import Client

    lat: list[float] = []
    with Client(socket_path=sock_path) as c:
        t_start = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            with c.tool_call(SERVER, TOOL, agent_id="content-writer", session_id="bench",
                             arguments=ARGS, user_token=tokens[i % len(tokens)]) as lease:
                assert lease.lease_id, lease
            lat.append(time.perf_counter() - t0)
        wall = time.perf_counter() - t_start
    q.put((wall, lat))


def run_in_process(target: Any, *args: Any, timeout: float = 600,
                   src: str | None = None) -> tuple[float, list[float]]:
    """Run ``target(*args, queue)`` (``target(*args, queue, src)`` when ``src`` is given: the
    ``src/`` to import the client from) in a fresh (spawned) process and return what it
    puts on the queue; SystemExit if it dies first or takes over ``timeout`` seconds. The
    process is killed on every way out (also an exception or a signal in this one)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q) if src is None else (*args, q, src))
    p.start()
    deadline = time.monotonic() + timeout
    try:
        while True:  # fail fast if the run's process dies (a failed assertion) before answering
            try:
                result: tuple[float, list[float]] = q.get(timeout=1)
                break
            except queue.Empty:
                if not p.is_alive() or time.monotonic() > deadline:
                    raise SystemExit(f"{getattr(target, '__name__', target)}: no result "
                                     f"(exit code {p.exitcode})") from None
        p.join(30)
    finally:
        if p.is_alive():
            p.kill()
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


# --------------------------------------------------------------------------- setup helpers


def add_audit_key(root: Path, config: Path, env: dict[str, str] | None = None) -> None:
    """Create an Ed25519 audit key (``sidekey keygen audit``) in ``root/keys`` and name it
    in ``config`` (audit.checkpoint_key_file): the daemon then signs checkpoints."""
    subprocess.run([sys.executable, "-m", "sidekey", "keygen", "audit", "--out",
                    str(root / "keys" / "audit.pem")], check=True, capture_output=True,
                   env=env, timeout=60)
    cfg = yaml.safe_load(config.read_text())
    cfg["audit"] = {**(cfg.get("audit") or {}), "checkpoint_key_file": "keys/audit.pem"}
    config.write_text(yaml.safe_dump(cfg))


def use_redis(root: Path, config: Path) -> Any:
    """Start a redis-server in ``root/redis`` (loopback) and point ``config``'s state at it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from redis_server import RedisServer  # type: ignore[import-not-found]

    (root / "redis").mkdir()
    redis = RedisServer(root / "redis").start()
    cfg = yaml.safe_load(config.read_text())
    cfg["state"] = {**cfg["state"], "backend": "redis", "redis_url": redis.url}
    config.write_text(yaml.safe_dump(cfg))
    return redis


def extract_rev(rev: str, dest: Path) -> tuple[str, Path]:
    """(full commit id, ``src/`` directory) of ``rev``'s tree extracted under ``dest``
    (``git archive REV src | tar -x``; bounded: 120 s each)."""
    git = ["git", "-C", str(ROOT)]
    try:
        sha = subprocess.run([*git, "rev-parse", "--verify", f"{rev}^{{commit}}"], check=True,
                             capture_output=True, text=True, timeout=120).stdout.strip()
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"--before {rev}: not a commit of {ROOT}: {e.stderr.strip()}") from None
    dest.mkdir()
    archive = subprocess.Popen([*git, "archive", sha, "src"], stdout=subprocess.PIPE)
    try:
        subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True,
                       timeout=120)
    finally:
        assert archive.stdout is not None
        archive.stdout.close()
        if archive.wait(120) != 0:
            raise SystemExit(f"git archive {sha} failed (exit {archive.returncode})")
    return sha, dest / "src"


def code_env(src: Path) -> dict[str, str]:
    """This process's environment with ``src`` as the only PYTHONPATH entry, after checking
    that a Python started with it imports ``sidekey`` from ``src`` (not an installed copy)."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    found = subprocess.run([sys.executable, "-c", "import sidekey; print(sidekey.__file__)"],
                           env=env, capture_output=True, text=True, timeout=60)
    where = Path(found.stdout.strip() or "?").resolve()
    if found.returncode != 0 or not where.is_relative_to(src.resolve()):
        raise SystemExit(f"PYTHONPATH={src}: sidekey imports from {where} "
                         f"{found.stderr.strip()[-500:]}")
    return env


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


# Logged (WARNING) by the audit file sink when slow fsyncs send its commits to a worker
# thread for 30 s (sidekey.audit.jsonl, THREADED_BACKOFF_S), in both old and new code: a
# burst that ran (partly) in that mode pays thread hops, so it is marked.
_THREAD_SWITCH = b"committing from a worker thread"


def slow_disk_switches(root: Path) -> int:
    """How often the daemon in ``root`` switched to thread commits so far (its log)."""
    try:
        return (root / "daemon.log").read_bytes().count(_THREAD_SWITCH)
    except OSError:
        return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads, exited ones included)
    so far: its process CPU clock (nanoseconds; Linux lets any process read another's,
    clockid = ``MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)``), else /proc/<pid>/stat
    (clock ticks: 10 ms at the usual 100 Hz, too coarse for a short burst of the floor)."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return "load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def print_profile(profile: Path, label: str) -> None:
    if profile.exists():
        print(f"\n{label} daemon profile, top 25 by internal time:")
        pstats.Stats(str(profile)).sort_stats("tottime").print_stats(25)


# --------------------------------------------------------------------------- runs


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Before/after in one run: --before REV runs REV's code and this tree's (with an "
               "audit key) side by side in alternating bursts. Against the floor in one run: "
               "--floor (SQLite and Redis daemons, floor_server.py, floor.py, strace syscall "
               "counts; with --before REV, REV's daemons too). See the module docstring.")
    ap.add_argument("--calls", type=int, default=None,
                    help="calls per run (default 2000); with --before or --floor, calls per "
                         "burst at c=1 (default 500; about twice as many at --concurrency)")
    ap.add_argument("--concurrency", type=int, default=32, help="workers for the concurrent run")
    ap.add_argument("--users", type=int, default=1,
                    help="distinct users (tokens), calls round-robin over them (default 1)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed calls first, round-robin over the users "
                         "(default: one per user, at least 100)")
    ap.add_argument("--audit-key", action="store_true",
                    help="configure an audit key: signed audit.checkpoint events "
                         "(with --before: always, for the after daemon only)")
    ap.add_argument("--before", metavar="REV", default=None,
                    help="also run git revision REV's code (e.g. 7910066^) and compare, in "
                         "alternating bursts, with this tree's (audit key configured); with "
                         "--floor: REV's daemon per state store (and REV's shipped client) "
                         "join the floor run, which then prints after/before ratios too")
    ap.add_argument("--rounds", type=int, default=4,
                    help="with --before or --floor: alternating rounds at each concurrency "
                         "(default 4)")
    ap.add_argument("--profile", action="store_true", help="profile the daemon(s) with cProfile")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    ap.add_argument("--state", choices=["sqlite", "redis", "both"], default=None,
                    help="state store (redis: a redis-server started here on loopback; "
                         "both: with --floor only, one daemon of each, and their ratios). "
                         "Default: sqlite, or both with --floor")
    ap.add_argument("--floor", action="store_true",
                    help="run ../shared/bench/floor_server.py next to the daemon(s) in "
                         "alternating bursts (raw client, c=1 and c=--concurrency), floor.py "
                         "next to the shipped client (c=1), then count syscalls per call "
                         "with strace; print the sidekey/floor ratios against the issue 13 "
                         "targets (see the module docstring)")
    ap.add_argument("--floor-dir", default=str(FLOOR_DIR),
                    help=f"where floor.py and floor_server.py are (default {FLOOR_DIR})")
    ap.add_argument("--count-calls", type=int, default=300,
                    help="with --floor: calls of each untimed strace burst (default 300; "
                         "0: no syscall counts)")
    ap.add_argument("--burst-timeout", type=float, default=300,
                    help="with --floor: seconds any one burst or floor.py run may take "
                         "(default 300)")
    args = ap.parse_args()
    if args.state is None:
        args.state = "both" if args.floor else "sqlite"
    if args.state == "both" and not args.floor:
        ap.error("--state both needs --floor")
    if args.floor and args.profile:
        ap.error("--profile is not supported with --floor")
    if args.count_calls < 0 or args.burst_timeout <= 0:
        ap.error("--count-calls must be >= 0 and --burst-timeout > 0")
    if args.users < 1:
        ap.error("--users must be at least 1")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.calls is not None and args.calls < 1:
        ap.error("--calls must be at least 1")
    warmup = max(100, args.users) if args.warmup is None else args.warmup
    # A SIGTERM (a CI timeout, kill PID) unwinds like Ctrl-C: every finally stops the
    # servers and bursts this run started and removes its temporary directory.
    signal.signal(signal.SIGTERM, _terminated)
    print(loadavg(), flush=True)
    if args.floor:
        rc = floor_compare(args, warmup)  # with --before: REV's daemons join the run
    elif args.before is not None:
        rc = compare(args, warmup)
    else:
        rc = single(args, warmup)
    print(loadavg(), flush=True)
    return rc


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def warm_up(sock_path: str, tokens: list[str], concurrency: int, warmup: int, users: int) -> None:
    """Every user once at least (tokens verified and cached, quota rows created)."""
    warm_c = max(1, min(concurrency, users, warmup))
    if warmup > 0:
        run_in_process(_raw_process, sock_path, tokens, warm_c, -(-warmup // warm_c))


def single(args: argparse.Namespace, warmup: int) -> int:
    calls = 2000 if args.calls is None else args.calls
    root = Path(tempfile.mkdtemp(prefix="skb-"))
    profile = root / "daemon.prof" if args.profile else None
    redis = None
    try:
        config = setup(root)
        if args.state == "redis":
            redis = use_redis(root, config)
        if args.audit_key:
            add_audit_key(root, config)
        print(f"state store: {args.state}, users: {args.users}, warm-up calls: {warmup}, "
              f"audit key: {'yes' if args.audit_key else 'no'}", flush=True)
        t0 = time.perf_counter()
        tokens = user_tokens(root, args.users)
        print(f"minted {args.users} user token(s) in {time.perf_counter() - t0:.1f} s (not timed)",
              flush=True)
        proc = start_daemon(root, config, profile)
        sock_path = str(root / "run" / "sock")
        try:
            results = []
            warm_up(sock_path, tokens, args.concurrency, warmup, args.users)
            results.append(report("client c=1", *run_in_process(_client_process, sock_path,
                                                                tokens, calls)))
            results.append(report("raw c=1", *run_in_process(_raw_process, sock_path, tokens, 1,
                                                             calls)))
            per = max(1, calls // args.concurrency) * 2
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
        if profile is not None:
            print_profile(profile, "the")
            if profile.exists() and os.environ.get("SIDEKEY_BENCH_KEEP_PROFILE"):
                shutil.copy(profile, os.environ["SIDEKEY_BENCH_KEEP_PROFILE"])
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def compare(args: argparse.Namespace, warmup: int) -> int:
    """``--before REV``: REV's daemon and this tree's (audit key) in alternating bursts."""
    calls = 500 if args.calls is None else args.calls
    conc = args.concurrency
    base = Path(tempfile.mkdtemp(prefix="skb-"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    redises: list[Any] = []
    started = time.monotonic()
    try:
        sha, before_src = extract_rev(args.before, base / "before-tree")
        srcs = {"before": before_src, "after": ROOT / "src"}
        envs = {name: code_env(src) for name, src in srcs.items()}
        head = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=60).stdout.strip()
        print(f"before: {args.before} = {sha[:12]} (PYTHONPATH {before_src})\n"
              f"after:  this tree {head or '?'} (PYTHONPATH {srcs['after']}), audit key: "
              f"hash chain + signed checkpoints\n"
              f"state store: {args.state}, users: {args.users}, warm-up calls: {warmup}, "
              f"rounds: {args.rounds}, calls per burst: c=1 {calls}, "
              f"c={conc} {max(1, calls // conc) * 2 * conc}", flush=True)
        roots: dict[str, Path] = {}
        tokens: dict[str, list[str]] = {}
        for name in ("before", "after"):
            root = roots[name] = base / name
            root.mkdir()
            config = setup(root)
            if args.state == "redis":
                redises.append(use_redis(root, config))
            if name == "after":
                add_audit_key(root, config, envs[name])
            tokens[name] = user_tokens(root, args.users)
            profile = root / "daemon.prof" if args.profile else None
            procs[name] = start_daemon(root, config, profile, envs[name])
            warm_up(str(root / "run" / "sock"), tokens[name], conc, warmup, args.users)
        # (calls/s, p50 ms, p99 ms, daemon CPU ms per call) per burst, by (name, concurrency)
        results: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
        for rnd in range(args.rounds):
            for c in (1, conc):
                per = calls if c == 1 else max(1, calls // c) * 2
                order = ["before", "after"] if rnd % 2 == 0 else ["after", "before"]
                cols = {}
                for name in order:
                    cpu0 = cpu_seconds(procs[name].pid)
                    switched0 = slow_disk_switches(roots[name])
                    wall, lat = run_in_process(_raw_process, str(roots[name] / "run" / "sock"),
                                               tokens[name], c, per)
                    cpu = (cpu_seconds(procs[name].pid) - cpu0) / len(lat) * 1000
                    lat.sort()
                    got = (len(lat) / wall, lat[len(lat) // 2] * 1000,
                           lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, cpu)
                    results.setdefault((name, c), []).append(got)
                    cols[name] = (f"{name} {got[0]:6.0f} calls/s p50 {got[1]:.3f} ms "
                                  f"cpu {cpu:.3f} ms/call")
                    if (switched := slow_disk_switches(roots[name]) - switched0) > 0:
                        cols[name] += f" [slow fsync: thread commits x{switched}]"
                print(f"round {rnd + 1} c={c:<3} {cols['before']}   {cols['after']}   "
                      f"(first: {order[0]})", flush=True)
        for name, proc in procs.items():
            proc.send_signal(signal.SIGTERM)
            if proc.wait(60) != 0:
                print(f"{name} daemon exit code {proc.returncode}")
        procs.clear()
        print(f"\nmedian of {args.rounds} rounds; after/before = median of the per-round ratios "
              "(budget: calls/s >= 0.90x, p50 <= 1.10x)")
        summary = []
        for c in (1, conc):
            b, a = results[("before", c)], results[("after", c)]
            tput = median([x[0] / y[0] for x, y in zip(a, b, strict=True)])
            p50 = median([x[1] / y[1] for x, y in zip(a, b, strict=True)])
            cpu = median([x[3] / y[3] if y[3] else 1.0 for x, y in zip(a, b, strict=True)])
            ok = tput >= 0.90 and p50 <= 1.10
            row: dict[str, Any] = {"concurrency": c}
            for name, runs in (("before", b), ("after", a)):
                row[name] = {"calls_per_s": round(median([r[0] for r in runs])),
                             "p50_ms": round(median([r[1] for r in runs]), 3),
                             "p99_ms": round(median([r[2] for r in runs]), 3),
                             "daemon_cpu_ms_per_call": round(median([r[3] for r in runs]), 3)}
            row["ratio"] = {"calls_per_s": round(tput, 3), "p50": round(p50, 3),
                            "daemon_cpu": round(cpu, 3)}
            summary.append(row)
            print(f"c={c:<3} before {row['before']['calls_per_s']:6} calls/s "
                  f"p50 {row['before']['p50_ms']:.3f} ms | after {row['after']['calls_per_s']:6} "
                  f"calls/s p50 {row['after']['p50_ms']:.3f} ms | after/before: calls/s "
                  f"x{tput:.3f}, p50 x{p50:.3f} -> {'within' if ok else 'OVER'} 10 %")
            print(f"      daemon CPU per call: before "
                  f"{row['before']['daemon_cpu_ms_per_call']:.3f} ms, after "
                  f"{row['after']['daemon_cpu_ms_per_call']:.3f} ms (x{cpu:.3f})")
        for name in roots:
            audit = (roots[name] / "state" / "audit.jsonl").read_bytes()
            lines, checkpoints = audit.count(b"\n"), audit.count(b'"audit.checkpoint"')
            print(f"{name}: {lines} audit lines, {checkpoints} of them audit.checkpoint; "
                  f"{slow_disk_switches(roots[name])} switch(es) to thread commits (slow fsync)")
        print(f"took {time.monotonic() - started:.0f} s")
        if args.json:
            print(json.dumps({"before": sha, "after": head, "state": args.state,
                              "users": args.users, "rounds": args.rounds, "results": summary}))
        if args.profile:
            for name in roots:
                print_profile(roots[name] / "daemon.prof", name)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(60)
        for redis in redises:
            redis.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------- against the floor


# The issue 13 targets, printed next to the measured ratios (never asserted).
TARGET_RAW_P50 = 1.5  # raw client, c=1: sidekey p50 <= 1.5x floor_server p50
TARGET_CALLS_S = 3000  # raw client, c=--concurrency: sidekey calls/s
TARGET_CLIENT_P50 = 2.0  # shipped client, c=1: p50 <= 2x floor.py p50
TARGET_REDIS = 2.0  # Redis state: p50 <= 2x, calls/s >= 1/2x the SQLite daemon's

# (calls/s, p50 ms, p99 ms, daemon CPU ms per call, redis-server CPU ms per call)
Burst = tuple[float, float, float, float, float]


class Target:
    """One server driven by the raw client: the floor server or a sidekey daemon."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], sock: str, tokens: list[str],
                 root: Path, redis: Any = None, src: str | None = None) -> None:
        self.name, self.proc, self.sock, self.tokens = name, proc, sock, tokens
        self.root, self.redis = root, redis
        self.src = src  # a --before revision's src/ (its daemon and its shipped client)

    @property
    def sidekey(self) -> bool:
        return self.name != "floor"

    def redis_pid(self) -> int | None:
        proc = getattr(self.redis, "proc", None)
        return None if proc is None else int(proc.pid)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (a daemon that forks workers is measured whole)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):  # exited between listing and reading
            total += cpu_seconds(p)
    return total


def wait_for_socket(proc: subprocess.Popen[bytes], sock_path: str, what: str, log: Path) -> None:
    """Return once ``sock_path`` accepts a connection (SystemExit after 20 s or if ``proc``
    exits, with the tail of ``log``)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited ({proc.returncode}): "
                             f"{log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock_path)
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not start")


def start_floor_server(root: Path, floor_dir: Path) -> subprocess.Popen[bytes]:
    """``floor_server.py root/sock root`` (its audit file in ``root``), once it accepts."""
    log = open(root / "floor.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, str(floor_dir / "floor_server.py"),
                             str(root / "sock"), str(root)], cwd=root,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    try:
        wait_for_socket(proc, str(root / "sock"), "floor_server.py", root / "floor.log")
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM, SIGKILL after ``timeout`` s; the exit code (negative: the signal)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


def run_floor_py(floor_dir: Path, n: int, tmp: Path,
                 timeout: float = 300) -> tuple[float, float, float]:
    """(calls/s, p50 ms, p99 ms) printed by ``floor.py n`` (c=1, its own client and server in one
    process pair; its temp dir under ``tmp``: TMPDIR). The process group is killed if it
    takes over ``timeout`` s."""
    tmp.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(floor_dir / "floor.py"), str(n)],
                            env={**os.environ, "TMPDIR": str(tmp)}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # floor.py forks its server: the whole group
        proc.communicate()
        raise
    # "floor: p50 612 us  p99 1400 us  1580 calls/s (concurrency 1, ...)"
    m = re.search(rb"p50 (\d+) us\s+p99 (\d+) us\s+(\d+) calls/s", out)
    if proc.returncode != 0 or m is None:
        raise SystemExit(f"floor.py failed ({proc.returncode}): {out!r} {err[-1000:]!r}")
    return float(m.group(3)), int(m.group(1)) / 1000, int(m.group(2)) / 1000


# Untimed syscall counting. strace stops the daemon at every syscall (ptrace): it runs several
# times slower, so the counts are of a burst apart from the timed ones, and at c>1 the group
# commit batches differ (more requests are ready per loop turn) from an untraced run.

SyscallCounts = dict[str, int]


def strace_problem() -> str | None:
    """Why strace cannot be used here, or None."""
    if shutil.which("strace") is None:
        return "strace is not installed (apt-get install strace)"
    if os.geteuid() != 0:
        scope = Path("/proc/sys/kernel/yama/ptrace_scope")
        if scope.exists() and scope.read_text().strip() != "0":
            return f"not root and {scope} = {scope.read_text().strip()}: cannot attach"
    return None


def parse_strace_summary(text: str) -> SyscallCounts:
    """{syscall: calls} from ``strace -c``'s table (the 'total' row left out)."""
    counts: SyscallCounts = {}
    for line in text.splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(parts) in (5, 6) and parts[0][0].isdigit() and parts[-1] != "total":
            try:
                counts[parts[-1]] = counts.get(parts[-1], 0) + int(parts[3])
            except ValueError:
                continue
    return counts


def _all_traced(pids: list[int]) -> bool:
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                status = (task / "status").read_text()
            except OSError:
                continue
            tracer = next((ln.split()[1] for ln in status.splitlines()
                           if ln.startswith("TracerPid:")), "0")
            if tracer == "0":
                return False
    return True


def count_syscalls(pid: int, tmp: Path, burst: Any) -> tuple[SyscallCounts, int] | str:
    """Attach ``strace -f -c`` to ``pid`` (and its live children, all threads), run
    ``burst()`` (-> calls made), detach; ({syscall: count}, calls), or why not."""
    if (problem := strace_problem()) is not None:
        return problem
    out, err = tmp / "strace.out", tmp / "strace.err"
    out.unlink(missing_ok=True)
    pids = process_tree(pid)
    with open(err, "wb") as err_f:
        tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(out),
                                   *itertools.chain.from_iterable(("-p", str(p)) for p in pids)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=err_f, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not _all_traced(pids):
            if tracer.poll() is not None or time.monotonic() > deadline:
                return ("strace could not attach: "
                        + err.read_text(errors="replace").strip()[-300:])
            time.sleep(0.05)
        calls = int(burst())
    finally:
        if tracer.poll() is None:
            tracer.send_signal(signal.SIGINT)  # detach and write the summary
            try:
                tracer.wait(60)
            except subprocess.TimeoutExpired:
                tracer.kill()
                tracer.wait(30)
    if not out.exists():
        return "strace wrote no summary: " + err.read_text(errors="replace").strip()[-300:]
    return parse_strace_summary(out.read_text()), calls


def floor_compare(args: argparse.Namespace, warmup: int) -> int:
    """``--floor``: the floor server and sidekey daemon(s) in one run, alternating bursts."""
    calls = 500 if args.calls is None else args.calls
    conc = args.concurrency
    floor_dir = Path(args.floor_dir)
    for script in ("floor.py", "floor_server.py"):
        if not (floor_dir / script).is_file():
            raise SystemExit(f"--floor-dir {floor_dir}: no {script}")
    states = ["sqlite", "redis"] if args.state == "both" else [args.state]
    per_c = max(1, calls // conc) * 2  # per worker at c=conc: about twice the c=1 burst
    base = Path(tempfile.mkdtemp(prefix="skb-"))
    targets: list[Target] = []
    redises: list[Any] = []
    started = time.monotonic()
    try:
        env = code_env(ROOT / "src")
        head = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=60).stdout.strip()
        print(f"sidekey: this tree {head or '?'} (PYTHONPATH {ROOT / 'src'}), state: "
              f"{', '.join(states)}, audit key: {'yes' if args.audit_key else 'no'}, "
              f"users: {args.users}, warm-up calls: {warmup}\n"
              f"floor: {floor_dir / 'floor_server.py'} (raw client) and "
              f"{floor_dir / 'floor.py'} (c=1, its own client)\n"
              f"rounds: {args.rounds}, calls per burst: c=1 {calls}, c={conc} {per_c * conc}, "
              f"shipped client c=1 {calls}; python {sys.version.split()[0]}", flush=True)
        (base / "floor").mkdir()
        fproc = start_floor_server(base / "floor", floor_dir)
        targets.append(Target("floor", fproc, str(base / "floor" / "sock"),
                              [f"floor-user-{i}" for i in range(args.users)], base / "floor"))
        for state in states:
            root = base / state
            root.mkdir()
            config = setup(root)
            redis = None
            if state == "redis":
                redis = use_redis(root, config)
                redises.append(redis)  # stopped by the finally below whatever happens next
            if args.audit_key:
                add_audit_key(root, config, env)
            tokens = user_tokens(root, args.users)
            proc = spawn_daemon(root, [sys.executable, "-m", "sidekey", *serve_args(config)],
                                env)
            targets.append(Target(state, proc, str(root / "run" / "sock"), tokens, root, redis))
        if args.before is not None:
            # REV's daemon (and REV's shipped client) next to this tree's, per state store:
            # the before/after table comes from the same run as the floor's.
            sha, before_src = extract_rev(args.before, base / "before-tree")
            benv = code_env(before_src)
            print(f"before: {args.before} = {sha[:12]} (PYTHONPATH {before_src}), as "
                  f"{', '.join(s + '-before' for s in states)}", flush=True)
            for state in states:
                root = base / f"{state}-before"
                root.mkdir()
                config = setup(root)
                redis = None
                if state == "redis":
                    redis = use_redis(root, config)
                    redises.append(redis)
                if args.audit_key:
                    add_audit_key(root, config, benv)
                tokens = user_tokens(root, args.users)
                proc = spawn_daemon(root, [sys.executable, "-m", "sidekey",
                                           *serve_args(config)], benv)
                targets.append(Target(f"{state}-before", proc, str(root / "run" / "sock"),
                                      tokens, root, redis, str(before_src)))
        for t in targets:
            warm_up(t.sock, t.tokens, conc, warmup, args.users)
        sidekeys = [t for t in targets if t.sidekey]
        # per (target name, "raw"|"client", concurrency); target "floor.py" for floor.py
        results: dict[tuple[str, str, int], list[Burst]] = {}

        def raw_burst(t: Target, c: int, n: int) -> Burst:
            cpu0 = tree_cpu_seconds(t.proc.pid)
            rpid = t.redis_pid()
            rcpu0 = cpu_seconds(rpid) if rpid else 0.0
            wall, lat = run_in_process(_raw_process, t.sock, t.tokens, c, n,
                                       timeout=args.burst_timeout)
            return summarize(wall, lat, tree_cpu_seconds(t.proc.pid) - cpu0,
                             (cpu_seconds(rpid) - rcpu0) if rpid else 0.0)

        for rnd in range(args.rounds):
            # rotate the order every round: load drift and first/last effects weigh on all
            order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
            for c in (1, conc):
                cols = []
                for t in order:
                    switched0 = slow_disk_switches(t.root)
                    got = raw_burst(t, c, calls if c == 1 else per_c)
                    results.setdefault((t.name, "raw", c), []).append(got)
                    cols.append(burst_text(t.name, got, slow_disk_switches(t.root) - switched0))
                print(f"round {rnd + 1} raw    c={c:<3} " + " | ".join(cols), flush=True)
            cols = []
            for t in order:
                if not t.sidekey:
                    tput, p50, p99 = run_floor_py(floor_dir, calls, base / "floor-py",
                                                  timeout=args.burst_timeout)
                    got = (tput, p50, p99, 0.0, 0.0)
                    results.setdefault(("floor.py", "client", 1), []).append(got)
                    cols.append(f"floor.py {tput:6.0f} calls/s p50 {p50:.3f} ms")
                    continue
                for kind, target in (("client", _client_process),
                                     ("tool_call", _tool_call_process)):
                    cpu0 = tree_cpu_seconds(t.proc.pid)
                    wall, lat = run_in_process(target, t.sock, t.tokens, calls,
                                               timeout=args.burst_timeout, src=t.src)
                    got = summarize(wall, lat, tree_cpu_seconds(t.proc.pid) - cpu0, 0.0)
                    results.setdefault((t.name, kind, 1), []).append(got)
                    cols.append(burst_text(f"{t.name} {kind}", got, 0))
            print(f"round {rnd + 1} client c=1   " + " | ".join(cols), flush=True)

        summary = print_floor_summary(args, results, sidekeys, conc)

        syscalls: dict[str, Any] = {}
        if args.count_calls > 0:
            # at c=N at least 4 calls per connection: the N connects are not the whole burst
            count_per = max(4, -(-args.count_calls // conc))
            print(f"\nsyscalls per call: strace -f -c attached to each server (all threads) "
                  f"for an untimed burst of {args.count_calls} calls (c=1) and "
                  f"{count_per * conc} calls (c={conc}, {count_per} per connection, the "
                  f"{conc} connects included); ptrace slows the server several times, so at "
                  f"c={conc} its group-commit batches differ from the timed runs'", flush=True)
            for t in targets:
                for c in (1, conc):
                    n = args.count_calls if c == 1 else count_per

                    def burst(t: Target = t, c: int = c, n: int = n) -> int:
                        return len(run_in_process(_raw_process, t.sock, t.tokens, c, n,
                                                  timeout=args.burst_timeout)[1])

                    switched0 = slow_disk_switches(t.root)
                    got_sc = count_syscalls(t.proc.pid, base, burst)
                    if isinstance(got_sc, str):
                        print(f"  {t.name:<7} c={c:<3} no figure: {got_sc}", flush=True)
                        syscalls[f"{t.name} c={c}"] = {"error": got_sc}
                        continue
                    counts, n_calls = got_sc
                    fsyncs = counts.get("fsync", 0) + counts.get("fdatasync", 0)
                    total = sum(counts.values())
                    top = sorted(counts.items(), key=lambda kv: -kv[1])[:4]
                    mark = ("  [slow fsync: thread commits]"
                            if slow_disk_switches(t.root) > switched0 else "")
                    print(f"  {t.name:<7} c={c:<3} fsync+fdatasync {fsyncs / n_calls:6.3f}  "
                          f"futex {counts.get('futex', 0) / n_calls:7.2f}  "
                          f"all {total / n_calls:7.1f} per call  (top: "
                          + ", ".join(f"{k} {v / n_calls:.1f}" for k, v in top) + f"){mark}",
                          flush=True)
                    syscalls[f"{t.name} c={c}"] = {
                        "calls": n_calls, "fsyncs_per_call": round(fsyncs / n_calls, 3),
                        "futex_per_call": round(counts.get("futex", 0) / n_calls, 3),
                        "syscalls_per_call": round(total / n_calls, 2),
                        "counts": counts}

        for t in targets:
            code = stop(t.proc, 60)
            if t.sidekey and code != 0:
                print(f"{t.name} daemon exit code {code}: "
                      f"{(t.root / 'daemon.log').read_text(errors='replace')[-1000:]}")
            if t.sidekey:
                print(f"{t.name}: {slow_disk_switches(t.root)} switch(es) to thread commits "
                      "(slow fsync) in the whole run")
        print(f"took {time.monotonic() - started:.0f} s")
        if args.json:
            print(json.dumps({"sidekey": head, "states": states, "users": args.users,
                              "rounds": args.rounds, "summary": summary,
                              "syscalls": syscalls}))
    finally:
        for t in targets:
            stop(t.proc, 30)
        for redis in redises:
            redis.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


def summarize(wall: float, lat: list[float], cpu_s: float, redis_cpu_s: float) -> Burst:
    lat = sorted(lat)
    n = len(lat)
    return (n / wall, lat[n // 2] * 1000, lat[min(n - 1, int(n * 0.99))] * 1000,
            cpu_s / n * 1000, redis_cpu_s / n * 1000)


def burst_text(name: str, b: Burst, switched: int) -> str:
    text = f"{name} {b[0]:6.0f} calls/s p50 {b[1]:.3f} ms cpu {b[3]:.3f}"
    if b[4]:
        text += f" (+redis-server {b[4]:.3f})"
    text += " ms/call"
    if switched > 0:
        text += f" [slow fsync: thread commits x{switched}]"
    return text


def print_floor_summary(args: argparse.Namespace,
                        results: dict[tuple[str, str, int], list[Burst]],
                        sidekeys: list[Target], conc: int) -> dict[str, Any]:
    """Medians per server and concurrency, sidekey/floor ratios (median of the per-round
    ratios: both measured in the same round), and the issue 13 targets; returns them."""

    def med(key: tuple[str, str, int], i: int) -> float:
        return median([b[i] for b in results[key]])

    def ratio(a: tuple[str, str, int], b: tuple[str, str, int], i: int) -> float:
        return median([x[i] / y[i] if y[i] else float("inf")
                       for x, y in zip(results[a], results[b], strict=True)])

    print(f"\nmedians of {args.rounds} rounds; ratio = median of the per-round sidekey/floor "
          "ratios (p50: lower is better, calls/s: higher is better)")
    print(f"{'':<26}{'p50 c=1':>10}{'calls/s c=1':>13}{f'p50 c={conc}':>11}"
          f"{f'calls/s c={conc}':>14}{'CPU/call c=1':>14}{f'CPU/call c={conc}':>15}")

    def row(label: str, name: str) -> None:
        one, many = (name, "raw", 1), (name, "raw", conc)
        extra = ""
        if med(one, 4):
            extra = (f"   (+redis-server CPU/call {med(one, 4):.3f} / "
                     f"{med(many, 4):.3f} ms)")
        print(f"{label:<26}{med(one, 1):>7.3f} ms{med(one, 0):>13.0f}{med(many, 1):>8.3f} ms"
              f"{med(many, 0):>14.0f}{med(one, 3):>11.3f} ms{med(many, 3):>12.3f} ms{extra}")

    summary: dict[str, Any] = {"concurrency": conc}
    floor1, floorn = ("floor", "raw", 1), ("floor", "raw", conc)
    row("floor (floor_server.py)", "floor")
    summary["floor"] = {"raw_c1": medians(results[floor1]), f"raw_c{conc}": medians(
        results[floorn]), "floor_py_c1": medians(results[("floor.py", "client", 1)])}
    for t in sidekeys:
        one, many = (t.name, "raw", 1), (t.name, "raw", conc)
        row(f"sidekey {t.name}, raw", t.name)
        r = {"p50_c1": ratio(one, floor1, 1), "calls_s_c1": ratio(one, floor1, 0),
             f"p50_c{conc}": ratio(many, floorn, 1), f"calls_s_c{conc}": ratio(many, floorn, 0),
             "cpu_c1": ratio(one, floor1, 3), f"cpu_c{conc}": ratio(many, floorn, 3)}
        print(f"{'  ratio sidekey/floor':<26}{'x' + format(r['p50_c1'], '.2f'):>10}"
              f"{'x' + format(r['calls_s_c1'], '.3f'):>13}"
              f"{'x' + format(r[f'p50_c{conc}'], '.2f'):>11}"
              f"{'x' + format(r[f'calls_s_c{conc}'], '.3f'):>14}"
              f"{'x' + format(r['cpu_c1'], '.1f'):>14}{'x' + format(r[f'cpu_c{conc}'], '.1f'):>15}")
        summary[t.name] = {"raw_c1": medians(results[one]), f"raw_c{conc}": medians(
            results[many]), "client_c1": medians(results[(t.name, "client", 1)]),
            "ratio_vs_floor": {k: round(v, 3) for k, v in r.items()}}
    fpy = ("floor.py", "client", 1)
    print(f"\nshipped client (sidekey.client.Client), c=1, against floor.py (c=1, its own "
          f"minimal client): floor.py p50 {med(fpy, 1):.3f} ms, {med(fpy, 0):.0f} calls/s\n"
          "  client = authorize() + redeem() + release(), 3 requests (a gateway's flow); "
          "tool_call = the with-block an MCP server uses")
    for t in sidekeys:
        summary[t.name]["tool_call_c1"] = medians(results[(t.name, "tool_call", 1)])
        for kind in ("client", "tool_call"):
            key = (t.name, kind, 1)
            p50r, tputr = ratio(key, fpy, 1), ratio(key, fpy, 0)
            summary[t.name][f"{kind}_vs_floor_py"] = {"p50": round(p50r, 3),
                                                      "calls_s": round(tputr, 3)}
            print(f"  sidekey {t.name:<7} {kind:<10} p50 {med(key, 1):.3f} ms (x{p50r:.2f} "
                  f"floor.py), {med(key, 0):.0f} calls/s (x{tputr:.3f}), daemon CPU "
                  f"{med(key, 3):.3f} ms/call")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    print("\ntargets (issue 13):")
    for t in sidekeys:
        s = summary[t.name]
        p50r = s["ratio_vs_floor"]["p50_c1"]
        tput = s[f"raw_c{conc}"]["calls_per_s"]
        cl, tc = s["client_vs_floor_py"]["p50"], s["tool_call_vs_floor_py"]["p50"]
        print(f"  {t.name:<7} raw c=1 p50 <= {TARGET_RAW_P50}x floor: x{p50r:.2f} -> "
              f"{verdict(p50r <= TARGET_RAW_P50)}; c={conc} >= {TARGET_CALLS_S:,} calls/s: "
              f"{tput:,} -> {verdict(tput >= TARGET_CALLS_S)}; shipped client c=1 <= "
              f"{TARGET_CLIENT_P50}x floor.py: client x{cl:.2f} -> "
              f"{verdict(cl <= TARGET_CLIENT_P50)}, tool_call x{tc:.2f} -> "
              f"{verdict(tc <= TARGET_CLIENT_P50)}")
    names = [t.name for t in sidekeys]
    for name in [n for n in names if f"{n}-before" in names]:
        before = f"{name}-before"
        ab = {"p50_c1": ratio((name, "raw", 1), (before, "raw", 1), 1),
              "calls_s_c1": ratio((name, "raw", 1), (before, "raw", 1), 0),
              f"p50_c{conc}": ratio((name, "raw", conc), (before, "raw", conc), 1),
              f"calls_s_c{conc}": ratio((name, "raw", conc), (before, "raw", conc), 0),
              "cpu_c1": ratio((name, "raw", 1), (before, "raw", 1), 3),
              f"cpu_c{conc}": ratio((name, "raw", conc), (before, "raw", conc), 3),
              "client_p50_c1": ratio((name, "client", 1), (before, "client", 1), 1),
              "tool_call_p50_c1": ratio((name, "tool_call", 1), (before, "tool_call", 1), 1)}
        summary[f"{name}_vs_before"] = {k: round(v, 3) for k, v in ab.items()}
        print(f"  {name} after/before (median of per-round ratios): raw c=1 p50 "
              f"x{ab['p50_c1']:.2f}, calls/s x{ab['calls_s_c1']:.2f}, CPU/call "
              f"x{ab['cpu_c1']:.2f}; c={conc} p50 x{ab[f'p50_c{conc}']:.2f}, calls/s "
              f"x{ab[f'calls_s_c{conc}']:.2f}, CPU/call x{ab[f'cpu_c{conc}']:.2f}; shipped "
              f"client p50 x{ab['client_p50_c1']:.2f}, tool_call p50 "
              f"x{ab['tool_call_p50_c1']:.2f}")
    if "sqlite" in names and "redis" in names:
        sq1, rd1 = ("sqlite", "raw", 1), ("redis", "raw", 1)
        sqn, rdn = ("sqlite", "raw", conc), ("redis", "raw", conc)
        rr = {"p50_c1": ratio(rd1, sq1, 1), "calls_s_c1": ratio(sq1, rd1, 0),
              f"p50_c{conc}": ratio(rdn, sqn, 1), f"calls_s_c{conc}": ratio(sqn, rdn, 0),
              "client_p50_c1": ratio(("redis", "client", 1), ("sqlite", "client", 1), 1),
              "tool_call_p50_c1": ratio(("redis", "tool_call", 1), ("sqlite", "tool_call", 1),
                                        1)}
        summary["redis_vs_sqlite"] = {k: round(v, 3) for k, v in rr.items()}
        ok = all(v <= TARGET_REDIS for v in rr.values())
        print(f"  Redis <= {TARGET_REDIS}x SQLite (redis/sqlite for p50, sqlite/redis for "
              f"calls/s): raw c=1 p50 x{rr['p50_c1']:.2f}, calls/s x{rr['calls_s_c1']:.2f}; "
              f"c={conc} p50 x{rr[f'p50_c{conc}']:.2f}, calls/s x{rr[f'calls_s_c{conc}']:.2f}; "
              f"shipped client p50 x{rr['client_p50_c1']:.2f}, tool_call p50 "
              f"x{rr['tool_call_p50_c1']:.2f} -> {verdict(ok)}")
    else:
        print(f"  Redis <= {TARGET_REDIS}x SQLite: not measured (needs --state both)")
    return summary


def medians(bursts: list[Burst]) -> dict[str, float]:
    return {"calls_per_s": round(median([b[0] for b in bursts])),
            "p50_ms": round(median([b[1] for b in bursts]), 3),
            "p99_ms": round(median([b[2] for b in bursts]), 3),
            "daemon_cpu_ms_per_call": round(median([b[3] for b in bursts]), 3),
            "redis_cpu_ms_per_call": round(median([b[4] for b in bursts]), 3)}


if __name__ == "__main__":
    sys.exit(main())
