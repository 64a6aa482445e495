"""What the shipped client costs on top of the daemon: sync, asyncio and trio.

Starts ONE daemon (this tree's code, bench_call's quickstart setup) and drives it, in
alternating bursts, with:

- ``raw``: bench_call's minimal pre-encoded HTTP/1.1 client (keep-alive, trio) doing
  authorize + redeem + release: the daemon's own cost, the yardstick;
- ``raw health``: GET /v1/health the same way (no fsync, no token), the yardstick of
  the ``health`` runs below;
- this tree's ``sidekey.client`` and, with ``--other REV`` (a git revision, default
  ``main``; ``--other none`` to skip), REV's, each as ``Client`` (sync) and ``AsyncClient``
  under asyncio and under trio, each doing ``authorize()`` + ``redeem()`` + ``release()``
  (three requests, a gateway's flow: the same requests as raw) and the ``tool_call``
  with-block an MCP server uses (authorize+redeem in one request, then release), and
  ``health()`` alone (one request: the per-request cost with little daemon work).

Every burst runs in a fresh spawned process. Prints per burst calls/s and p50, then the
medians over ``--rounds`` and, per flavour, the client's p50 minus raw's p50 (what the
library adds per governed call), the client process's CPU time per call (the least
noisy figure on a loaded machine: it excludes waiting for the daemon) and this tree /
REV ratios. Figures only: nothing is
asserted. Usage::

    PYTHONPATH=src python benchmarks/bench_client.py --other main --rounds 4 --calls 400
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_call as bc

FLAVOURS = ("sync", "asyncio", "trio")
KINDS = ("3-step", "tool_call", "health")


def _raw_health(sock_path: str, tokens: list[str], n: int, q: Any) -> None:
    """``n`` GET /v1/health on one kept-alive connection, pre-encoded, plain socket: the
    yardstick for the per-request cost of the clients' ``health()`` (no fsync, no
    token: the daemon's share is small, so the client's shows)."""
    import socket

    req = b"GET /v1/health HTTP/1.1\r\nhost: sidekey\r\n\r\n"
    lat: list[float] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        buf = b""
        cpu0 = time.process_time()
        t_start = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(req)
            while (got := bc.split_response(buf)) is None:
                buf += s.recv(65536)
            assert got[0] == 200, got
            buf = got[2]
            lat.append(time.perf_counter() - t0)
        wall = time.perf_counter() - t_start
        cpu = time.process_time() - cpu0
    q.put((wall, lat, cpu / n * 1000))


def _client_burst(sock_path: str, tokens: list[str], n: int, src: str | None,
                  flavour: str, kind: str, q: Any) -> None:
    """``n`` sequential governed calls with one client object of ``flavour``."""
    bc._use_src(src)
    from sidekey.client import AsyncClient, Client

    lat: list[float] = []
    kw: dict[str, Any] = dict(agent_id="content-writer", session_id="bench", arguments=bc.ARGS)
    if flavour == "sync":
        with Client(socket_path=sock_path) as c:
            cpu0 = time.process_time()
            t_start = time.perf_counter()
            for i in range(n):
                t0 = time.perf_counter()
                if kind == "health":
                    assert c.health()["status"]
                elif kind == "tool_call":
                    with c.tool_call(bc.SERVER, bc.TOOL, user_token=tokens[i % len(tokens)],
                                     **kw) as lease:
                        assert lease.lease_id
                else:
                    auth = c.authorize(bc.SERVER, bc.TOOL, user_token=tokens[i % len(tokens)],
                                       **kw)
                    assert auth.resolution_token is not None
                    lease = c.redeem(auth.resolution_token, arguments=bc.ARGS)
                    c.release(lease.lease_id, status="success", duration_ms=1)
                lat.append(time.perf_counter() - t0)
            wall = time.perf_counter() - t_start
            cpu = time.process_time() - cpu0
        q.put((wall, lat, cpu / n * 1000))
        return

    async def main() -> tuple[float, float]:
        async with AsyncClient(socket_path=sock_path) as c:
            cpu0 = time.process_time()
            t_start = time.perf_counter()
            for i in range(n):
                t0 = time.perf_counter()
                if kind == "health":
                    assert (await c.health())["status"]
                elif kind == "tool_call":
                    async with c.tool_call(bc.SERVER, bc.TOOL,
                                           user_token=tokens[i % len(tokens)], **kw) as lease:
                        assert lease.lease_id
                else:
                    auth = await c.authorize(bc.SERVER, bc.TOOL,
                                             user_token=tokens[i % len(tokens)], **kw)
                    assert auth.resolution_token is not None
                    lease = await c.redeem(auth.resolution_token, arguments=bc.ARGS)
                    await c.release(lease.lease_id, status="success", duration_ms=1)
                lat.append(time.perf_counter() - t0)
            return time.perf_counter() - t_start, time.process_time() - cpu0

    if flavour == "trio":
        import trio

        wall, cpu = trio.run(main)
    else:
        wall, cpu = asyncio.run(main())
    q.put((wall, lat, cpu / n * 1000))


def _stats(wall: float, lat: list[float], cpu: float = 0.0) -> tuple[float, float, float]:
    """(calls/s, p50 ms, the client process's CPU ms per call)."""
    lat = sorted(lat)
    return len(lat) / wall, lat[len(lat) // 2] * 1000, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=400, help="calls per burst (default 400)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds (default 4)")
    ap.add_argument("--other", default="main",
                    help="git revision whose client to compare with (default main; none: skip)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="skc-"))
    proc = None
    try:
        trees: dict[str, str | None] = {"this": None}
        if args.other != "none":
            sha, src = bc.extract_rev(args.other, base / "other-tree")
            trees[f"{args.other}"] = str(src)
            print(f"other: {args.other} = {sha[:12]} (client from {src})")
        root = base / "daemon"
        root.mkdir()
        config = bc.setup(root)
        tokens = bc.user_tokens(root, 1)
        proc = bc.start_daemon(root, config, None)
        sock = str(root / "run" / "sock")
        bc.warm_up(sock, tokens, 4, 100, 1)
        print(f"daemon: this tree's code; {args.calls} sequential calls per burst, "
              f"{args.rounds} rounds; python {sys.version.split()[0]}; {bc.loadavg()}",
              flush=True)
        results: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}
        for rnd in range(args.rounds):
            got = _stats(*bc.run_in_process(bc._raw_process, sock, tokens, 1, args.calls))
            results.setdefault(("raw", "-", "3-step"), []).append(got)
            print(f"round {rnd + 1} raw 3-step {got[0]:6.0f} calls/s p50 {got[1]:.3f} ms",
                  flush=True)
            got = _stats(*bc.run_in_process(_raw_health, sock, tokens, args.calls))
            results.setdefault(("raw", "-", "health"), []).append(got)
            print(f"round {rnd + 1} raw health {got[0]:6.0f} calls/s p50 {got[1]:.3f} ms "
                  f"client CPU {got[2]:.3f} ms/call", flush=True)
            names = list(trees) if rnd % 2 == 0 else list(reversed(trees))
            for flavour in FLAVOURS:
                for kind in KINDS:
                    cols = []
                    for name in names:
                        got = _stats(*bc.run_in_process(_client_burst, sock, tokens, args.calls,
                                                        trees[name], flavour, kind))
                        results.setdefault((name, flavour, kind), []).append(got)
                        cols.append(f"{name} {got[0]:6.0f} calls/s p50 {got[1]:.3f} ms "
                                    f"client CPU {got[2]:.3f} ms/call")
                    print(f"round {rnd + 1} {flavour:<7} {kind:<9} " + " | ".join(cols),
                          flush=True)
        raw = {kind: bc.median([r[1] for r in results[("raw", "-", kind)]])
               for kind in ("3-step", "health")}
        raw_cpu = bc.median([r[2] for r in results[("raw", "-", "health")]])
        print(f"\nmedians of {args.rounds} rounds (p50 per governed call, or per health "
              f"request; 'adds' = client p50 - raw p50 doing the same requests: 3-step "
              f"{raw['3-step']:.3f} ms, health {raw['health']:.3f} ms, raw health client CPU "
              f"{raw_cpu:.3f} ms/request)")
        for flavour in FLAVOURS:
            for kind in KINDS:
                cols = []
                p50s, cpus = {}, {}
                for name in trees:
                    runs = results[(name, flavour, kind)]
                    p50s[name] = p50 = bc.median([r[1] for r in runs])
                    tput = bc.median([r[0] for r in runs])
                    cpus[name] = cpu = bc.median([r[2] for r in runs])
                    adds = f" adds {p50 - raw[kind]:+.3f} ms" if kind in raw else ""
                    cols.append(f"{name} {tput:6.0f} calls/s p50 {p50:.3f} ms{adds} "
                                f"client CPU {cpu:.3f} ms/call")
                if len(trees) == 2:
                    this, other = p50s["this"], p50s[args.other]
                    cols.append(f"this/{args.other} p50 x{this / other:.3f}, client CPU "
                                f"x{cpus['this'] / cpus[args.other]:.3f}")
                print(f"{flavour:<7} {kind:<9} " + " | ".join(cols))
        print(bc.loadavg())
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
