"""Cost of the audit hash chain and signed checkpoints on the governed call, in one run.

Three daemons of the same quickstart config (bench_call.setup: local store, SQLite
state, fsynced audit), driven by bench_call's raw client at c=1 and c=32:

- ``off``: the audit sink with the chain switched off (patched in the daemon process:
  each line written as encoded, no seq / prev_hash / log_id, no hashing): the cost
  before tamper evidence;
- ``chain``: the chain, no audit key (no checkpoints);
- ``signed``: the chain plus Ed25519 checkpoints at the defaults (1000 events / 1 s).

All three run side by side; short bursts alternate between them (off, chain, signed,
``--rounds`` times, at c=1 then c=32) so a drifting machine load weighs on all alike. It
prints calls/s and p50 per burst, then per variant the medians and the median of the
per-round ratios to ``off`` (the issue's budget: within 10 %, i.e. >= 0.90). Then ``--verify-calls`` calls (default 10,000) on the
signed daemon, a stop, and ``sidekey audit verify --key`` of its file, printed.

    python benchmarks/bench_audit_chain.py [--calls 300] [--rounds 5] [--verify-calls 10000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_call import (
    _raw_process,
    run_in_process,
    serve_args,
    setup,
    spawn_daemon,
    user_tokens,
)

# Run in the daemon process for "off": the commit writes the lines as encoded.
_NO_CHAIN = """
import sys
from sidekey.audit import jsonl
def _plain(self, bodies, *, final, sign_now=False):
    return b"".join(b + b"\\n" for b in bodies), self._chain, False, []
jsonl.JsonlSink._chain_lines = _plain
from sidekey.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start(root: Path, config: Path, *, chain: bool) -> subprocess.Popen[bytes]:
    if chain:
        cmd = [sys.executable, "-m", "sidekey", *serve_args(config)]
    else:
        cmd = [sys.executable, "-c", _NO_CHAIN, *serve_args(config)]
    return spawn_daemon(root, cmd)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def burst(sock: str, tokens: list[str], concurrency: int, calls: int) -> tuple[float, float]:
    """(calls/s, p50 ms) of ``calls`` governed calls at ``concurrency``."""
    per = max(1, calls // concurrency)
    wall, lat = run_in_process(_raw_process, sock, tokens, concurrency, per)
    lat.sort()
    return len(lat) / wall, lat[len(lat) // 2] * 1000


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def micro(n: int = 20_000) -> None:
    """The chain's own work per event, without a daemon: encoding a typical event (what
    the sink did before) vs appending the chain fields and hashing the line; and one
    checkpoint signature."""
    import datetime

    import msgspec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sidekey.audit.chain import GENESIS, Signer, chained_line, checkpoint_fields, line_hash
    from sidekey.audit.events import make_event

    enc = msgspec.json.Encoder()
    event = make_event(
        "mcp.redeem", host="bench", now=datetime.datetime.now(datetime.UTC),
        server="content-api", tool="create_article", user_id="user-00001", agent_id="content-writer",
        session_id="bench", arguments={"title": "Q2 update", "draft": True},
        auth={"token_issuer": "https://auth.example.com", "scopes": ["content:write"]},
        policy={"evaluated": True, "rules_matched": ["a", "b"], "decision": "allow"},
        lease_id="lse_0123456789abcdef", redact_keys=())
    t0 = time.perf_counter()
    for _ in range(n):
        body = enc.encode(event)
    encode = (time.perf_counter() - t0) / n
    head = GENESIS
    t0 = time.perf_counter()
    for i in range(n):
        line = chained_line(body, i + 1, head, "0123456789abcdef")
        head = line_hash(line)
    chain = (time.perf_counter() - t0) / n
    signer = Signer(Ed25519PrivateKey.generate())
    t0 = time.perf_counter()
    for i in range(200):
        checkpoint_fields(signer, log_id="0123456789abcdef", host="bench", seq=i, hash_=head,
                          signed_at="2026-01-01T00:00:00.000Z", final=False)
    sign = (time.perf_counter() - t0) / 200
    print(f"per event ({len(body)} bytes): encode {encode * 1e6:.2f} us, chain fields + SHA-256 "
          f"{chain * 1e6:.2f} us; one checkpoint signature {sign * 1e6:.0f} us "
          f"(at most one per 1000 events or per second)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300,
                    help="calls per burst at c=1; twice as many at c=32 (default 300)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians kept)")
    ap.add_argument("--verify-calls", type=int, default=10_000,
                    help="calls before the final verify (0: skip)")
    ap.add_argument("--keep", action="store_true", help="keep the daemons' directories")
    args = ap.parse_args()
    micro()
    base = Path(tempfile.mkdtemp(prefix="skc-"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        # Three daemons side by side, each in its own directory; the bursts alternate
        # between them, so a machine whose load drifts weighs on all three alike.
        roots: dict[str, Path] = {}
        tokens: dict[str, list[str]] = {}
        for name in ("off", "chain", "signed"):
            root = roots[name] = base / name
            root.mkdir()
            config = setup(root)
            if name == "signed":
                subprocess.run([sys.executable, "-m", "sidekey", "keygen", "audit", "--out",
                                str(root / "keys" / "audit.pem")], check=True, capture_output=True)
                cfg = yaml.safe_load(config.read_text())
                cfg["audit"] = {**cfg.get("audit", {}), "checkpoint_key_file": "keys/audit.pem"}
                config.write_text(yaml.safe_dump(cfg))
            tokens[name] = user_tokens(root, 1)
            procs[name] = start(root, config, chain=name != "off")
            run_in_process(_raw_process, str(root / "run" / "sock"), tokens[name], 4, 25)  # warm-up
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for rnd in range(args.rounds):
            for c in (1, args.concurrency):
                calls = args.calls if c == 1 else args.calls * 2
                line = []
                for name in roots:
                    got = burst(str(roots[name] / "run" / "sock"), tokens[name], c, calls)
                    results.setdefault((name, c), []).append(got)
                    line.append(f"{name} {got[0]:.0f}/s p50 {got[1]:.3f} ms")
                print(f"round {rnd + 1} c={c}: " + "  ".join(line), flush=True)
        print("\nmedian of rounds; ratio = calls/s relative to off, per round, median "
              "(1.00 = same cost; the budget is >= 0.90)")
        for c in (1, args.concurrency):
            off = [r[0] for r in results[("off", c)]]
            cols = []
            for name in roots:
                runs = results[(name, c)]
                ratio = median([r[0] / o for r, o in zip(runs, off, strict=True)])
                cols.append(f"{name} {median([r[0] for r in runs]):.0f}/s "
                            f"p50 {median([r[1] for r in runs]):.3f} ms (x{ratio:.2f})")
            print(f"c={c:<3} " + "  ".join(cols))
        for proc in procs.values():
            stop(proc)
        procs.clear()
        if args.verify_calls:
            root = roots["signed"]
            audit = root / "state" / "audit.jsonl"
            audit.unlink(missing_ok=True)
            procs["signed"] = start(root, root / "sidekey.yaml", chain=True)
            t0 = time.perf_counter()
            burst(str(root / "run" / "sock"), tokens["signed"], args.concurrency, args.verify_calls)
            took = time.perf_counter() - t0
            rc = stop(procs.pop("signed"))
            lines = audit.read_bytes().count(b"\n")
            last = [json.loads(x)["event_type"] for x in audit.read_bytes().splitlines()[-2:]]
            print(f"daemon exit code {rc}; its last events: {last}")
            if rc != 0:
                print((root / "daemon.log").read_text()[-3000:])
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "sidekey", "audit", "verify", "--key",
                                  str(root / "keys" / "audit.pem.pub"), str(audit)],
                                 capture_output=True, text=True)
            print(f"\n{args.verify_calls} calls at c={args.concurrency} in {took:.1f} s "
                  f"({lines} audit lines); sidekey audit verify took "
                  f"{time.perf_counter() - t0:.2f} s, exit {out.returncode}:")
            print((out.stdout + out.stderr).strip())
    finally:
        for proc in procs.values():
            stop(proc)
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
