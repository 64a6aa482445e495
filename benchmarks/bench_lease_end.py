"""Store-level cost of closing the crash windows of issue 9, items 9 and 10.

Item 10: a lease's end is now followed by ``mark_lease_audited`` once its event is
durable (the transition itself also clears the mark, in the same statement/script).
Item 9: a dynamic credential is now announced by ``journal_backend_intent`` before the
backend is asked, and ``journal_backend_lease`` resolves the intent in the same
transaction/script.

For each store (SQLite in a temporary directory; Redis started here on a free loopback
port, no persistence) it times, over ``--n`` leases / credentials:

* ``end``: ``transition_lease`` alone (what a release cost before), and
  ``end+mark``: ``transition_lease`` + ``mark_lease_audited`` (what it costs now);
* ``journal``: ``journal_backend_lease`` alone (before), and ``intent+journal``:
  ``journal_backend_intent`` + ``journal_backend_lease(intent_id=...)`` (now).

Prints p50/p99 microseconds per operation pair and the ratio now/before. The release
path's other costs (the audit fsync, one HTTP round trip) are not included: the added
write is a fraction of a release; see ``bench_call.py`` for the whole call.

    python benchmarks/bench_lease_end.py [--n 3000] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from sidekey.store import LeaseRecord, StateStore, open_store
from sidekey.store.redis import RedisStore

ROOT = Path(__file__).resolve().parents[1]


def lease(i: int) -> LeaseRecord:
    return LeaseRecord(
        lease_id=f"lse_{i:08d}", jti=f"jti-{i}", server="content-api", tool="create_article",
        user_id="alice", agent_id="content-writer", session_id="s1", secrets=("API_KEY",),
        created_at=time.time(), expires_at=time.time() + 120, state="active", ended_at=None,
        peer_pid=4242, peer_uid=1001,
    )


async def timed(n: int, op: Callable[[int], Awaitable[None]]) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await op(i)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


async def run_store(store: StateStore, n: int) -> dict[str, Any]:
    for i in range(2 * n):
        await store.put_lease(lease(i))

    async def end(i: int) -> None:
        await store.transition_lease(f"lse_{i:08d}", "active", "released", at=time.time())

    async def end_mark(i: int) -> None:
        lease_id = f"lse_{n + i:08d}"
        await store.transition_lease(lease_id, "active", "released", at=time.time())
        await store.mark_lease_audited(lease_id)

    async def journal(i: int) -> None:
        await store.journal_backend_lease("vault", f"database/creds/ro/a{i}",
                                          expires_at=time.time() + 3600, at=time.time())

    async def intent_journal(i: int) -> None:
        now = time.time()
        await store.journal_backend_intent("vault", f"int_{i}", "database/creds/ro/", at=now,
                                           deadline=now + 10)
        await store.journal_backend_lease("vault", f"database/creds/ro/b{i}",
                                          expires_at=now + 3600, at=now, intent_id=f"int_{i}")

    result: dict[str, Any] = {}
    for name, op in (("end", end), ("end+mark", end_mark), ("journal", journal),
                     ("intent+journal", intent_journal)):
        samples = await timed(n, op)
        qs = statistics.quantiles(samples, n=100)
        result[name] = {"p50_us": round(qs[49], 1), "p99_us": round(qs[98], 1)}
    result["release_ratio_p50"] = round(result["end+mark"]["p50_us"] / result["end"]["p50_us"], 2)
    result["issue_ratio_p50"] = round(
        result["intent+journal"]["p50_us"] / result["journal"]["p50_us"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-lease-end-"))
    results: dict[str, Any] = {}
    try:
        async def on_sqlite() -> dict[str, Any]:
            store = open_store(root / "state")
            try:
                return await run_store(store, args.n)
            finally:
                await store.aclose()

        results["sqlite"] = trio.run(on_sqlite)

        sys.path.insert(0, str(ROOT / "tests"))
        from redis_server import RedisServer  # type: ignore[import-not-found]

        server = RedisServer(root / "redis").start()
        try:
            async def on_redis() -> dict[str, Any]:
                store = RedisStore.open(server.url)
                try:
                    await store.ping()
                    return await run_store(store, args.n)
                finally:
                    await store.aclose()

            results["redis"] = trio.run(on_redis)
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for store_name, r in results.items():
        print(f"{store_name}:")
        for op in ("end", "end+mark", "journal", "intent+journal"):
            print(f"  {op:15s} p50 {r[op]['p50_us']:8.1f} us   p99 {r[op]['p99_us']:8.1f} us")
        print(f"  release store cost now/before (p50): {r['release_ratio_p50']}x; "
              f"dynamic issue store cost now/before (p50): {r['issue_ratio_p50']}x")


if __name__ == "__main__":
    main()
