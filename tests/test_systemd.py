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
from typing import Any

import pytest

from harness import Daemon, UnixHTTPConnection
from missing_binary import skip_missing

ACTIVATE = shutil.which("systemd-socket-activate")


def _require(tool: str | None, name: str) -> None:
    """Skip when a systemd tool is missing (reported at the end of the run), except under
    CI, where that is a failure."""
    if tool is None:
        skip_missing(name, "apt-get install systemd")


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
        # The unit runs the venv of docs/host-install.md; here, this interpreter's sidekey
        # (tests/test_host_install.py checks the unit as installed, with that venv).
        text = (UNITS / name).read_text().replace("/opt/sidekey/bin/sidekey", str(sidekey_bin))
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
    assert score <= 1.5, exposure[0]


def _notify_messages(sock: socket.socket, until: bytes, count: int, timeout: float = 20.0) -> list[bytes]:
    """Datagrams received on a fake NOTIFY_SOCKET until ``until`` was seen ``count`` times."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while sum(m.split(b"\n").count(until) for m in got) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"saw {got!r}, waited for {count} x {until!r}"
        sock.settimeout(left)
        got.append(sock.recv(4096))
    return got


def _watched_daemon(make_daemon: Any, monkeypatch: pytest.MonkeyPatch, *,
                    watchdog_pid: str | None) -> tuple[Daemon, socket.socket]:
    """A real daemon started with WATCHDOG_USEC=0.4 s and a fake NOTIFY_SOCKET.

    ``watchdog_pid``: "self" runs it through ``sh -c 'WATCHDOG_PID=$$ exec ...'`` so the
    variable names the daemon's own pid (exec keeps it), as systemd sets it; a number
    names another process; None leaves it unset."""
    prefix: list[str] = []
    if watchdog_pid == "self":
        prefix = ["sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh"]
    elif watchdog_pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", watchdog_pid)
    d: Daemon = make_daemon(command_prefix=prefix)
    notify_path = str(d.root / "run" / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    monkeypatch.setenv("NOTIFY_SOCKET", notify_path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    d.start()
    return d, sock


@pytest.mark.parametrize("watchdog_pid", ["self", None])
def test_watchdog_pings_while_serving(make_daemon: Any, monkeypatch: pytest.MonkeyPatch,
                                      watchdog_pid: str | None) -> None:
    """WatchdogSec= in the unit: the daemon feeds systemd's watchdog (WATCHDOG=1 at half
    of $WATCHDOG_USEC) while it serves, and stops with STOPPING=1."""
    d, sock = _watched_daemon(make_daemon, monkeypatch, watchdog_pid=watchdog_pid)
    with sock:
        got = _notify_messages(sock, b"WATCHDOG=1", 4)
        assert got[0] == b"READY=1", got
        assert d.request("GET", "/v1/health")[0] == 200
        assert d.stop() == 0, d.log()
        rest = _notify_messages(sock, b"STOPPING=1", 1)
        assert set(rest) <= {b"WATCHDOG=1", b"STOPPING=1"}, rest


def test_watchdog_not_fed_for_another_pid(make_daemon: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG_PID naming another process (inherited, not ours): no pings, as
    sd_watchdog_enabled(3) says; READY=1 still goes out."""
    d, sock = _watched_daemon(make_daemon, monkeypatch, watchdog_pid="1")
    with sock:
        assert _notify_messages(sock, b"READY=1", 1) == [b"READY=1"]
        # Five intervals of 0.2 s: a daemon that pinged would have sent some by now.
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            extra = sock.recv(4096)
            pytest.fail(f"unexpected notification {extra!r}")
        assert d.stop() == 0, d.log()
        assert _notify_messages(sock, b"STOPPING=1", 1) == [b"STOPPING=1"]
