"""Store-level cost of one call's quota checks as the key space grows (issue 5).

For each state store, the SQLite store (``sidekey.store.open_store`` in a temporary
directory) and the Redis store (a ``redis-server`` started here on a free loopback
port, no persistence), and for 10 and 10,000 distinct users:

1. builds each call's checks with :func:`sidekey.quotas.plan`, as
   ``Sidekey._apply_quotas`` does, from the quickstart's ``rate-limits.yaml`` (limits
   raised far above the load, so nothing is denied and every check runs): the user's
   session (``session_touch``), per user per tool requests/minute, per user
   requests/minute and requests/hour (``rate_check``), and the department's monthly
   counter (``counter_incr``; users alternate between the two quickstart departments);
2. pre-populates the store with one check set per user (not timed), so every user's
   rows/keys exist (SQLite: checkpointing the WAL as the daemon's maintenance would;
   no purge, so the stale GCRA rows stay too), then makes 200 untimed warm-up sets;
3. times ``--calls`` check sets, each for a user drawn at random (seeded), on a fresh
   store per (store, mode, users), ``plan()`` included in the time. Mode ``batch`` is
   what the daemon does: the whole set in one ``quota_apply`` (one SQLite transaction,
   one Redis Lua script); ``per-check`` calls the five primitives one by one, for
   comparison.

Redis drops a GCRA key once its bucket is full again (``PX`` until the theoretical
arrival time); under the raised limits that is microseconds after each call, so its
key count is the users' session sets plus the department counters.

Prints per store and user count: p50/p99 microseconds per check set, check sets/s and
store checks/s (five primitives per set), and the number of rows/keys in the store
afterwards. O(1) per call means the figures at 10,000 users match those at 10.

    python benchmarks/bench_quotas.py [--calls 3000] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import redis
import trio
import yaml

from sidekey import quotas
from sidekey.config import Limits
from sidekey.store import StateStore, open_store
from sidekey.store.redis import RedisStore
from sidekey.store.sqlite import DB_NAME, SqliteStore

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart"

TOOL = "create_article"
SESSION = "bench"
USER_COUNTS = (10, 10_000)
HIGH = 10_000_000  # every limit, far above the load: nothing is denied
# SQLite: automatic WAL checkpoints are off and the daemon checkpoints every 5 s
# (run_maintenance). Pre-populating 10,000 users without one would leave a WAL of
# ~500 MB whose truncation lands in the timed part: checkpoint every this many users.
CHECKPOINT_EVERY = 500
WARMUP_SETS = 200  # untimed, random users, after the pre-population (caches, WAL reset)


def bench_limits() -> tuple[Limits, list[str]]:
    """The quickstart's limits with every number raised to :data:`HIGH`, and its departments."""
    data = yaml.safe_load((QUICKSTART / "rate-limits.yaml").read_text())["limits"]
    for section in [data["per_user"], *data["per_tool"].values(), *data["per_department"].values()]:
        for key in ("requests_per_minute", "requests_per_hour", "concurrent_sessions",
                    "monthly_tool_calls"):
            if key in section:
                section[key] = HIGH
    limits = msgspec.convert(data, Limits, strict=False)
    return limits, sorted(limits.per_department)


async def check_set(store: StateStore, limits: Limits, user: str, department: str,
                    batch: bool = True) -> int:
    """One call's quota checks; returns how many ran. ``batch``: one ``quota_apply`` as
    ``Sidekey._apply_quotas`` does (one transaction / one Lua script); else one store
    primitive per check (one round trip each), for comparison."""
    now = time.time()
    plan = quotas.plan(limits, user=user, tool=TOOL, department=department, session_id=SESSION,
                       now=datetime.datetime.fromtimestamp(now, datetime.UTC))
    if batch:
        answers = await store.quota_apply(quotas.store_ops(plan), now=plan.now_s)
        for check, got in zip(plan.checks, answers, strict=True):
            if quotas.check_denial(check, got, now=plan.now) is not None:
                raise SystemExit(f"unexpected denial for {user}")
        return len(answers)
    ran = 0
    for check in plan.checks:
        answer: quotas.StoreAnswer
        if isinstance(check, quotas.SessionCheck):
            answer = await store.session_touch(
                check.user, check.session_id, now=plan.now_s, idle_s=check.idle_s,
                max_sessions=check.max_sessions)
        elif isinstance(check, quotas.RateCheck):
            answer = await store.rate_check(
                check.key, limit=check.limit, period_s=check.period_s, now=plan.now_s)
        else:
            answer = await store.counter_incr(check.key, expires_at=check.expires_at_s)
        ran += 1
        denial = quotas.check_denial(check, answer, now=plan.now)
        if denial is not None:
            raise SystemExit(f"unexpected denial for {user}: {denial.message}")
    return ran


async def run_one(store: StateStore, limits: Limits, departments: list[str], users: int,
                  calls: int, seed: int, batch: bool) -> dict[str, Any]:
    names = [f"user-{i:05d}" for i in range(users)]
    dept = [departments[i % len(departments)] for i in range(users)]
    sqlite = store if isinstance(store, SqliteStore) else None
    t0 = time.perf_counter()
    checks_per_set = 0
    for i, name in enumerate(names):  # pre-populate: every user's rows exist
        checks_per_set = await check_set(store, limits, name, dept[i], batch)
        if sqlite is not None and i % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1:
            await sqlite.checkpoint()
    if sqlite is not None:
        await sqlite.checkpoint()
    populate_s = time.perf_counter() - t0
    rng = random.Random(seed)
    for _ in range(WARMUP_SETS):
        i = rng.randrange(users)
        await check_set(store, limits, names[i], dept[i], batch)
    order = [rng.randrange(users) for _ in range(calls)]
    lat: list[float] = []
    t_start = time.perf_counter()
    for i in order:
        t = time.perf_counter()
        await check_set(store, limits, names[i], dept[i], batch)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t_start
    lat.sort()
    return {
        "mode": "batch" if batch else "per-check",
        "users": users,
        "calls": calls,
        "checks_per_set": checks_per_set,
        "p50_us": round(lat[calls // 2] * 1e6, 1),
        "p99_us": round(lat[min(calls - 1, int(calls * 0.99))] * 1e6, 1),
        "sets_per_s": round(calls / wall),
        "checks_per_s": round(calls * checks_per_set / wall),
        "populate_s": round(populate_s, 2),
    }


def sqlite_rows(db: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {t: int(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
                for t in ("rate_gcra", "counters", "sessions")}


def redis_keys(url: str) -> dict[str, int]:
    client = redis.Redis.from_url(url)
    try:
        out: dict[str, int] = {}
        for key in client.scan_iter(count=1000):
            kind = key.decode().split(":")[1]  # sidekey:<kind>:...
            out[kind] = out.get(kind, 0) + 1
        return dict(sorted(out.items()))
    finally:
        client.close()


def show(store: str, r: dict[str, Any]) -> None:
    rows = ", ".join(f"{k}={v}" for k, v in r["rows"].items())
    print(f"{store:<7} {r['mode']:<9} users={r['users']:<6} sets={r['calls']:<5} "
          f"p50={r['p50_us']:>7.1f} us  p99={r['p99_us']:>7.1f} us  "
          f"sets/s={r['sets_per_s']:<6} checks/s={r['checks_per_s']:<6} "
          f"rows/keys after: {r['rows_total']} ({rows})  [populate {r['populate_s']} s]",
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000, help="timed check sets per run (default 3000)")
    ap.add_argument("--seed", type=int, default=5, help="seed of the random user order")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args()
    if args.calls < 1:
        ap.error("--calls must be at least 1")

    limits, departments = bench_limits()
    root = Path(tempfile.mkdtemp(prefix="skq-"))
    results: list[dict[str, Any]] = []
    server = None
    try:
        print(f"check set: {TOOL}, {len(departments)} departments, "
              f"{args.calls} timed sets per run", flush=True)
        for batch, users in [(b, u) for b in (True, False) for u in USER_COUNTS]:
            state_dir = root / f"sqlite-{users}-{batch}"

            async def on_sqlite(users: int = users, state_dir: Path = state_dir,
                                batch: bool = batch) -> dict[str, Any]:
                store = open_store(state_dir)
                try:
                    return await run_one(store, limits, departments, users, args.calls, args.seed,
                                         batch)
                finally:
                    await store.aclose()

            r = {"store": "sqlite", **trio.run(on_sqlite)}
            rows = sqlite_rows(state_dir / DB_NAME)
            r.update(rows=rows, rows_total=sum(rows.values()))
            show("sqlite", r)
            results.append(r)

        sys.path.insert(0, str(ROOT / "tests"))
        from redis_server import RedisServer  # type: ignore[import-not-found]

        server = RedisServer(root / "redis").start()
        url: str = server.url
        for batch, users in [(b, u) for b in (True, False) for u in USER_COUNTS]:
            with redis.Redis.from_url(url) as admin:
                admin.flushall()

            async def on_redis(users: int = users, batch: bool = batch) -> dict[str, Any]:
                store = RedisStore.open(url)
                try:
                    await store.ping()
                    return await run_one(store, limits, departments, users, args.calls, args.seed,
                                         batch)
                finally:
                    await store.aclose()

            r = {"store": "redis", **trio.run(on_redis)}
            keys = redis_keys(url)
            r.update(rows=keys, rows_total=sum(keys.values()))
            show("redis", r)
            results.append(r)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

