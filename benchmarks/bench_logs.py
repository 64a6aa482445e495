"""What the structured log costs per call (issue 15, item 3).

Starts three real daemons from this tree (tests/harness.py setup: quickstart config,
SQLite state, fsynced audit; ``--log-level info``, stderr to a file):

- ``text``: the default (``log.format: text``: no line per request);
- ``json``: ``log.format: json`` (one ``sidekey.request`` line per request, the
  request's fields on every line);
- ``json+trace``: the same, every request with a W3C ``traceparent`` header (parsed,
  its trace-id in the audit events and the log lines).

First, in process, the cost of formatting one record (text vs json). Then, for
``--rounds`` rounds (the order rotates every round), ``--calls`` sequential
governed calls to each (``POST /v1/authorize`` with ``redeem: true`` + ``POST
/v1/release``, one keep-alive connection). Prints per burst calls/s and the daemon's CPU
time per call (user + system, psutil), then the medians and the ratios to ``text``
(median of the per-round ratios). Figures, never asserted.

    python benchmarks/bench_logs.py [--rounds 4] [--calls 500]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import Daemon, UnixHTTPConnection  # noqa: E402

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    "text": ({}, False),
    "json": ({"log": {"format": "json"}}, False),
    "json+trace": ({"log": {"format": "json"}}, True),
}


def start(d: Daemon) -> None:
    with d.log_path.open("ab") as log:
        d.proc = subprocess.Popen(
            [sys.executable, "-m", "sidekey", "--log-level", "info", "serve", "--config",
             str(d.config_path)], stdout=log, stderr=log, cwd=d.root)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if d.request("GET", "/v1/health", timeout=1.0)[0] in (200, 503):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(d.log())


def burst(d: Daemon, calls: int, trace: bool) -> tuple[float, float]:
    """(calls/s, daemon CPU ms per call)."""
    assert d.proc is not None
    proc = psutil.Process(d.proc.pid)
    token = d.user_token("content-api")
    headers = {"content-type": "application/json"}
    if trace:
        headers["traceparent"] = TRACEPARENT
    body = json.dumps({"server": "content-api", "tool": "create_article",
                       "agent_id": "content-writer", "session_id": "s1",
                       "arguments": {"title": "x"}, "user_token": token, "redeem": True}).encode()
    conn = UnixHTTPConnection(d.socket, timeout=30)
    cpu0 = sum(proc.cpu_times()[:2])
    t0 = time.perf_counter()
    for _ in range(calls):
        conn.request("POST", "/v1/authorize", body=body, headers=headers)
        resp = conn.getresponse()
        lease = json.loads(resp.read())["lease"]
        release = json.dumps({"lease_id": lease["lease_id"], "status": "success",
                              "duration_ms": 1}).encode()
        conn.request("POST", "/v1/release", body=release, headers=headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    elapsed = time.perf_counter() - t0
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    conn.close()
    return calls / elapsed, cpu / calls * 1000


def formatter_cost(n: int = 50_000) -> None:
    """In process, no I/O: microseconds to format one record, text vs json (inside a
    request's context, as a request line is)."""
    import logging

    from sidekey import logs

    record = logging.LogRecord(logs.REQUEST_LOGGER, logging.INFO, __file__, 1, "%s %s %d %s",
                               ("POST", "/v1/authorize", 200, "ok"), None)
    token = logs.REQUEST.set(logs.RequestLog("req_0123456789abcdef0123", "POST", "/v1/authorize",
                                             trace_id=TRACEPARENT[3:35], server="content-api",
                                             tool="create_article", code="ok", status=200,
                                             duration_ms=1.234))
    try:
        for name, fmt in (("text", logs.TextFormatter()), ("json", logs.JsonFormatter())):
            t0 = time.perf_counter()
            for _ in range(n):
                fmt.format(record)
            print(f"formatter {name}: {(time.perf_counter() - t0) / n * 1e6:.2f} us per record")
    finally:
        logs.REQUEST.reset(token)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args()
    formatter_cost()
    daemons = {name: Daemon(over) for name, (over, _) in VARIANTS.items()}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    try:
        for d in daemons.values():
            start(d)
            burst(d, 50, False)  # warm-up: token verified and cached, rows created
        names = list(VARIANTS)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                rate, cpu = burst(daemons[name], args.calls, VARIANTS[name][1])
                results[name].append((rate, cpu))
                print(f"round {r + 1} {name:10} {rate:8.0f} calls/s  {cpu:6.3f} ms CPU/call")
        lines = {name: sum(1 for _ in d.log_path.open()) for name, d in daemons.items()}
    finally:
        for d in daemons.values():
            d.cleanup()
    print()
    for name in VARIANTS:
        rates = [x[0] for x in results[name]]
        cpus = [x[1] for x in results[name]]
        rate_ratio = statistics.median(a[0] / b[0] for a, b in zip(results[name], results["text"],
                                                                     strict=True))
        cpu_ratio = statistics.median(a[1] / b[1] for a, b in zip(results[name], results["text"],
                                                                   strict=True))
        print(f"{name:10} median {statistics.median(rates):8.0f} calls/s "
              f"{statistics.median(cpus):6.3f} ms CPU/call; vs text: calls/s x{rate_ratio:.2f}, "
              f"CPU/call x{cpu_ratio:.2f}; log lines written {lines[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
