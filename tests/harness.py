"""Integration-test harness: a real sidekey daemon subprocess on a real Unix socket.

Tests talk to it only through the public client, raw HTTP over the socket, and the
files it writes (audit log, stderr log).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidekey.backends.local import LocalStore, generate_key_file, load_key
from sidekey.devissuer import create_issuer, kid_of, mint_user_token

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart"
START_TIMEOUT_S = 15.0
ISSUER = "https://auth.example.com"  # the seed's issuer, served here from a local JWKS


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("sidekey", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self._path)
        except BaseException:
            s.close()
            raise
        self.sock = s


def demo_secrets() -> dict[str, str]:
    """Fresh random values per test run, so a grep for them can only find real leaks."""
    rand = os.urandom(8).hex()
    return {
        "content-api/read-key": f"SECRET-read-{rand}",
        "content-api/write-key": f"SECRET-write-{rand}",
        "content-api/publish-key": f"SECRET-publish-{rand}",
        "analytics-db/readonly-dsn": f"postgres://ro:SECRET-pw-{rand}@db/analytics",
    }


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# A leak test decorated with this runs against daemons writing each log format (the
# `daemon` and `make_daemon` fixtures read the `log_format` fixture; default text).
BOTH_LOG_FORMATS = pytest.mark.parametrize("log_format", ["text", "json"], indirect=True)


def with_log_format(overrides: dict[str, Any] | None, log_format: str) -> dict[str, Any] | None:
    """``overrides`` with ``log.format`` set (text, the default, leaves them as given)."""
    if log_format == "text":
        return overrides
    return _merge({"log": {"format": log_format}}, overrides or {})


class Daemon:
    """A sidekey daemon in its own short-path directory (AF_UNIX paths are capped at 107 bytes)."""

    def __init__(self, overrides: dict[str, Any] | None = None, *, root: Path | None = None,
                 seed_limits: bool = False, command_prefix: list[str] | None = None) -> None:
        # Put before the daemon's command line, e.g. ["unshare", "--pid", "--fork", ...]
        # to run it in its own PID namespace (tests/test_containers.py).
        self.command_prefix = list(command_prefix or [])
        self.root = root or Path(tempfile.mkdtemp(prefix="sk-"))
        os.chmod(self.root, 0o755)  # so a test process running as nobody can reach the socket
        for f in QUICKSTART.glob("*.yaml"):
            if f.name != "sidekey.yaml":
                shutil.copy(f, self.root / f.name)
        if not seed_limits:
            # The seed's limits (10 create_article calls a minute per user, approval
            # beyond 5 an hour...) would throttle or hold tests that are about something
            # else; quota tests ask for seed_limits=True.
            limits = yaml.safe_load((self.root / "rate-limits.yaml").read_text())
            for section in [limits["limits"]["per_user"], *limits["limits"]["per_tool"].values()]:
                for key in ("requests_per_minute", "requests_per_hour", "concurrent_sessions",
                            "requires_approval_above"):
                    if key in section:
                        section[key] = 1_000_000
            (self.root / "rate-limits.yaml").write_text(yaml.safe_dump(limits))
        base = yaml.safe_load((QUICKSTART / "sidekey.yaml").read_text())
        base["listen"]["mode"] = "0666"
        base["listen"]["socket"] = "run/sock"
        base["listen"]["shutdown_grace_s"] = 5
        base["oauth2_issuers"] = {ISSUER: {"jwks_file": "keys/issuer-jwks.json"}}
        cfg = _merge(base, overrides or {})
        self.config_path = self.root / "sidekey.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.config = cfg
        (self.root / "run").mkdir(exist_ok=True)
        os.chmod(self.root / "run", 0o755)
        self.socket = str(self.root / "run" / "sock")
        self.audit_path = self.root / "state" / "audit.jsonl"
        self.log_path = self.root / "daemon.log"
        self.secrets = demo_secrets()
        # A local OAuth2 issuer for the seed's "https://auth.example.com" (see
        # oauth2_issuers in the config): authorize() mints user tokens with it.
        self.issuer_key = self.root / "keys" / "issuer.pem"
        self.issuer_jwks = self.root / "keys" / "issuer-jwks.json"
        if not self.issuer_key.exists():
            create_issuer(self.issuer_key, self.issuer_jwks)
        self.issuer_kid = kid_of(self.issuer_jwks)
        self._tokens: dict[str, str] = {}
        key_file = self.root / "keys" / "local.key"
        if not key_file.exists():
            generate_key_file(key_file)
            store = LocalStore(self.root / "state" / "secrets.enc", load_key(key_file, None))
            for name, value in self.secrets.items():
                store.put(name, value)
        self.proc: subprocess.Popen[bytes] | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> Daemon:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.command_prefix, sys.executable, "-m", "sidekey", "--log-level", "debug", "serve",
             "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            cwd=self.root,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = self.request("GET", "/v1/health", timeout=1.0)
                if status in (200, 503):
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"daemon did not start in {START_TIMEOUT_S} s:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> Daemon:
        assert self.stop() == 0
        return self.start()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    # ---------------------------------------------------------------- talking

    def request(
        self, method: str, path: str, body: Any = None, *, timeout: float = 10.0
    ) -> tuple[int, dict[str, Any]]:
        conn = UnixHTTPConnection(self.socket, timeout=timeout)
        try:
            data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
            headers = {"content-type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else {}
        finally:
            conn.close()

    def raw(self, data: bytes, *, timeout: float = 10.0, shutdown: bool = False) -> bytes:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(self.socket)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(data)  # the daemon may answer (413) and close before reading it all
            if shutdown:
                s.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            s.close()

    def user_token(self, server: str = "content-api", *, user: str = "alice",
                   scopes: list[str] | None = None, **kw: Any) -> str:
        """A bearer token from the local issuer for ``server``'s audience (default: every
        scope the server offers). Default tokens are cached, so a child process that
        dropped privileges (and cannot read the issuer key) can still use them."""
        cacheable = user == "alice" and scopes is None and not kw
        if cacheable and server in self._tokens:
            return self._tokens[server]
        spec = yaml.safe_load((self.root / "mcp-server-registry.yaml").read_text())["servers"][server]
        oauth = spec["oauth2"]
        token = mint_user_token(
            self.issuer_key, kid=self.issuer_kid, issuer=oauth["issuer"],
            audience=kw.pop("audience", oauth["audience"]), subject=user,
            scopes=oauth["scopes"] if scopes is None else scopes, **kw,
        )
        if cacheable:
            self._tokens[server] = token
        return token

    def authorize(self, server: str = "content-api", tool: str = "create_article", **kw: Any) -> tuple[int, dict[str, Any]]:
        body = {"server": server, "tool": tool, "agent_id": "content-writer", "session_id": "s1",
                "arguments": {"title": "hello"}, **kw}
        if "user_token" not in kw:
            body["user_token"] = self.user_token(server)
        elif kw["user_token"] is None:
            del body["user_token"]
        return self.request("POST", "/v1/authorize", body)

    # ---------------------------------------------------------------- what it wrote

    def audit_events(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line]

    def events_of(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.audit_events() if e["event_type"] == event_type]

    def wait_events(self, event_type: str, count: int = 1, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Events of a type once at least ``count`` are on disk (an allowed authorize is
        committed with the next durable event or within 50 ms, not before its response).
        ``timeout`` only guards a hang: callers wait for events that must come, so a loaded
        machine costs time here, never a false failure."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.events_of(event_type)
            if len(events) >= count or time.monotonic() > deadline:
                return events
            time.sleep(0.02)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def everything_written(self) -> bytes:
        """Every byte under the daemon's directory except the encrypted store and keys."""
        out = []
        for p in self.root.rglob("*"):
            if p.is_file() and p.suffix not in (".enc", ".key") and p.name != "token-keys.json":
                out.append(p.read_bytes())
        return b"\n".join(out)


def run_as(d: Daemon, uid: int, gid: int, fn: Any) -> Any:
    """Run fn(d) in a forked child that has dropped to ``uid``/``gid`` (no supplementary
    groups); return its JSON result (``{"child_error": ...}`` if it raised). The default
    user tokens are minted first, while the issuer key is still readable."""
    for server in ("content-api", "analytics-db"):
        d.user_token(server)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.write(w, json.dumps(fn(d)).encode())
        except BaseException as exc:
            os.write(w, json.dumps({"child_error": repr(exc)}).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def http_mcp_server(cmd: list[str], *, port: int, env: dict[str, str], log_path: Path,
                    what: str = "the MCP server", start_timeout_s: float = 30.0) -> Any:
    """Run ``cmd`` (an MCP server listening on loopback ``port``, output to ``log_path``),
    yield its streamable-HTTP URL once the port accepts, stop it (SIGTERM, then SIGKILL
    after 10 s) on the way out."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"{what} did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
