"""Issue 12, "done means": a clean log verifies after 10,000 governed calls, a restart, a
rotation and a kill -9, and a webhook collector got every line of it at least once.
One real daemon; calls from 8 threads (bounded: 10,000 calls, each with its own time
bound in the harness)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from harness import Daemon
from test_audit_chain import call, chained_daemon, raw_lines, verify_cli
from test_audit_sinks import audit_files, wait_for
from test_audit_webhook import put_secret, sink_health
from webhook_collector import Collector

CALLS = 10_000
THREADS = 8


def calls(d: Daemon, n: int) -> None:
    with ThreadPoolExecutor(THREADS) as pool:
        for result in pool.map(lambda _: call(d), range(n)):
            assert result is None


def test_10000_calls_restart_rotation_kill9_verify_clean_and_reach_the_collector(
        make_daemon: Any, tmp_path: Path) -> None:
    collector = Collector(tmp_path / "collector", auth=("Authorization", "Splunk long-run-token"))
    collector.start()
    try:
        d, pub = chained_daemon(make_daemon, sinks=[
            {"type": "file", "rotate_bytes": 4 * 1024 * 1024},
            {"type": "webhook", "name": "siem", "url": collector.url + "/services/collector/raw",
             "ca_file": str(collector.ca),
             "auth": {"prefix": "Splunk ", "secret": {"backend": "local", "name": "siem/token"}}}])
        put_secret(d, "siem/token", "long-run-token")
        d.start()
        calls(d, CALLS // 4)
        assert d.stop() == 0  # a restart
        d.start()
        calls(d, CALLS // 4)
        d.kill()  # a kill -9 under the chain's unsigned tail
        d.start()
        calls(d, CALLS // 2)
        # The sink caught up before the stop (its last lines go in the stop's drain).
        assert wait_for(lambda: (lambda h: h["ok"] and h["queued"] == 0)(sink_health(d)),
                        timeout=300)
        assert d.stop() == 0
        files = audit_files(d)
        assert len(files) >= 3, files  # rotated
        rc, report = verify_cli("--key", pub, *files)
        assert rc == 0, report
        lines = [line for path in files for line in raw_lines(path)]
        events = [json.loads(line) for line in lines]
        assert sum(e["event_type"] == "mcp.tool_call" for e in events) == CALLS
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        # The collector: every line, at least once (the kill -9 may have cost resends),
        # byte for byte.
        assert wait_for(lambda: set(lines) <= set(collector.lines()), timeout=60)
    finally:
        collector.stop()
