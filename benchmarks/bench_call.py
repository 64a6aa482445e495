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

    python benchmarks/bench_call.py [--calls 2000] [--users 1] [--state sqlite|redis]
                                    [--audit-key] [--profile] [--json]
    python benchmarks/bench_call.py --before 7910066^ [--rounds 4] [--calls 500]
                                    [--concurrency 32] [--users 1] [--json]
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
    """User + system CPU time of process ``pid`` (all its threads) so far, from /proc
    (clock-tick resolution: 10 ms at the usual 100 Hz, fine over a burst)."""
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
               "audit key) side by side in alternating bursts; see the module docstring.")
    ap.add_argument("--calls", type=int, default=None,
                    help="calls per run (default 2000); with --before, calls per burst at c=1 "
                         "(default 500; about twice as many at --concurrency)")
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
                         "alternating bursts, with this tree's (audit key configured)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="with --before: alternating rounds at each concurrency (default 4)")
    ap.add_argument("--profile", action="store_true", help="profile the daemon(s) with cProfile")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    ap.add_argument("--state", choices=["sqlite", "redis"], default="sqlite",
                    help="state store (redis: a redis-server started here on loopback)")
    args = ap.parse_args()
    if args.users < 1:
        ap.error("--users must be at least 1")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.calls is not None and args.calls < 1:
        ap.error("--calls must be at least 1")
    warmup = max(100, args.users) if args.warmup is None else args.warmup
    print(loadavg(), flush=True)
    rc = compare(args, warmup) if args.before is not None else single(args, warmup)
    print(loadavg(), flush=True)
    return rc


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


if __name__ == "__main__":
    sys.exit(main())
