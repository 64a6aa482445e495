"""A real ``moto_server`` (AWS mocked over HTTP) for tests, and a clean AWS environment.

``run_moto_server()`` starts the venv's ``moto_server`` (or ``python -m moto.server``)
on 127.0.0.1 at a free port, waits (bounded) until it answers HTTP, yields its URL and
stops it. ``aws_test_env()`` is an environment with dummy credentials and no path to the
user's real AWS config, for the server and for the boto3 clients under test.
``require_moto_server()`` skips when moto's server is not installed, except under
``CI``, where that is a failure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from missing_binary import skip_missing

REGION = "us-east-1"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
_START_ATTEMPTS = 3  # a free port can be taken between probing and binding it

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    # Never read (or write) the user's real AWS files, never ask instance metadata.
    "AWS_CONFIG_FILE": "/nonexistent/sidekey-test/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/sidekey-test/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def aws_test_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) without any ``AWS_*``/``MOTO_*`` variable, plus
    :data:`DUMMY_AWS_ENV`."""
    src = os.environ if base is None else base
    env = {k: v for k, v in src.items() if not k.startswith(("AWS_", "MOTO_"))}
    env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
    env.update(DUMMY_AWS_ENV)
    return env


def use_aws_test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apply :func:`aws_test_env` to this test's process environment."""
    for key in list(os.environ):
        if key.startswith(("AWS_", "MOTO_")):
            monkeypatch.delenv(key)
    for key, value in DUMMY_AWS_ENV.items():
        monkeypatch.setenv(key, value)


def moto_server_command() -> list[str] | None:
    """How to start moto's server here, or None when it is not installed."""
    script = Path(sys.executable).with_name("moto_server")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("moto_server")
    if found:
        return [found]
    if importlib.util.find_spec("moto") is not None and importlib.util.find_spec("flask"):
        return [sys.executable, "-m", "moto.server"]
    return None


def require_moto_server() -> list[str]:
    """The command from :func:`moto_server_command`; skip if missing (fail under ``CI``)."""
    cmd = moto_server_command()
    if cmd is None:
        skip_missing("moto_server", "pip install 'moto[server]'")  # reported at the end of the run
    return cmd


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"


@contextlib.contextmanager
def run_moto_server(
    *,
    env_extra: Mapping[str, str] | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Iterator[str]:
    """Run ``moto_server`` until the block ends; yields ``http://127.0.0.1:<port>``."""
    cmd = require_moto_server()
    env = aws_test_env()
    env.update(env_extra or {})
    # The server logs every request: to a file, not a pipe nobody drains (a full pipe
    # would block the server).
    with tempfile.TemporaryFile() as log:
        last_error = "not started"
        for _ in range(_START_ATTEMPTS):
            port = free_port()
            proc = subprocess.Popen(
                [*cmd, "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            try:
                url = f"http://127.0.0.1:{port}"
                if _wait_until_up(proc, url, startup_timeout_s):
                    yield url
                    return
                last_error = f"exit code {proc.returncode}"
                if proc.returncode is None:
                    last_error = f"no answer within {startup_timeout_s:g}s"
            finally:
                _stop(proc)
        log.seek(0)
        tail = log.read()[-2000:].decode("utf-8", "replace")
        raise RuntimeError(f"moto_server did not start ({last_error}):\n{tail}")


def _wait_until_up(proc: subprocess.Popen[bytes], url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1) as resp:
                resp.read()
            return True
        except urllib.error.HTTPError:
            return True  # it answers HTTP, which is all that is needed
        except OSError:
            time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


def moto_api_post(url: str, path: str, body: bytes) -> bytes:
    """POST ``body`` to one of moto's control endpoints (``/moto-api/...``)."""
    req = urllib.request.Request(
        f"{url}{path}",
        data=body,
        method="POST",
        # Not form-encoded: Flask would consume a form body and moto would see none.
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        data: bytes = resp.read()
    return data
