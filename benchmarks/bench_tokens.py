"""Cost of the per-call token work and id minting, before/after in one run.

- resolution token issue + verify (HS256) with pyjwt's HMAC key preparation cached per
  key (what the daemon does) against preparing it on every sign and verify (before);
- ids: ``sidekey.encoding.random_uuid4`` / ``random_hex`` against ``uuid.uuid4()``
  (several ids per governed call: event ids, the jti, the lease id, the request id).

Alternating rounds in one process, medians; prints µs per operation and the ratios.

    python benchmarks/bench_tokens.py [--rounds 6] [--n 5000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from sidekey import tokens
from sidekey.encoding import random_hex, random_uuid4
from sidekey.tokens import HmacKey, KeySet, PeerClaim, TokenCodec


def per_op_us(fn: Callable[[], Any], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--n", type=int, default=5000, help="operations per round")
    args = ap.parse_args()
    key = HmacKey(kid="k1", secret=os.urandom(32), created=0)
    codec = TokenCodec(issuer="sidekey:bench", keyset=KeySet(active=key, keys={"k1": key}))
    peer = PeerClaim(uid=1000, pid=4242, start=123456)

    def issue_verify() -> None:
        now = time.time()
        token, _ = codec.issue(server="content-api", tool="create_article", user="alice",
                               agent="content-writer", session="s1", args_digest="0" * 64,
                               peer=peer, now=now, ttl_s=60)
        codec.verify(token, now=now)

    cached = tokens._prepared_hmac
    variants: dict[str, Callable[[bytes], Any]] = {
        "prepared once (now)": cached,
        "prepared per use (before)": lambda secret: tokens._HS256.prepare_key(secret),
    }
    ids: dict[str, Callable[[], Any]] = {
        "random_uuid4 (now)": random_uuid4,
        "str(uuid.uuid4()) (before)": lambda: str(uuid.uuid4()),
        "random_hex (now)": random_hex,
        "uuid.uuid4().hex (before)": lambda: uuid.uuid4().hex,
    }
    results: dict[str, list[float]] = {name: [] for name in [*variants, *ids]}
    try:
        for _ in range(args.rounds):
            for name, prepare in variants.items():
                tokens._prepared_hmac = prepare  # type: ignore[assignment]
                results[name].append(per_op_us(issue_verify, args.n))
            for name, fn in ids.items():
                results[name].append(per_op_us(fn, args.n * 4))
    finally:
        tokens._prepared_hmac = cached
    med = {name: statistics.median(v) for name, v in results.items()}
    print(f"median of {args.rounds} rounds, µs per operation")
    for name, value in med.items():
        print(f"  {name:30s} {value:8.2f}")
    print(f"token issue + verify: now/before = "
          f"{med['prepared once (now)'] / med['prepared per use (before)']:.2f}")
    print(f"event id: now/before = "
          f"{med['random_uuid4 (now)'] / med['str(uuid.uuid4()) (before)']:.2f}; hex id: "
          f"{med['random_hex (now)'] / med['uuid.uuid4().hex (before)']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
