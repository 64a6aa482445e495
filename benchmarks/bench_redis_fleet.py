"""A fleet on one Redis: is the governed call's throughput flat from 1 to 4 daemons?

Starts one ``redis-server`` on loopback (tests/redis_server.py, as ``bench_call.py --state
redis`` does) and 4 sidekey daemons, each in its own directory (config, socket, keys,
audit file; the quickstart setup of bench_call.py), all with ``state.backend: redis`` on
that server and one key prefix: one fleet sharing burned jtis, leases and quota keys.
Then, for N = 1, 2, 4 (the order rotates every round), one client process (bench_call's
raw pre-encoded HTTP client on trio) drives ``--concurrency`` keep-alive connections
(default 32) split round-robin over the first N daemons, each connection making
authorize + redeem + release calls, and prints per burst:

- aggregate calls/s and p50 / p99 latency of a whole call;
- each driven daemon's CPU time per call it served (user + system, process CPU clock);
- redis-server's CPU time per call (all calls of the burst).

Then the medians per N over ``--rounds`` (default 3) and calls/s at N relative to N=1
("flat": near 1.0; on a 2-core machine 4 daemons, redis-server and the client share the
same two cores, so the aggregate cannot grow, the question is whether it falls).

``--before REV`` also runs a second fleet (its own redis-server, 4 daemons) on git
revision REV's code (``git archive REV src``, as bench_call.py ``--before``), in the same
rounds, alternating with this tree's, and prints its figures next to them.

Bounded: every burst has ``--burst-timeout`` (default 300 s); the daemons, the
redis-servers and the temporary directory are cleaned up on every way out (also SIGTERM).
Prints figures only; asserts nothing.

    python benchmarks/bench_redis_fleet.py [--calls 1200] [--concurrency 32] [--rounds 3]
                                           [--before main] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_call import (  # a sibling script, not a package
    ROOT,
    _authorize_request,
    _raw_worker,
    code_env,
    cpu_seconds,
    extract_rev,
    loadavg,
    median,
    setup,
    start_daemon,
    user_tokens,
    warm_up,
)

FLEET = (1, 2, 4)
PREFIX = "fleet:"


def _fleet_process(socks: list[str], tokens: list[list[str]], concurrency: int,
                   per_worker: int, q: Any) -> None:
    """``concurrency`` workers, worker i on daemon ``i % len(socks)``; puts (wall, latencies)."""
    import trio

    lat: list[float] = []
    reqs = [itertools.cycle([_authorize_request(t) for t in toks]) for toks in tokens]

    async def main() -> float:
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(concurrency):
                d = i % len(socks)
                nursery.start_soon(_raw_worker, socks[d], reqs[d], per_worker, lat)
        return time.perf_counter() - t0

    wall = trio.run(main)
    q.put((wall, lat))


def run_bounded(target: Any, *args: Any, timeout: float) -> tuple[float, list[float]]:
    """``target(*args, queue)`` in a spawned process; its result, or SystemExit if it dies
    or takes over ``timeout`` seconds (killed on every way out)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                result: tuple[float, list[float]] = q.get(timeout=1)
                break
            except queue.Empty:
                if not p.is_alive() or time.monotonic() > deadline:
                    raise SystemExit(f"burst: no result (exit code {p.exitcode})") from None
        p.join(30)
    finally:
        if p.is_alive():
            p.kill()
            p.join(30)
    return result


class Fleet:
    """One redis-server and 4 daemons on it, all running one tree's code."""

    def __init__(self, name: str, base: Path, env: dict[str, str] | None) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        from redis_server import RedisServer  # type: ignore[import-not-found]

        self.name = name
        self.env = env
        self.dir = base / name
        self.dir.mkdir()
        self.redis = RedisServer(self.dir / "redis").start()
        self.roots: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tokens: list[list[str]] = []

    def start(self, users: int, warmup: int) -> None:
        for i in range(max(FLEET)):
            root = self.dir / f"d{i}"
            root.mkdir()
            config = setup(root)
            cfg = yaml.safe_load(config.read_text())
            cfg["state"] = {**cfg["state"], "backend": "redis", "redis_url": self.redis.url,
                            "redis_key_prefix": PREFIX}
            config.write_text(yaml.safe_dump(cfg))
            self.roots.append(root)
            self.tokens.append(user_tokens(root, users))
            self.procs.append(start_daemon(root, config, None, self.env))
            warm_up(self.sock(i), self.tokens[i], 8, warmup, users)

    def sock(self, i: int) -> str:
        return str(self.roots[i] / "run" / "sock")

    def burst(self, n: int, concurrency: int, per_worker: int, timeout: float) -> dict[str, Any]:
        cpu0 = [cpu_seconds(p.pid) for p in self.procs[:n]]
        assert self.redis.proc is not None
        rcpu0 = cpu_seconds(self.redis.proc.pid)
        wall, lat = run_bounded(_fleet_process, [self.sock(i) for i in range(n)],
                                self.tokens[:n], concurrency, per_worker, timeout=timeout)
        rcpu = cpu_seconds(self.redis.proc.pid) - rcpu0
        served = [per_worker * len(range(i, concurrency, n)) for i in range(n)]
        cpu = [(cpu_seconds(p.pid) - c0) / max(1, s) * 1000
               for p, c0, s in zip(self.procs[:n], cpu0, served, strict=True)]
        lat.sort()
        return {"calls": len(lat), "calls_per_s": len(lat) / wall,
                "p50_ms": lat[len(lat) // 2] * 1000,
                "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
                "daemon_cpu_ms_per_call": cpu, "redis_cpu_ms_per_call": rcpu / len(lat) * 1000}

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        self.procs.clear()
        self.redis.stop()


def line(name: str, n: int, b: dict[str, Any]) -> str:
    cpus = " ".join(f"{c:.2f}" for c in b["daemon_cpu_ms_per_call"])
    return (f"{name:<6} N={n} {b['calls_per_s']:6.0f} calls/s  p50 {b['p50_ms']:6.2f} ms  "
            f"p99 {b['p99_ms']:6.2f} ms  daemon CPU ms/call [{cpus}]  "
            f"redis-server CPU {b['redis_cpu_ms_per_call']:.3f} ms/call")


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1200, help="calls per burst (default 1200)")
    ap.add_argument("--concurrency", type=int, default=32,
                    help="connections per burst, split over the daemons (default 32)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--users", type=int, default=1, help="distinct users (default 1)")
    ap.add_argument("--warmup", type=int, default=100, help="untimed calls per daemon (default 100)")
    ap.add_argument("--before", metavar="REV", default=None,
                    help="also run a fleet on git revision REV's code, alternating")
    ap.add_argument("--burst-timeout", type=float, default=300, help="seconds per burst (300)")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args()
    if args.calls < 1 or args.rounds < 1 or args.users < 1 or args.burst_timeout <= 0:
        ap.error("--calls, --rounds, --users must be >= 1 and --burst-timeout > 0")
    if args.concurrency < max(FLEET):
        ap.error(f"--concurrency must be at least {max(FLEET)}")
    signal.signal(signal.SIGTERM, _terminated)
    print(loadavg(), flush=True)
    per_worker = max(1, args.calls // args.concurrency)
    base = Path(tempfile.mkdtemp(prefix="skf-"))
    fleets: list[Fleet] = []
    started = time.monotonic()
    try:
        if args.before is not None:
            sha, src = extract_rev(args.before, base / "before-tree")
            print(f"before: {args.before} = {sha[:12]}; after: this tree ({ROOT / 'src'})")
            fleets.append(Fleet("before", base, code_env(src)))
        fleets.append(Fleet("after" if args.before else "this", base, code_env(ROOT / "src")))
        for fleet in fleets:
            fleet.start(args.users, args.warmup)
        print(f"{max(FLEET)} daemons per fleet on one redis-server each; c={args.concurrency} "
              f"split over N; {per_worker * args.concurrency} calls per burst; "
              f"{args.rounds} rounds", flush=True)
        results: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for rnd in range(args.rounds):
            order = FLEET[rnd % len(FLEET):] + FLEET[:rnd % len(FLEET)]
            for n in order:
                for fleet in fleets if rnd % 2 == 0 else fleets[::-1]:
                    b = fleet.burst(n, args.concurrency, per_worker, args.burst_timeout)
                    results.setdefault((fleet.name, n), []).append(b)
                    print(f"round {rnd + 1} {line(fleet.name, n, b)}", flush=True)
        print(f"\nmedians of {args.rounds} rounds (flat: calls/s at N relative to N=1 near 1.0)")
        summary = []
        for fleet in fleets:
            one = median([b["calls_per_s"] for b in results[(fleet.name, 1)]])
            for n in FLEET:
                runs = results[(fleet.name, n)]
                row = {
                    "fleet": fleet.name, "daemons": n,
                    "calls_per_s": round(median([b["calls_per_s"] for b in runs])),
                    "p50_ms": round(median([b["p50_ms"] for b in runs]), 3),
                    "daemon_cpu_ms_per_call": round(median(
                        [median(b["daemon_cpu_ms_per_call"]) for b in runs]), 3),
                    "redis_cpu_ms_per_call": round(median(
                        [b["redis_cpu_ms_per_call"] for b in runs]), 3),
                }
                row["vs_one_daemon"] = round(row["calls_per_s"] / one, 3) if one else 0.0
                summary.append(row)
                print(f"{fleet.name:<6} N={n} {row['calls_per_s']:6} calls/s "
                      f"(x{row['vs_one_daemon']:.2f} of N=1)  p50 {row['p50_ms']:.2f} ms  "
                      f"daemon CPU {row['daemon_cpu_ms_per_call']:.3f} ms/call (median daemon)  "
                      f"redis-server CPU {row['redis_cpu_ms_per_call']:.3f} ms/call")
        print(f"took {time.monotonic() - started:.0f} s")
        if args.json:
            print(json.dumps(summary))
    finally:
        for fleet in fleets:
            fleet.stop()
        shutil.rmtree(base, ignore_errors=True)
        print(loadavg(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
