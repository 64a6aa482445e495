"""Soak: bounded disk and memory under sustained full load.

Starts a real daemon with ``bench_call``'s setup (quickstart config, local store, SQLite
state, fsynced audit) in a temporary directory, drives it at ``--concurrency`` (default
32) with ``bench_call``'s raw keep-alive client (authorize + redeem + release per call,
users round-robin) for ``--minutes`` (default 30, at most 24 h), and prints every
``--every`` seconds (default 30):

- calls so far and calls/s in the interval;
- the daemon's CPU per call in the interval (user + system, all threads, from /proc);
- the daemon's RSS;
- the size of ``state.db`` and of ``state.db-wal`` (at the sample, and the largest WAL
  seen by a 1-second poll in between: the WAL is what used to grow without bound);
- audit bytes per call in the interval (growth of the audit files / calls).

At the end it prints, for each series, the mean of the last third of the samples against
the first third (the first sample is left out as a warm-up) and says "flat" when the
ratio is within ``--tolerance`` (default 0.25, i.e. 0.75x .. 1.25x). The database size
is bounded by the retention settings, not flat from the start: with the default lease
retention (24 h) it grows for a day at full load. ``--lease-retention S`` writes
``state.lease_retention_s: S`` into the daemon's config so that a soak of minutes
reaches the steady state (an older daemon that lacks the key would refuse the config).
The load average is printed at the start, with every sample, and at the end: the
machine may be shared, and calls/s and CPU per call follow its load.

    python benchmarks/bench_soak.py [--minutes 30] [--every 30] [--concurrency 32]
                                    [--users 100] [--lease-retention S] [--tolerance 0.25]
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

# Run as a script: this directory is sys.path[0].
from bench_call import (
    _authorize_request,
    _Conn,
    _post,
    cpu_seconds,
    setup,
    start_daemon,
    user_tokens,
)

ARGS = {"title": "Q2 update", "draft": True}
MAX_MINUTES = 24 * 60


def _driver(sock_path: str, tokens: list[str], concurrency: int, deadline_wall: float,
            done: Any, errors: Any) -> None:
    """Child process: ``concurrency`` keep-alive connections making governed calls until
    ``deadline_wall`` (time.time()); ``done`` counts completed calls (this process is
    its only writer)."""
    import trio

    auth_reqs = itertools.cycle([_authorize_request(t) for t in tokens])

    async def worker() -> None:
        while time.time() < deadline_wall:
            try:
                stream = await trio.open_unix_socket(sock_path)
            except OSError:
                errors.value += 1
                await trio.sleep(0.1)
                continue
            conn = _Conn(stream)
            try:
                while time.time() < deadline_wall:
                    st, a = await conn.call(next(auth_reqs))
                    if st != 200:
                        errors.value += 1
                        continue
                    st, lease = await conn.call(_post("/v1/redeem", json.dumps(
                        {"resolution_token": a["resolution_token"], "arguments": ARGS}).encode()))
                    if st != 200:
                        errors.value += 1
                        continue
                    st, _ = await conn.call(_post("/v1/release", json.dumps(
                        {"lease_id": lease["lease_id"], "status": "success",
                         "duration_ms": 1}).encode()))
                    if st != 200:
                        errors.value += 1
                        continue
                    done.value += 1
            except (OSError, ConnectionError, ValueError):
                errors.value += 1
            finally:
                await stream.aclose()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)

    trio.run(main)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def audit_bytes(state: Path) -> int:
    return sum(size(p) for p in state.glob("audit.jsonl*"))


def mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def flat_summary(name: str, series: list[float], tolerance: float, unit: str) -> bool:
    """Last third vs first third of ``series`` (the first sample already dropped)."""
    k = max(1, len(series) // 3)
    first, last = series[:k], series[-k:]
    a, b = sum(first) / len(first), sum(last) / len(last)
    ratio = b / a if a else (1.0 if b == 0 else float("inf"))
    ok = 1 - tolerance <= ratio <= 1 + tolerance
    print(f"  {name:<22} first third {a:>12.1f} {unit:<6} last third {b:>12.1f} {unit:<6} "
          f"ratio {ratio:5.2f}  {'flat' if ok else 'NOT flat'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--lease-retention", type=float, default=None, metavar="S",
                    help="state.lease_retention_s for the daemon (default: the daemon's)")
    ap.add_argument("--tolerance", type=float, default=0.25)
    args = ap.parse_args()
    if not 0 < args.minutes <= MAX_MINUTES:
        ap.error(f"--minutes must be in (0, {MAX_MINUTES}]")
    if not 1 <= args.every <= args.minutes * 60:
        ap.error("--every must be at least 1 s and at most the run")

    root = Path(tempfile.mkdtemp(prefix="sks-"))
    try:
        config = setup(root)
        if args.lease_retention is not None:
            cfg = yaml.safe_load(config.read_text())
            cfg["state"]["lease_retention_s"] = args.lease_retention
            config.write_text(yaml.safe_dump(cfg))
        tokens = user_tokens(root, args.users)
        state = root / "state"
        proc = start_daemon(root, config, None)
        pid = proc.pid
        print(f"soak: {args.minutes:g} min at c={args.concurrency}, {args.users} users, "
              f"sample every {args.every:g} s, lease retention "
              f"{'daemon default' if args.lease_retention is None else f'{args.lease_retention:g} s'}"
              f", cpus {os.cpu_count()}", flush=True)
        print("load average (1, 5, 15 min) at start: "
              + ", ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
        ctx = mp.get_context("spawn")
        done = ctx.Value(ctypes.c_long, 0, lock=False)
        errors = ctx.Value(ctypes.c_long, 0, lock=False)
        t_start = time.time()
        end = t_start + args.minutes * 60
        driver = ctx.Process(target=_driver, args=(str(state.parent / "run" / "sock"), tokens,
                                                    args.concurrency, end, done, errors))
        driver.start()
        header = (f"{'t_s':>6} {'calls':>9} {'calls/s':>8} {'cpu_us/call':>11} {'rss_MB':>7} "
                  f"{'db_MB':>7} {'wal_MB':>7} {'wal_max_MB':>10} {'audit_B/call':>12} "
                  f"{'errors':>6} {'load1':>5}")
        print(header, flush=True)
        rows: list[dict[str, float]] = []
        prev_t, prev_calls, prev_cpu, prev_audit = time.time(), 0, cpu_seconds(pid), audit_bytes(state)
        wal_max = 0
        try:
            next_sample = prev_t + args.every
            while True:
                now = time.time()
                if now >= next_sample or now >= end:
                    calls, cpu, audit = done.value, cpu_seconds(pid), audit_bytes(state)
                    wal = size(state / "state.db-wal")
                    wal_max = max(wal_max, wal)
                    n = calls - prev_calls
                    row = {
                        "t": now - t_start, "calls": calls, "rate": n / (now - prev_t),
                        "cpu_us": (cpu - prev_cpu) / n * 1e6 if n else 0.0,
                        "rss": rss_bytes(pid), "db": size(state / "state.db"), "wal": wal,
                        "wal_max": wal_max,
                        "audit_per_call": (audit - prev_audit) / n if n else 0.0,
                    }
                    rows.append(row)
                    print(f"{row['t']:6.0f} {calls:9d} {row['rate']:8.0f} {row['cpu_us']:11.0f} "
                          f"{mb(row['rss']):>7} {mb(row['db']):>7} {mb(row['wal']):>7} "
                          f"{mb(row['wal_max']):>10} {row['audit_per_call']:12.0f} "
                          f"{errors.value:6d} {os.getloadavg()[0]:5.2f}", flush=True)
                    prev_t, prev_calls, prev_cpu, prev_audit = now, calls, cpu, audit
                    wal_max = 0
                    next_sample += args.every
                    if now >= end:
                        break
                if proc.poll() is not None:
                    print(f"daemon exited: {(root / 'daemon.log').read_text()[-2000:]}")
                    return 1
                time.sleep(min(1.0, max(0.0, min(next_sample, end) - time.time())))
                wal_max = max(wal_max, size(state / "state.db-wal"))
        finally:
            driver.join(30)
            if driver.is_alive():
                driver.kill()
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        print("load average (1, 5, 15 min) at end: "
              + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
        # Left out as warm-up: the first sample, and with --lease-retention the samples
        # before the first ended leases are purged (the database fills up to then).
        ramp = 0.0 if args.lease_retention is None else args.lease_retention + 10.0
        series = [r for r in rows[1:] if r["t"] > ramp]
        if len(series) < 3:
            series = rows
        print(f"summary (last third vs first third of {len(series)} samples from t = "
              f"{series[0]['t']:.0f} s (before: warm-up{' and the retention ramp' if ramp else ''}); "
              f"flat = ratio within 1 +/- {args.tolerance:g}):")
        results = [
            flat_summary("calls/s", [r["rate"] for r in series], args.tolerance, "/s"),
            flat_summary("daemon CPU per call", [r["cpu_us"] for r in series], args.tolerance, "us"),
            flat_summary("RSS", [r["rss"] / 1e6 for r in series], args.tolerance, "MB"),
            flat_summary("state.db size", [r["db"] / 1e6 for r in series], args.tolerance, "MB"),
            flat_summary("state.db-wal max", [r["wal_max"] / 1e6 for r in series],
                         args.tolerance, "MB"),
            flat_summary("audit bytes per call", [r["audit_per_call"] for r in series],
                         args.tolerance, "B"),
        ]
        if args.lease_retention is None:
            print("  (state.db grows until the daemon's lease retention, 24 h by default, "
                  "starts purging: bounded by it, not flat; see --lease-retention)")
        print(f"largest WAL seen: {mb(max(r['wal_max'] for r in rows))} MB; "
              f"calls: {rows[-1]['calls']:.0f}, errors: {errors.value}; "
              f"{sum(results)} of {len(results)} series flat")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
