"""Memory held for unredeemed authorizes (issue 9, item 7).

Starts a real daemon (tests/harness.py: quickstart config, SQLite state, fsynced audit)
and sends ``--calls`` authorizes (default 100,000) whose tokens are never redeemed,
each with ``--arg-bytes`` of arguments (default 1 KiB), over a few keep-alive
connections. Prints the daemon's RSS before and after, the call records it holds
(``GET /v1/status`` -> ``pending_calls``: count, bytes, evicted) and the configured
bound (``leases.pending_bytes_per_server``, ``leases.pending_bytes_total``). The
token TTL is the maximum (300 s), so nothing expires during the run: the bound is
what holds memory down. ``--shape wide`` sends arguments that are ~20 times bigger as
Python objects than as JSON (empty lists), as a hostile MCP server would.

The RSS growth includes more than the records: the audit queue (events of allowed
calls are queued, up to 64 MiB, and written in batches) and memory the allocator keeps
after a burst. ``--per-server-mib 1 --total-mib 1`` shows that part alone.

    python benchmarks/bench_memory.py [--calls 100000] [--arg-bytes 1024]
        [--per-server-mib 64] [--total-mib 256] [--shape text|wide] [--max-seconds 600]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import Daemon, UnixHTTPConnection  # noqa: E402

MIB = 1 << 20


def arguments(size: int, shape: str) -> dict[str, Any]:
    if shape == "wide":
        return {"rows": [[] for _ in range(max(0, size - 20) // 3)]}
    return {"text": "x" * max(0, size - 12)}


def rss(d: Daemon) -> int:
    assert d.proc is not None
    return int(psutil.Process(d.proc.pid).memory_info().rss)


def rss_parts(d: Daemon) -> str:
    """Anonymous (heap) vs file-backed resident memory, from /proc/<pid>/status."""
    assert d.proc is not None
    fields = {}
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile", "RssShmem"):
            fields[name] = int(value.split()[0]) * 1024
    return ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in fields.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--arg-bytes", type=int, default=1024)
    ap.add_argument("--per-server-mib", type=int, default=64)
    ap.add_argument("--total-mib", type=int, default=256)
    ap.add_argument("--shape", choices=["text", "wide"], default="text")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--max-seconds", type=float, default=600.0)
    opts = ap.parse_args()

    d = Daemon({
        "tokens": {"ttl_seconds": 300},
        "leases": {"pending_bytes_per_server": opts.per_server_mib * MIB,
                   "pending_bytes_total": opts.total_mib * MIB},
        "audit": {"fsync": False},
    }).start()
    try:
        body = json.dumps({
            "server": "content-api", "tool": "create_article", "agent_id": "content-writer",
            "session_id": "s1", "user_token": d.user_token(),
            "arguments": arguments(opts.arg_bytes, opts.shape),
        }).encode()
        status, answer = d.request("POST", "/v1/authorize", body)
        assert status == 200, answer
        time.sleep(0.5)
        before = rss(d)
        parts_before = rss_parts(d)
        deadline = time.monotonic() + opts.max_seconds
        lock = threading.Lock()
        counts = {"sent": 0, "ok": 0, "other": 0}
        others: Counter[str] = Counter()

        def worker() -> None:
            conn = UnixHTTPConnection(d.socket, timeout=30.0)
            try:
                while time.monotonic() < deadline:
                    with lock:
                        if counts["sent"] >= opts.calls:
                            return
                        counts["sent"] += 1
                    conn.request("POST", "/v1/authorize", body=body,
                                 headers={"content-type": "application/json"})
                    resp = conn.getresponse()
                    data = resp.read()
                    with lock:
                        counts["ok" if resp.status == 200 else "other"] += 1
                        if resp.status != 200:
                            code = json.loads(data).get("error", {}).get("code")
                            others[f"{resp.status} {code}"] += 1
            finally:
                conn.close()

        started = time.monotonic()
        threads = [threading.Thread(target=worker) for _ in range(opts.workers)]
        for t in threads:
            t.start()
        # RSS at each fifth of the calls: a bound shows as a plateau once the budget is
        # full (the audit queue, up to 64 MiB of queued events, and the allocator's
        # high-water mark come on top of the records).
        marks = [opts.calls * k // 5 for k in range(1, 5)]
        samples: list[str] = []
        while any(t.is_alive() for t in threads):
            time.sleep(0.2)
            with lock:
                done_now = counts["ok"] + counts["other"]
            while marks and done_now >= marks[0]:
                samples.append(f"{marks.pop(0)}: {rss(d) / MIB:.0f}")
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        after = rss(d)
        _, st = d.request("GET", "/v1/status")
        pending = st["pending_calls"]
        done = counts["ok"] + counts["other"]
        print(f"authorizes: {done} in {elapsed:.1f} s ({done / elapsed:.0f}/s), "
              f"200: {counts['ok']}, other: {counts['other']}"
              + ("  [stopped at --max-seconds]" if done < opts.calls else ""))
        print(f"arguments: {len(json.dumps(arguments(opts.arg_bytes, opts.shape)))} bytes of JSON "
              f"each ({opts.shape}); token TTL 300 s, none redeemed")
        print(f"bound: leases.pending_bytes_per_server = {pending['budget_per_server'] / MIB:.0f} MiB,"
              f" leases.pending_bytes_total = {pending['budget_total'] / MIB:.0f} MiB")
        print(f"call records held: {pending['count']} ({pending['bytes'] / MIB:.1f} MiB counted), "
              f"evicted: {pending['evicted']}, expired: {pending['expired']}")
        print(f"daemon RSS: before {before / MIB:.1f} MiB ({parts_before}), after "
              f"{after / MIB:.1f} MiB ({rss_parts(d)}), growth {(after - before) / MIB:.1f} MiB")
        print(f"RSS (MiB) after N calls: {', '.join(samples)}, {done}: {after / MIB:.0f}")
        if counts["other"]:
            print(f"non-200 answers: {dict(others)}")
    finally:
        d.cleanup()


if __name__ == "__main__":
    main()
