"""Cost of the audit hash chain and signed checkpoints on the governed call, in one run.

Three daemons of the same quickstart config (bench_call.setup: local store, SQLite
state, fsynced audit), driven by bench_call's raw client at c=1 and c=32:

- ``off``: the audit sink with the chain switched off (patched in the daemon process:
  each line written as encoded, no seq / prev_hash / log_id, no hashing): the cost
  before tamper evidence;
- ``chain``: the chain, no audit key (no checkpoints);
- ``signed``: the chain plus Ed25519 checkpoints at the defaults (1000 events / 1 s).

The runs alternate (off, chain, signed, then again) and each figure is the better of
its ``--rounds``; it prints calls/s and p50 per run and the ratios to ``off``
(the issue's budget: within 10 %). Then ``--verify-calls`` calls (default 10,000) on the
signed daemon, a stop, and ``sidekey audit verify --key`` of its file, printed.

    python benchmarks/bench_audit_chain.py [--calls 2000] [--rounds 2] [--verify-calls 10000]
"""

from __future__ import annotations

import argparse
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
def _plain(self, bodies, *, final):
    return b"".join(b + b"\\n" for b in bodies), self._chain, False
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


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def measure(root: Path, config: Path, tokens: list[str], *, chain: bool, calls: int,
            concurrency: int) -> dict[str, dict[str, float]]:
    proc = start(root, config, chain=chain)
    sock = str(root / "run" / "sock")
    out: dict[str, dict[str, float]] = {}
    try:
        run_in_process(_raw_process, sock, tokens, 4, 25)  # warm-up (not timed)
        for c in (1, concurrency):
            per = calls if c == 1 else max(1, calls // c) * 2
            wall, lat = run_in_process(_raw_process, sock, tokens, c, per)
            lat.sort()
            out[f"c={c}"] = {"calls_per_s": len(lat) / wall, "p50_ms": lat[len(lat) // 2] * 1000}
    finally:
        stop(proc)
    return out


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
    ap.add_argument("--calls", type=int, default=2000, help="calls per run at c=1 (default 2000)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (best kept)")
    ap.add_argument("--verify-calls", type=int, default=10_000,
                    help="calls before the final verify (0: skip)")
    args = ap.parse_args()
    micro()
    root = Path(tempfile.mkdtemp(prefix="skc-"))
    try:
        config = setup(root)
        subprocess.run([sys.executable, "-m", "sidekey", "keygen", "audit", "--out",
                        str(root / "keys" / "audit.pem")], check=True, capture_output=True)
        plain_cfg = yaml.safe_load(config.read_text())
        signed = root / "sidekey-signed.yaml"
        signed_cfg = dict(plain_cfg)
        signed_cfg["audit"] = {**plain_cfg.get("audit", {}), "checkpoint_key_file": "keys/audit.pem"}
        signed.write_text(yaml.safe_dump(signed_cfg))
        tokens = user_tokens(root, 1)
        audit = root / "state" / "audit.jsonl"
        best: dict[str, dict[str, dict[str, float]]] = {}
        variants: list[tuple[str, Path, bool]] = [("off", config, False), ("chain", config, True),
                                                 ("signed", signed, True)]
        for rnd in range(args.rounds):
            for name, cfg, chain in variants:
                audit.unlink(missing_ok=True)  # "off" writes unchained lines: a fresh log each run
                got = measure(root, cfg, tokens, chain=chain, calls=args.calls,
                              concurrency=args.concurrency)
                print(f"round {rnd + 1} {name:<7} " + "  ".join(
                    f"{c}: {v['calls_per_s']:.0f} calls/s p50 {v['p50_ms']:.3f} ms"
                    for c, v in got.items()), flush=True)
                for c, v in got.items():
                    cur = best.setdefault(name, {}).get(c)
                    if cur is None or v["calls_per_s"] > cur["calls_per_s"]:
                        best[name][c] = v
        print("\nbest of rounds; ratio = calls/s relative to off (1.00 = same cost)")
        for c in best["off"]:
            base = best["off"][c]["calls_per_s"]
            row = "  ".join(f"{name} {best[name][c]['calls_per_s']:.0f}/s "
                            f"(x{best[name][c]['calls_per_s'] / base:.2f}, "
                            f"p50 {best[name][c]['p50_ms']:.3f} ms)" for name, _, _ in variants)
            print(f"{c:<6} {row}")
        if args.verify_calls:
            audit.unlink(missing_ok=True)
            proc = start(root, signed, chain=True)
            t0 = time.perf_counter()
            try:
                run_in_process(_raw_process, str(root / "run" / "sock"), tokens,
                               args.concurrency, max(1, args.verify_calls // args.concurrency))
            finally:
                stop(proc)
            took = time.perf_counter() - t0
            lines = audit.read_bytes().count(b"\n")
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "sidekey", "audit", "verify", "--key",
                                  str(root / "keys" / "audit.pem.pub"), str(audit)],
                                 capture_output=True, text=True)
            print(f"\n{args.verify_calls} calls at c={args.concurrency} in {took:.1f} s "
                  f"({lines} audit lines); sidekey audit verify took "
                  f"{time.perf_counter() - t0:.2f} s, exit {out.returncode}:")
            print((out.stdout + out.stderr).strip())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
