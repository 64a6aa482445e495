"""The daemon fuzz at volume (issue 9, "Done means"): tests/fuzzgen.py's generator and
clients (the same as tests/test_fuzz_daemon.py) against a real daemon, 100,000+
requests by default, bounded in time (``--seconds``).

Prints the requests sent and their rate, the counts of response statuses, of cases by
kind and of connections that ended without an answer, GET /v1/health during the run,
the daemon's RSS before and after, and any finding (an unexpected status such as 500,
a torn response, a traceback in the daemon's log). Exits 1 on a finding.

    python benchmarks/bench_fuzz.py [--requests 100000] [--seconds 900] [--seed N]
                                    [--root-clients 2] [--nobody-clients 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fuzzgen  # noqa: E402
from harness import Daemon  # noqa: E402

MIB = 1 << 20
NOBODY = 65534


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=20261130)
    ap.add_argument("--root-clients", type=int, default=2)
    ap.add_argument("--nobody-clients", type=int, default=2)
    opts = ap.parse_args()

    d = Daemon().start()
    try:
        assert d.proc is not None
        proc = psutil.Process(d.proc.pid)
        ctx = fuzzgen.Context(user_tokens={"content-api": d.user_token()})
        clients = [(0, 0)] * opts.root_clients + [(NOBODY, NOBODY)] * opts.nobody_clients
        rss_before = proc.memory_info().rss
        health: Counter[int] = Counter()
        stop = threading.Event()

        def poll_health() -> None:
            while not stop.is_set():
                try:
                    status, _ = d.request("GET", "/v1/health", timeout=10.0)
                except OSError:
                    status = -1
                health[status] += 1
                stop.wait(0.5)

        poller = threading.Thread(target=poll_health)
        poller.start()
        started = time.monotonic()
        try:
            results = fuzzgen.run_fuzz(d.socket, ctx, clients, seed=opts.seed,
                                       max_requests=opts.requests, seconds=opts.seconds)
        finally:
            stop.set()
            poller.join(timeout=15)
        elapsed = time.monotonic() - started
        rss_after = proc.memory_info().rss
        final_health, _ = d.request("GET", "/v1/health")
        summary = fuzzgen.summarize(results)
        log = d.log()
        failed_events = len(d.events_of("request.failed"))

        print(f"requests: {summary['sent']} in {elapsed:.1f} s ({summary['sent'] / elapsed:.0f}/s)"
              f" from {opts.root_clients} root + {opts.nobody_clients} nobody clients,"
              f" seed {opts.seed}"
              + ("  [stopped at --seconds]" if summary["sent"] < opts.requests else ""))
        print("statuses:", json.dumps(summary["statuses"]))
        print("cases:", json.dumps(summary["cases"]))
        print("ended without an answer:", json.dumps(summary["silent"]),
              f"(allowed for {', '.join(sorted(fuzzgen.SILENT_OK))})")
        print(f"health during the run: {dict(health)}; after: {final_health}")
        print(f"daemon RSS: before {rss_before / MIB:.1f} MiB, after {rss_after / MIB:.1f} MiB, "
              f"growth {(rss_after - rss_before) / MIB:.1f} MiB")
        bad_silent = set(summary["silent"]) - fuzzgen.SILENT_OK
        problems = [
            *(f"finding: {json.dumps(f)[:600]}" for f in summary["findings"]),
            *(f"client error: {e}" for e in summary["child_errors"]),
            *([f"no answer for {sorted(bad_silent)}"] if bad_silent else []),
            *(["traceback in the daemon log"] if "Traceback" in log else []),
            *([f"{failed_events} request.failed events"] if failed_events else []),
            *([f"health not 200: {dict(health)}"] if set(health) - {200} else []),
        ]
        for line in problems:
            print(line)
        print("findings:", len(problems))
        return 1 if problems else 0
    finally:
        d.cleanup()


if __name__ == "__main__":
    sys.exit(main())
