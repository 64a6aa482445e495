"""Issue 14, item 4: the client an MCP server installs is light.

``pip install sidekey`` is the client (``sidekey.client``; with the ``mcp`` extra,
``sidekey.mcp``): three small distributions, none of the daemon's backends, state stores,
HTTP parser or crypto. The daemon and the ``sidekey`` command need ``sidekey[daemon]``.
These tests check the declared dependencies against what the client modules import,
run the client against a real daemon with every daemon dependency made unimportable,
install the package without extras into a fresh venv (from the package index, like a
server author would), and check the client logs nothing on a successful call.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from harness import Daemon
from sidekey.client import Client
from sidekey.launch import DAEMON_MODULES

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Distribution name -> the top-level module it provides (where they differ).
MODULE_OF = {"pyyaml": "yaml", "pyjwt": "jwt", "redis": "redis"}
# sidekey.mcp also imports what the MCP SDK itself depends on and installs.
SDK_MODULES = {"mcp", "mcp_types", "pydantic", "pydantic_core"}
# Imported by the async client only when its caller already runs under trio (so trio is
# there): not a dependency of the client.
CALLERS_OWN = {"trio"}


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower()


def _modules(requirements: list[str]) -> set[str]:
    names = {_dist_name(r) for r in requirements}
    return {MODULE_OF.get(n, n) for n in names}


def _third_party_imports(path: Path) -> set[str]:
    """Top-level modules ``path`` imports anywhere (also inside functions), stdlib and
    relative imports left out."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.partition(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "sidekey"}


def test_the_base_install_is_the_client_and_the_daemon_is_an_extra() -> None:
    base = _modules(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert base == {"anyio", "h11", "msgspec"}, base
    daemon = _modules(extras["daemon"])
    assert {"boto3", "hvac", "redis", "trio", "httptools", "cryptography"} <= daemon
    assert daemon == DAEMON_MODULES - {"botocore"}, "sidekey.launch names what the extra holds"
    # the test environment installs the daemon (the same list, repeated)
    assert {_dist_name(r) for r in extras["daemon"]} <= {_dist_name(r) for r in extras["test"]}
    assert _modules(extras["mcp"]) == {"mcp", "httpx"}  # httpx: Lease.http_client()


def test_every_import_of_the_client_modules_is_declared() -> None:
    base = _modules(PYPROJECT["project"]["dependencies"])
    client = _third_party_imports(SRC / "sidekey" / "client.py") - CALLERS_OWN
    assert client <= base, f"sidekey.client imports undeclared {sorted(client - base)}"
    for path in sorted((SRC / "sidekey" / "mcp").glob("*.py")):
        used = _third_party_imports(path)
        assert used <= base | SDK_MODULES, f"{path.name} imports {sorted(used - base - SDK_MODULES)}"
    # the launcher must import without anything
    assert _third_party_imports(SRC / "sidekey" / "launch.py") == set()


_BLOCK = """
import sys
DAEMON = set(sys.argv[1].split(","))
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in DAEMON:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


def _run_blocked(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-c", _BLOCK + code, ",".join(sorted(DAEMON_MODULES)), *args],
        capture_output=True, text=True, timeout=120, env=env)


def test_the_client_governs_a_call_without_any_daemon_dependency(daemon: Daemon) -> None:
    token = daemon.user_token("content-api")
    code = """
from sidekey.client import Client
with Client(socket_path=sys.argv[2]) as c:
    with c.tool_call("content-api", "create_article", user_token=sys.argv[3],
                     agent_id="content-writer", arguments={"title": "t"}) as lease:
        assert lease.secrets["CONTENT_API_KEY"]
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in DAEMON)
print("LOADED", loaded)
"""
    out = _run_blocked(code, daemon.socket, token)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout


def test_the_command_without_the_daemon_extra_names_it() -> None:
    out = _run_blocked("from sidekey.launch import main\n"
                       "sys.argv = ['sidekey', 'keygen', 'local', '--out', '/nonexistent/k']\n"
                       "sys.exit(main())")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "pip install 'sidekey[daemon]'" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_successful_call_logs_nothing(daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    token = daemon.user_token("content-api")
    with caplog.at_level(logging.DEBUG), Client(socket_path=daemon.socket) as client:
        for _ in range(3):
            with client.tool_call("content-api", "create_article", user_token=token,
                                  agent_id="content-writer", arguments={"title": "t"}):
                pass
    assert [r for r in caplog.records if r.name.startswith(("sidekey", "h11", "anyio"))] == []


def _pip_install_client(venv: Path, tmp: Path) -> Path:
    """A fresh venv with sidekey installed without extras, from the wheel a release
    would ship (tests/dist_build.py: built once per test process from a copy of the
    checkout, so the checkout gets no build/ directory)."""
    from dist_build import build_dists

    wheel = build_dists().wheel
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120,
                   capture_output=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True,
                   timeout=600, capture_output=True)
    return python


def test_pip_install_sidekey_is_the_client_only(tmp_path: Path, daemon: Daemon) -> None:
    venv = tmp_path / "venv"
    try:
        python = _pip_install_client(venv, tmp_path)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot pip install the client into a fresh venv: {exc} {detail[-2000:]!r}")
        pytest.skip(f"cannot pip install into a fresh venv here (no package index?): {exc}")
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True, timeout=120).stdout
    installed = {line.split("==")[0].lower() for line in listed.splitlines() if line}
    for daemon_dist in ("boto3", "botocore", "hvac", "redis", "trio", "httptools",
                        "cryptography", "pyjwt", "httpx", "psutil", "pyyaml"):
        assert daemon_dist not in installed, f"{daemon_dist} installed with the client"
    assert {"sidekey", "anyio", "h11", "msgspec"} <= installed, installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    health = subprocess.run(
        [str(python), "-c",
         "import sys; from sidekey.client import Client\n"
         "with Client(socket_path=sys.argv[1]) as c: print('HEALTH', c.health()['status'])",
         daemon.socket], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert health.returncode == 0 and "HEALTH" in health.stdout, health.stderr
    serve = subprocess.run([str(venv / "bin" / "sidekey"), "serve", "--config", "/nonexistent"],
                           capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert serve.returncode == 2, (serve.stdout, serve.stderr)
    assert "pip install 'sidekey[daemon]'" in serve.stderr
