"""Per-call cost of getting an AWS Secrets Manager secret to a tool, three ways, in one run:

- ``sidekey cached``: a full governed call (authorize + redeem + release) whose secret
  comes from sidekey's cache (``cache_ttl_s`` 60 s);
- ``sidekey uncached``: the same call with ``cache_ttl_s: 0`` for that secret, so every
  redeem calls ``GetSecretValue``;
- ``naive boto3``: what an MCP server does without sidekey: ``get_secret_value`` per
  tool call, straight from the tool's process.

AWS is ``moto`` in server mode on loopback (started here), so absolute numbers are
loopback numbers; the ratios are the point. Prints p50/p99 per way and the ratios.

    python benchmarks/bench_backends.py [--calls 500]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import boto3
import trio
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    from bench_call import ARGS, _Conn, _post, setup, start_daemon, user_token

    from moto_server import aws_test_env, run_moto_server

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args()
    os.environ.clear()
    os.environ.update(aws_test_env())

    root = Path(tempfile.mkdtemp(prefix="skbb-"))
    try:
        with run_moto_server() as moto_url:
            sm = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto_url)
            sm.create_secret(Name="content/key", SecretString=os.urandom(16).hex())
            config = setup(root)
            cfg = yaml.safe_load(config.read_text())
            cfg["backends"]["aws"] = {"type": "aws", "region": "us-east-1", "endpoint_url": moto_url,
                                      "cache_ttl_s": 60}
            cfg["secrets"]["content-api"]["list_articles"] = {
                "KEY": {"backend": "aws", "secret_id": "content/key"}}
            cfg["secrets"]["content-api"]["create_article"] = {
                "KEY": {"backend": "aws", "secret_id": "content/key", "cache_ttl_s": 0}}
            config.write_text(yaml.safe_dump(cfg))
            proc = start_daemon(root, config, None)
            token = user_token(root)
            try:
                results: dict[str, list[float]] = {}

                async def governed(tool: str) -> list[float]:
                    stream = await trio.open_unix_socket(str(root / "run" / "sock"))
                    conn = _Conn(stream)
                    lat = []
                    auth_req = _post("/v1/authorize", json.dumps({
                        "server": "content-api", "tool": tool, "agent_id": "content-writer",
                        "user_token": token, "arguments": ARGS}).encode())
                    try:
                        for _ in range(args.calls):
                            t0 = time.perf_counter()
                            st, a = await conn.call(auth_req)
                            assert st == 200, a
                            st, lease = await conn.call(_post("/v1/redeem", json.dumps(
                                {"resolution_token": a["resolution_token"]}).encode()))
                            assert st == 200, lease
                            st, r = await conn.call(_post("/v1/release", json.dumps(
                                {"lease_id": lease["lease_id"], "status": "success"}).encode()))
                            assert st == 200, r
                            lat.append(time.perf_counter() - t0)
                    finally:
                        await stream.aclose()
                    return lat

                results["sidekey cached"] = trio.run(governed, "list_articles")
                results["sidekey uncached"] = trio.run(governed, "create_article")
                naive = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    sm.get_secret_value(SecretId="content/key")
                    naive.append(time.perf_counter() - t0)
                results["naive boto3"] = naive
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        p50 = {}
        for label, lat in results.items():
            lat.sort()
            p50[label] = lat[len(lat) // 2]
            print(f"{label:<18} p50={lat[len(lat) // 2] * 1000:7.3f} ms  "
                  f"p99={lat[int(len(lat) * 0.99)] * 1000:7.3f} ms")
        print(f"uncached / cached:       {p50['sidekey uncached'] / p50['sidekey cached']:.2f}x")
        print(f"naive boto3 / cached:    {p50['naive boto3'] / p50['sidekey cached']:.2f}x")
        print(f"uncached / naive boto3:  {p50['sidekey uncached'] / p50['naive boto3']:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
