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


@pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate is not installed")
def test_socket_activation_and_sd_notify(staged: Daemon) -> None:
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
