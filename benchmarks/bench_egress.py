"""What egress with injection adds to an upstream request (issue 16, item 1).

Starts one HTTPS upstream (tests/https_upstream.py, its own CA, in a child process so
its threads do not share this process's GIL) and one daemon from this tree whose
``list_articles`` secret has an egress rule for it (Authorization: Bearer injected).
Then, in alternating bursts in this process (asyncio or trio, ``--lib``):

- ``direct``: ``httpx.AsyncClient`` with the CA, keep-alive, sending the header itself
  (what an MCP server holding the secret would do);
- ``egress``: inside one tool call, ``lease.http_client()``: the same GET through the
  daemon's socket, the daemon injecting the header over its own kept-alive TLS
  connection (a call allows 256 requests: a burst is at most 200).

Prints per burst p50/p90 in ms, then over ``--rounds`` the medians, the added latency
(egress p50 - direct p50, p90 likewise), the egress/direct ratio, this process's CPU
per request for each, and the daemon's CPU per egress request. Figures only::

    PYTHONPATH=src python benchmarks/bench_egress.py --rounds 5 --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import Daemon  # noqa: E402
from sidekey.client import AsyncClient  # noqa: E402

UPSTREAM = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from https_upstream import start_upstream
up = start_upstream(Path({dir!r}))
print(up.port, up.ca_file, flush=True)
sys.stdin.readline()
"""


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _direct(url: str, ca: str, secret: str, n: int) -> tuple[list[float], float]:
    lat: list[float] = []
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca),
                                 trust_env=False) as http:
        await http.get(url, headers={"authorization": f"Bearer {secret}"})  # warm
        cpu = time.process_time()
        for _ in range(n):
            t0 = time.perf_counter()
            r = await http.get(url, headers={"authorization": f"Bearer {secret}"})
            lat.append(time.perf_counter() - t0)
            assert r.status_code == 200
        cpu = time.process_time() - cpu
    return lat, cpu / n


async def _egress(d: Daemon, url: str, n: int) -> tuple[list[float], float]:
    lat: list[float] = []
    client = AsyncClient(d.socket)
    kw = {"user_token": d.user_token("content-api"), "agent_id": "content-writer",
          "session_id": "bench", "arguments": {"q": "x"}}
    async with (client.tool_call("content-api", "list_articles", **kw) as lease,
                lease.http_client() as http):
        await http.get(url)  # warm: the daemon's upstream connection
        cpu = time.process_time()
        for _ in range(n):
            t0 = time.perf_counter()
            r = await http.get(url)
            lat.append(time.perf_counter() - t0)
            assert r.status_code == 200
        cpu = time.process_time() - cpu
    await client.close()
    return lat, cpu / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--lib", choices=("asyncio", "trio"), default="trio")
    args = ap.parse_args()
    n = min(args.requests, 200)
    tmp = Path(tempfile.mkdtemp(prefix="bench-egress-"))
    up = subprocess.Popen([sys.executable, "-c", UPSTREAM.format(tests=str(ROOT / "tests"),
                                                                 dir=str(tmp))],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert up.stdout is not None and up.stdin is not None
    port_text, ca = up.stdout.readline().split()
    host = f"localhost:{port_text}"
    d = Daemon({"secrets": {"content-api": {"list_articles": {"CONTENT_API_KEY": {
        "backend": "local", "name": "content-api/read-key", "egress": {
            "hosts": [host], "inject": {"header": "Authorization",
                                        "value": "Bearer {CONTENT_API_KEY}"},
            "ca_file": ca}}}}}}).start()
    url = f"https://{host}/ok"
    secret = d.secrets["content-api/read-key"]
    assert d.proc is not None
    daemon = psutil.Process(d.proc.pid)

    def run(fn: Any) -> Any:
        return trio.run(fn) if args.lib == "trio" else asyncio.run(fn())

    rows: dict[str, list[tuple[float, float, float]]] = {"direct": [], "egress": []}
    daemon_cpu: list[float] = []
    try:
        for rnd in range(args.rounds):
            lat, cpu = run(lambda: _direct(url, ca, secret, n))
            rows["direct"].append((_pct(lat, 0.5), _pct(lat, 0.9), cpu))
            before = sum(daemon.cpu_times()[:2])
            lat, cpu = run(lambda: _egress(d, url, n))
            daemon_cpu.append((sum(daemon.cpu_times()[:2]) - before) / (n + 1))
            rows["egress"].append((_pct(lat, 0.5), _pct(lat, 0.9), cpu))
            print(f"round {rnd + 1}: direct p50 {rows['direct'][-1][0] * 1e3:.3f} ms "
                  f"p90 {rows['direct'][-1][1] * 1e3:.3f} ms | egress p50 "
                  f"{rows['egress'][-1][0] * 1e3:.3f} ms p90 {rows['egress'][-1][1] * 1e3:.3f} ms",
                  flush=True)
    finally:
        d.cleanup()
        up.stdin.close()
        up.wait(timeout=10)

    def med(kind: str, i: int) -> float:
        return statistics.median(r[i] for r in rows[kind])

    print(f"\n{args.lib}, {args.rounds} rounds x {n} requests, medians:")
    for kind in ("direct", "egress"):
        print(f"  {kind:7s} p50 {med(kind, 0) * 1e3:7.3f} ms  p90 {med(kind, 1) * 1e3:7.3f} ms  "
              f"client CPU {med(kind, 2) * 1e6:7.1f} us/request")
    print(f"  added by egress: p50 +{(med('egress', 0) - med('direct', 0)) * 1e3:.3f} ms, "
          f"p90 +{(med('egress', 1) - med('direct', 1)) * 1e3:.3f} ms; ratio egress/direct "
          f"p50 {med('egress', 0) / med('direct', 0):.2f}x, p90 "
          f"{med('egress', 1) / med('direct', 1):.2f}x")
    print(f"  daemon CPU per egress request: {statistics.median(daemon_cpu) * 1e6:.1f} us "
          f"(includes its TLS to the upstream and the call's authorize/redeem/release "
          f"spread over {n + 1} requests)")


if __name__ == "__main__":
    main()
