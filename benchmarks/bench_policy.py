"""What the governance decision costs per call, in-process (no sockets, no daemon).

Measures, on the quickstart config with the four seed policy files:

- ``decide``: the pure chain (registry -> peer -> OAuth2 result -> scopes -> agent grant
  -> secrets) for an allowed call and for a denied one;
- ``oauth hit``: verifying a bearer token already verified (the cache an agent's
  repeated token hits: SHA-256 + an LRU lookup, no signature check);
- ``oauth miss``: a first-time token, signature checked (EdDSA, ES256, RS256).

Target: the policy chain (decide + a cached token) about 100 microseconds or less at p50.

    python benchmarks/bench_policy.py [--n 20000]
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import trio

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart"
sys.path.insert(0, str(ROOT / "tests"))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def report(label: str, samples: list[float]) -> None:
    print(f"{label:<28} p50={percentile(samples, 0.5) * 1e6:8.1f} us   "
          f"p99={percentile(samples, 0.99) * 1e6:8.1f} us   mean={statistics.fmean(samples) * 1e6:8.1f} us")


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    from oauth_issuer import OAuthIssuer
    from sidekey.config import load_config
    from sidekey.oauth import OAuthVerifier
    from sidekey.policy import CallFacts, decide
    from sidekey.protocol import AccessToken

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="iterations per measurement")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="skp-"))
    try:
        for f in QUICKSTART.glob("*.yaml"):
            shutil.copy(f, tmp / f.name)
        cfg = load_config(tmp / "sidekey.yaml").config
        now = datetime.datetime.now(datetime.UTC)
        token = AccessToken(issuer="https://auth.example.com", subject="alice",
                            audience=("mcp:content-api",),
                            scopes=frozenset({"content:read", "content:write"}),
                            expires_at=int(time.time()) + 3600)

        def facts(agent: str) -> CallFacts:
            return CallFacts(server="content-api", tool="create_article", peer_uid=0, peer_user="root",
                             peer_servers=frozenset({"content-api"}), agent_id=agent, session_id="s",
                             args_digest="0" * 64, now=now, user_token=token, token_presented=True)

        allowed, denied = facts("content-writer"), facts("sales-assistant")
        assert decide(cfg, allowed).allowed and not decide(cfg, denied).allowed
        report("decide (allow)", timed(lambda: decide(cfg, allowed), args.n))
        report("decide (deny: agent)", timed(lambda: decide(cfg, denied), args.n))

        with OAuthIssuer(audience="mcp:content-api") as issuer:
            oauth = cfg.servers["content-api"].oauth2
            assert oauth != "none"
            spec = msgspec.structs.replace(oauth, issuer=issuer.issuer)
            verifier = OAuthVerifier(base_dir=tmp)

            async def measure() -> None:
                warm = issuer.mint(issuer.claims(scope="content:write"), alg="EdDSA")
                await verifier.verify(warm, spec)  # discovery + JWKS fetch
                hits = []
                for _ in range(args.n):
                    t0 = time.perf_counter()
                    await verifier.verify(warm, spec)
                    hits.append(time.perf_counter() - t0)
                report("oauth verify, cached token", hits)
                for alg in ("EdDSA", "ES256", "RS256"):
                    misses = []
                    for _ in range(max(200, args.n // 20)):
                        tok = issuer.mint(issuer.claims(scope="content:write"), alg=alg)
                        t0 = time.perf_counter()
                        await verifier.verify(tok, spec)
                        misses.append(time.perf_counter() - t0)
                    report(f"oauth verify, new {alg}", misses)
                await verifier.aclose()

            trio.run(measure)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
