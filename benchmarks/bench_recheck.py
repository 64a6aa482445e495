"""What re-checking the peer on every request costs (issue 9, item 1).

Since every request above the anonymous tier re-checks the pinned peer
(:meth:`sidekey.peer.PeerHandle.recheck`: pidfd alive, /proc status for the effective
uid/gid and groups, ``stat`` of /proc/<pid>/exe), this prints, in one run:

1. ``recheck()`` in a loop, in microseconds, on a live attested peer: this process over
   a socketpair, and a forked child over a real AF_UNIX connection; with a pidfd and
   best-effort (no pidfd: one more /proc read, for the start time). For comparison,
   the same check as it was written before (fdinfo read with ``open()``, status split
   into lines, ``readlink`` of exe), and ``attest()`` (once per connection).
2. End to end: two real daemons from the same quickstart config, one as shipped and
   one with ``PeerHandle.recheck`` patched to a no-op, driven alternately (chunks of
   20 requests, so that load from elsewhere falls on both alike) by one sequential
   keep-alive client per daemon in this process: ``GET /v1/status`` (tier admin;
   the benchmark runs as the daemon's uid, which is owner) and ``POST /v1/authorize``
   (tier service, content-api). Prints the median per-request time of each and the
   ratio with/without re-check (median chunk), and the daemons' own CPU time per
   request (from /proc/<pid>/stat, summed over the run: less sensitive to other load
   than wall time).

    python benchmarks/bench_recheck.py [--loops 20000] [--requests 1000] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_call import _post, serve_args, setup, spawn_daemon, split_response, user_token

from sidekey.peer import PeerHandle, attest

CHUNK = 20  # requests per timed chunk; the daemons alternate chunk by chunk
# The daemon without the per-request re-check: the shipped code with recheck a no-op.
NO_RECHECK = (
    "import runpy, sys; import sidekey.peer as p; p.PeerHandle.recheck = lambda self: None; "
    "sys.argv = ['sidekey', *sys.argv[1:]]; runpy.run_module('sidekey', run_name='__main__')"
)


# --------------------------------------------------------------------------- micro


def per_call_us(fn: Callable[[], object], loops: int, repeats: int = 5) -> float:
    """Best of ``repeats`` runs of ``loops`` calls, in microseconds per call (the best
    run is the least disturbed by other load on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - t0) / loops)
    return best * 1e6


def legacy_recheck(handle: PeerHandle) -> None:
    """The re-check as it was before issue 9 (redeem only): fdinfo via open(), status
    split into lines, readlink of exe. Kept here only to print the comparison."""
    pidfd, dir_fd = handle._pidfd, handle._dir_fd
    if pidfd is not None:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
            for line in f.read(4096).splitlines():
                if line.startswith(b"Pid:"):
                    int(line.split()[1])
    fd = os.open("status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        raw = os.read(fd, 64 * 1024)
    finally:
        os.close(fd)
    for line in raw.split(b"\n"):
        if line.startswith((b"State:", b"Uid:", b"Gid:")):
            line.split()
        elif line.startswith(b"Groups:"):
            break
    os.readlink("exe", dir_fd=dir_fd)


def micro(loops: int) -> dict[str, float]:
    out: dict[str, float] = {}
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        with attest(a) as h:
            out["recheck, self, pidfd"] = per_call_us(h.recheck, loops)
            out["legacy recheck, self, pidfd"] = per_call_us(lambda: legacy_recheck(h), loops)
        with attest(a, use_pidfd=False) as h:
            out["recheck, self, best-effort"] = per_call_us(h.recheck, loops)
        out["attest (per connection)"] = per_call_us(lambda: attest(a).close(), loops // 4)
    # A separate process on a real listening socket, as the daemon sees its peers.
    with tempfile.TemporaryDirectory(prefix="skb-") as tmp:
        path = os.path.join(tmp, "s")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        pid = os.fork()
        if pid == 0:
            try:
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.connect(path)
                c.recv(1)  # until the parent closes
            finally:
                os._exit(0)
        conn, _ = listener.accept()
        try:
            with attest(conn) as h:
                out["recheck, child, pidfd"] = per_call_us(h.recheck, loops)
                out["legacy recheck, child, pidfd"] = per_call_us(lambda: legacy_recheck(h), loops)
        finally:
            conn.close()
            listener.close()
            os.waitpid(pid, 0)
    return out


# --------------------------------------------------------------------------- end to end


def start(root: Path, config: Path, *, recheck: bool) -> subprocess.Popen[bytes]:
    args = serve_args(config)
    cmd = [sys.executable, "-m", "sidekey", *args] if recheck else [sys.executable, "-c", NO_RECHECK, *args]
    return spawn_daemon(root, cmd)


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (clock-tick resolution: only sums over
    many chunks are meaningful)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        rest = f.read().rsplit(b")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / TICK  # fields 14 and 15


class Client:
    """One keep-alive connection, pre-encoded requests, blocking I/O."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.buf = b""

    def call(self, req: bytes) -> int:
        self.sock.sendall(req)
        while (got := split_response(self.buf)) is None:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            self.buf += chunk
        status, _, self.buf = got
        return status

    def close(self) -> None:
        self.sock.close()


def requests(token: str) -> dict[str, bytes]:
    body = json.dumps({"server": "content-api", "tool": "create_article", "agent_id": "content-writer",
                       "session_id": "bench", "user_token": token,
                       "arguments": {"title": "Q2 update"}}).encode()
    return {
        "GET /v1/status": b"GET /v1/status HTTP/1.1\r\nhost: sidekey\r\n\r\n",
        "POST /v1/authorize": _post("/v1/authorize", body),
    }


def end_to_end(n: int, rounds: int) -> dict[str, dict[str, float]]:
    tmp = Path(tempfile.mkdtemp(prefix="skb-"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    clients: dict[str, Client] = {}
    try:
        token = ""
        for mode in ("with", "without"):
            root = tmp / mode
            root.mkdir()
            config = setup(root)
            token = token or user_token(root)
            procs[mode] = start(root, config, recheck=mode == "with")
            clients[mode] = Client(str(root / "run" / "sock"))
        # Both daemons use the same issuer key path layout but their own keys: mint per daemon.
        reqs = {mode: requests(user_token(tmp / mode)) for mode in clients}
        for mode, client in clients.items():  # warm up: token verified and cached, rows exist
            for req in reqs[mode].values():
                for _ in range(50):
                    status = client.call(req)
                    if status != 200:
                        raise SystemExit(f"{mode}: warm-up got {status}")
        # Interleaved in short chunks, so that load from elsewhere on the machine falls
        # on both daemons alike; the median chunk is reported.
        samples: dict[str, dict[str, list[float]]] = {
            name: {"with": [], "without": []} for name in reqs["with"]}
        cpu: dict[str, dict[str, float]] = {name: {"with": 0.0, "without": 0.0} for name in samples}
        order = list(clients)
        for _ in range(rounds):
            for chunk in range(max(1, n // CHUNK)):
                for name in samples:
                    # Alternate which daemon goes first, so neither always follows the other.
                    for mode in order if chunk % 2 == 0 else order[::-1]:
                        client, req, pid = clients[mode], reqs[mode][name], procs[mode].pid
                        c0 = cpu_seconds(pid)
                        t0 = time.perf_counter()
                        for _ in range(CHUNK):
                            client.call(req)
                        samples[name][mode].append((time.perf_counter() - t0) / CHUNK * 1e6)
                        cpu[name][mode] += cpu_seconds(pid) - c0
        total = rounds * max(1, n // CHUNK) * CHUNK
        out: dict[str, dict[str, float]] = {}
        for name, by_mode in samples.items():
            with_us = statistics.median(by_mode["with"])
            without_us = statistics.median(by_mode["without"])
            cpu_with = cpu[name]["with"] / total * 1e6
            cpu_without = cpu[name]["without"] / total * 1e6
            out[name] = {"with_us": with_us, "without_us": without_us,
                         "ratio": with_us / without_us, "delta_us": with_us - without_us,
                         "daemon_cpu_with_us": cpu_with, "daemon_cpu_without_us": cpu_without,
                         "daemon_cpu_ratio": cpu_with / cpu_without if cpu_without else float("nan")}
        return out
    finally:
        for client in clients.values():
            client.close()
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loops", type=int, default=20_000, help="recheck() calls per micro run")
    ap.add_argument("--requests", type=int, default=1000, help="requests per endpoint, daemon and round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (median reported)")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args()

    figures: dict[str, Any] = {"micro_us": micro(args.loops)}
    print(f"PeerHandle.recheck() and attest(), microseconds per call (best of 5 x {args.loops}):")
    for label, us in figures["micro_us"].items():
        print(f"  {label:<32} {us:8.2f} us")
    old, new = figures["micro_us"]["legacy recheck, child, pidfd"], figures["micro_us"]["recheck, child, pidfd"]
    print(f"  legacy / new (child, pidfd)      {old / new:8.2f}x")

    figures["end_to_end"] = end_to_end(args.requests, args.rounds)
    print(f"\nend to end, one keep-alive client, c=1 ({args.rounds} rounds of {args.requests} "
          f"requests per endpoint and daemon, alternating every {CHUNK}; median chunk):")
    for name, f in figures["end_to_end"].items():
        print(f"  {name:<20} with re-check {f['with_us']:8.1f} us/req ({1e6 / f['with_us']:7.0f} req/s)   "
              f"without {f['without_us']:8.1f} us/req ({1e6 / f['without_us']:7.0f} req/s)   "
              f"ratio {f['ratio']:.3f} ({f['delta_us']:+.1f} us)")
        print(f"  {'':<20} daemon CPU per request: with {f['daemon_cpu_with_us']:7.1f} us, "
              f"without {f['daemon_cpu_without_us']:7.1f} us, ratio {f['daemon_cpu_ratio']:.3f}")
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
