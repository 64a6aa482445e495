"""Cost of one bare HTTP exchange in the daemon: ``GET /v1/health`` on a keep-alive
connection, before and after in one run.

``--before REV`` (default ``main``) extracts that revision's ``src/`` (as bench_call.py
does) and starts its daemon next to this tree's, each in its own directory with the
quickstart setup. A client (a separate spawned process, plain blocking sockets, so it
costs the same against both) then drives them in alternating bursts, ``--rounds`` times:

- ``seq``: ``--requests`` requests one at a time on one connection (request, read the
  whole response, next): the latency and the daemon's CPU per exchange;
- ``pipelined``: the same count in batches of 16 requests written at once (one read
  may then carry several requests: parse and serialize cost, fewer wake-ups).

Printed per burst: requests/s, p50 (seq only) and the daemon's CPU time per request (user
+ system, process CPU clock); then the medians and the after/before ratios (median of the
per-round ratios). Last, in this process and without I/O, the parser alone: h11 (the
server before issue 13: Connection, next_event to the end of the message, Response + Data
+ EndOfMessage, start_next_cycle) against this tree's llhttp path (sidekey.server._Wire
and its response head), per request, for a bare GET and for an authorize-sized POST.
Figures only, nothing asserted.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_call

REQUEST = b"GET /v1/health HTTP/1.1\r\nhost: sidekey\r\n\r\n"
PIPELINE = 16


def _read_response(s: socket.socket, buf: bytes) -> bytes:
    """Read until one whole response is in ``buf``; return what follows it."""
    while True:
        got = bench_call.split_response(buf)
        if got is not None:
            status, _body, rest = got
            if status != 200:
                raise SystemExit(f"health answered {status}")
            return rest
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("daemon closed the connection")
        buf += chunk


def _client(sock_path: str, mode: str, n: int, q: Any) -> None:
    lat: list[float] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(sock_path)
        buf = b""
        t0 = time.perf_counter()
        if mode == "seq":
            for _ in range(n):
                t = time.perf_counter()
                s.sendall(REQUEST)
                buf = _read_response(s, buf)
                lat.append(time.perf_counter() - t)
        else:
            batch = REQUEST * PIPELINE
            for _ in range(n // PIPELINE):
                t = time.perf_counter()
                s.sendall(batch)
                for _ in range(PIPELINE):
                    buf = _read_response(s, buf)
                lat.append((time.perf_counter() - t) / PIPELINE)
        wall = time.perf_counter() - t0
    q.put((wall, lat))


def _parse_only(rounds: int = 5, n: int = 20_000) -> None:
    import h11

    from sidekey.server import _AFTER_RID, _JSON_HEAD, _STATUS_LINES, _Wire

    body = b'{"server": "content-api", "tool": "create_article", "user_token": "' + b"x" * 900 + b'"}'
    reqs = {"GET /v1/health": REQUEST,
            "POST authorize (1 KB)": bench_call._post("/v1/authorize", body)}
    answer = b'{"status": "ok"}'

    def with_h11(req: bytes) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        for _ in range(n):
            conn.receive_data(req)
            while type(conn.next_event()) is not h11.EndOfMessage:
                pass
            headers = [(b"content-type", b"application/json"),
                       (b"content-length", str(len(answer)).encode()),
                       (b"x-request-id", b"req_0123456789abcdef0123"), (b"server", b"sidekey"),
                       (b"cache-control", b"no-store")]
            out = conn.send(h11.Response(status_code=200, headers=headers))
            out += conn.send(h11.Data(data=answer))
            out += conn.send(h11.EndOfMessage())
            conn.start_next_cycle()

    def with_llhttp(req: bytes) -> None:
        wire = _Wire(16 * 1024, 256 * 1024, -1)
        for _ in range(n):
            wire.feed(req)
            wire.ready.popleft()
            b"".join((_STATUS_LINES[200], _JSON_HEAD, str(len(answer)).encode(),
                      b"\r\nx-request-id: ", b"req_0123456789abcdef0123", _AFTER_RID, b"\r\n",
                      answer))

    print(f"\nparse + serialize only, in process (median of {rounds} x {n} requests):")
    for label, req in reqs.items():
        times = {}
        for name, fn in (("h11", with_h11), ("llhttp", with_llhttp)):
            runs = []
            for _ in range(rounds):
                t = time.perf_counter()
                fn(req)
                runs.append((time.perf_counter() - t) / n * 1e6)
            times[name] = bench_call.median(runs)
        print(f"  {label:22} h11 {times['h11']:6.1f} us   llhttp {times['llhttp']:6.1f} us   "
              f"(x{times['llhttp'] / times['h11']:.3f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="main", help="git revision to compare with (default main)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=4000, help="requests per burst (default 4000)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="skh-"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        sha, before_src = bench_call.extract_rev(args.before, base / "before-tree")
        srcs = {"before": before_src, "after": bench_call.ROOT / "src"}
        print(f"before: {args.before} = {sha[:12]}; after: this tree; "
              f"{args.requests} requests per burst, {args.rounds} rounds; {bench_call.loadavg()}",
              flush=True)
        socks: dict[str, str] = {}
        for name, src in srcs.items():
            root = base / name
            root.mkdir()
            config = bench_call.setup(root)
            procs[name] = bench_call.start_daemon(root, config, None, bench_call.code_env(src))
            socks[name] = str(root / "run" / "sock")
            bench_call.run_in_process(_client, socks[name], "seq", 500)  # warm-up
        # (requests/s, p50 us, daemon CPU us per request) per burst, by (mode, name)
        results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for rnd in range(args.rounds):
            for mode in ("seq", "pipelined"):
                order = ["before", "after"] if rnd % 2 == 0 else ["after", "before"]
                cols = {}
                for name in order:
                    cpu0 = bench_call.cpu_seconds(procs[name].pid)
                    wall, lat = bench_call.run_in_process(_client, socks[name], mode, args.requests)
                    cpu = (bench_call.cpu_seconds(procs[name].pid) - cpu0) / args.requests * 1e6
                    lat.sort()
                    got = (args.requests / wall, lat[len(lat) // 2] * 1e6, cpu)
                    results.setdefault((mode, name), []).append(got)
                    cols[name] = f"{name} {got[0]:7.0f} req/s p50 {got[1]:6.1f} us cpu {cpu:6.1f} us/req"
                print(f"round {rnd + 1} {mode:9} {cols['before']}   {cols['after']}", flush=True)
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        procs.clear()
        print(f"\nmedians of {args.rounds} rounds; after/before = median of the per-round ratios")
        for mode in ("seq", "pipelined"):
            b, a = results[(mode, "before")], results[(mode, "after")]
            med = {n: [bench_call.median([r[i] for r in runs]) for i in range(3)]
                   for n, runs in (("before", b), ("after", a))}
            ratio = [bench_call.median([x[i] / y[i] for x, y in zip(a, b, strict=True)])
                     for i in range(3)]
            print(f"{mode:9} before {med['before'][0]:7.0f} req/s p50 {med['before'][1]:6.1f} us "
                  f"cpu {med['before'][2]:6.1f} us/req | after {med['after'][0]:7.0f} req/s "
                  f"p50 {med['after'][1]:6.1f} us cpu {med['after'][2]:6.1f} us/req | "
                  f"after/before: req/s x{ratio[0]:.3f}, p50 x{ratio[1]:.3f}, cpu x{ratio[2]:.3f}")
        print(bench_call.loadavg())
        _parse_only()
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(60)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
