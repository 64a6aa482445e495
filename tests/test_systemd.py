"""systemd integration: socket activation (via systemd-socket-activate) and sd_notify."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import Daemon, UnixHTTPConnection

ACTIVATE = shutil.which("systemd-socket-activate")


def _require(tool: str | None, name: str) -> None:
    """Skip when a systemd tool is missing, except under CI, where that is a failure."""
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (CI is set: not skipping)")
        pytest.skip(f"{name} is not installed")


@pytest.fixture
def staged() -> Iterator[Daemon]:
    d = Daemon()
    try:
        yield d
    finally:
        d.cleanup()


def _get(path: str, url: str) -> int:
    conn = UnixHTTPConnection(path, timeout=10)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_socket_activation_and_sd_notify(staged: Daemon) -> None:
    _require(ACTIVATE, "systemd-socket-activate")
    assert ACTIVATE is not None
    sock_path = str(staged.root / "run" / "activated.sock")
    notify_path = str(staged.root / "run" / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(20)
    log = (staged.root / "daemon.log").open("wb")
    proc = subprocess.Popen(
        # systemd-socket-activate passes only -E variables to the service (like systemd)
        [ACTIVATE, "-l", sock_path, "-E", f"NOTIFY_SOCKET={notify_path}",
         sys.executable, "-m", "sidekey", "serve", "--config", str(staged.config_path)],
        stdout=log, stderr=log,
    )
    log.close()
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock_path):
            assert time.monotonic() < deadline, staged.log()
            time.sleep(0.05)
        # The first connection starts sidekey on the inherited socket.
        assert _get(sock_path, "/v1/health") == 200, staged.log()
        messages = []
        while b"READY=1" not in b"".join(messages):
            messages.append(notify.recv(4096))
        # It serves on the socket it was given, not on listen.socket from the config.
        assert not Path(staged.socket).exists()
        started = staged.events_of("daemon.started")[-1]
        assert started["socket"] == sock_path
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, staged.log()
        assert b"STOPPING=1" in notify.recv(4096)
        assert staged.events_of("daemon.stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


ANALYZE = shutil.which("systemd-analyze")
UNITS = Path(__file__).resolve().parents[1] / "systemd"


def test_shipped_units_verify_and_are_hardened(tmp_path: Path) -> None:
    _require(ANALYZE, "systemd-analyze")
    assert ANALYZE is not None
    sidekey_bin = Path(sys.executable).parent / "sidekey"
    assert sidekey_bin.exists()
    for name in ("sidekey.service", "sidekey.socket"):
        text = (UNITS / name).read_text().replace("/usr/local/bin/sidekey", str(sidekey_bin))
        (tmp_path / name).write_text(text)
    verify = subprocess.run(
        [ANALYZE, "verify", str(tmp_path / "sidekey.socket"), str(tmp_path / "sidekey.service")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert "sidekey" not in verify.stderr, verify.stderr
    security = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(tmp_path / "sidekey.service")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    exposure = [ln for ln in security.stdout.splitlines() if "Overall exposure level" in ln]
    assert exposure, security.stdout + security.stderr
    score = float(exposure[0].split(":")[1].split()[0])
    assert score <= 3.0, exposure[0]
