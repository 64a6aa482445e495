"""Cost of audit argument redaction per event (issue 9 item 15), old rule vs new.

``old``: the rule before item 15 (six case-insensitive substrings, plain dict/list walk),
re-implemented here; ``new``: :func:`sidekey.audit.events.redact` (built-in substrings
and words on the normalised key, memoised per key name; header pairs, name/value
objects, inline ``Name: value``, URL passwords). Both include the JSON size check.
Prints microseconds per call for three argument shapes and the new/old ratio; ``hmac``:
``new`` with the daemon's HMAC of each hidden value (issue 12 item 5, schema 3) in place
of the ``[REDACTED]`` marker, and its ratio to ``new``.

    python benchmarks/bench_redact.py [--rounds 20000]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from sidekey.audit.events import REDACTED, redact
from sidekey.audit.hmackey import ValueHasher

OLD_KEYS = ("password", "secret", "token", "key", "credential", "authorization")
_encoder = msgspec.json.Encoder()


def old_redact(arguments: Mapping[str, Any]) -> Any:
    def walk(value: Any, depth: int) -> Any:
        if isinstance(value, Mapping):
            out = {}
            for key, item in value.items():
                name = str(key)
                lowered = name.lower()
                out[name] = REDACTED if any(n in lowered for n in OLD_KEYS) else walk(item, depth + 1)
            return out
        if isinstance(value, list | tuple):
            return [walk(item, depth + 1) for item in value]
        return value

    redacted = walk(arguments, 0)
    _encoder.encode(redacted)
    return redacted


SHAPES: dict[str, dict[str, Any]] = {
    "typical (4 keys)": {"title": "Quarterly report", "channel": "web", "article_id": 7,
                         "tags": ["finance", "q3"]},
    "http tool (headers, nested)": {
        "url": "https://api.example.com/v1/items?limit=10", "method": "POST",
        "headers": [["Authorization", "Bearer abc"], ["Accept", "application/json"],
                    ["X-Request-Id", "r-1"]],
        "body": {"name": "x", "items": [{"sku": i, "qty": 1} for i in range(10)]},
        "api_key": "k",
    },
    "wide (100 keys)": {f"field_{i}": f"value {i}" for i in range(100)},
}


def per_call_us(fn: Callable[[dict[str, Any]], Any], args: dict[str, Any], rounds: int) -> float:
    fn(args)  # warm the memo, as a running daemon has
    start = time.perf_counter()
    for _ in range(rounds):
        fn(args)
    return (time.perf_counter() - start) / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20_000)
    rounds = parser.parse_args().rounds
    hasher = ValueHasher(bytes(32))
    print(f"{'arguments':32} {'old us':>8} {'new us':>8} {'new/old':>8} {'hmac us':>8} "
          f"{'hmac/new':>8}")
    for name, args in SHAPES.items():
        old = per_call_us(old_redact, args, rounds)
        new = per_call_us(lambda a: redact(a, []), args, rounds)
        mac = per_call_us(lambda a: redact(a, [], hasher=hasher), args, rounds)
        print(f"{name:32} {old:8.2f} {new:8.2f} {new / old:8.2f} {mac:8.2f} {mac / new:8.2f}")


if __name__ == "__main__":
    main()
