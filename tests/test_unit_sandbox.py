"""The sandbox of systemd/sidekey.service keeps the daemon working.

systemd is not PID 1 here, so the unit cannot be started as such. The directives that
could break sidekey are reproduced with the same kernel mechanisms, around a real daemon
that attests a peer running under another uid by its executable:

- ``User=``/``Group=`` (a system user, not root), ``NoNewPrivileges=``,
  ``AmbientCapabilities=CAP_SYS_PTRACE`` and ``CapabilityBoundingSet=CAP_SYS_PTRACE``:
  ``setpriv``;
- ``ProtectProc=ptraceable`` and ``ProcSubset=pid``: a private mount namespace with /proc
  mounted ``hidepid=ptraceable,subset=pid``, as systemd mounts it;
- ``SystemCallFilter=@system-service`` minus ``@privileged @resources`` and
  ``MemoryDenyWriteExecute=``: the daemon runs under ``strace -f``, and every system call
  it made is checked against the sets ``systemd-analyze syscall-filter`` prints, every
  mmap/mprotect for a writable and executable mapping.

A control shows the emulation bites: without CAP_SYS_PTRACE, the peer of another uid is
invisible under hidepid and is not attested (the unit's comment: drop ProtectProc= with
the capability).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import sidekey
from harness import Daemon
from missing_binary import require_binary

NOBODY = 65534


def _syscall_set(analyze: str, *groups: str) -> set[str]:
    """The system calls of systemd's groups, nested groups expanded."""
    seen: set[str] = set()
    calls: set[str] = set()
    todo = list(groups)
    while todo:
        group = todo.pop()
        if group in seen:
            continue
        seen.add(group)
        out = subprocess.run([analyze, "syscall-filter", group], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        for line in out.splitlines()[1:]:
            item = line.strip()
            if not item or item.startswith("#"):
                continue
            if item.startswith("@"):
                todo.append(item)
            else:
                calls.add(item)
    return calls


def _python_for(uid: int, gid: int) -> str:
    """A Python of this minor version that ``uid`` can run (the test's own may live under
    /root, which a system user cannot enter): the daemon and the peer both run it."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (os.path.realpath(sys.executable), f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if not os.path.exists(exe):
            continue
        try:
            probe = subprocess.run([exe, "-c", "pass"], user=uid, group=gid, extra_groups=[],
                                   capture_output=True, timeout=60, check=False)
        except PermissionError:
            continue
        if probe.returncode == 0:
            return exe
    pytest.skip(f"no {version} that uid {uid} may run")


def _pythonpath() -> str:
    """This checkout's package and the test venv's dependencies, for that Python."""
    paths = [str(Path(sidekey.__file__).resolve().parents[1]),
             sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return os.pathsep.join(dict.fromkeys(paths))


def _daemon_user() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam("daemon")  # Debian's uid 1: a system user that is not root
    except KeyError:
        pytest.skip("no 'daemon' user on this machine")
    return pw.pw_uid, pw.pw_gid


def _sandboxed(make_daemon: Any, trace: Path, *, ptrace: bool) -> Daemon:
    strace = require_binary("strace", "apt-get install strace")
    setpriv = require_binary("setpriv", "apt-get install util-linux")
    unshare = require_binary("unshare", "apt-get install util-linux")
    if os.geteuid() != 0:
        pytest.skip("mounting /proc and changing uid need root")
    uid, gid = _daemon_user()
    python = _python_for(uid, gid)
    caps = "+sys_ptrace" if ptrace else ""
    prefix = [
        unshare, "--mount", "--propagation", "private", "sh", "-c",
        # ProtectProc=ptraceable, ProcSubset=pid
        'mount -t proc -o hidepid=ptraceable,subset=pid proc /proc && exec "$@"', "sh",
        setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs",
        f"--inh-caps=-all{',' + caps if caps else ''}",
        *([f"--ambient-caps={caps}"] if caps else []),
        f"--bounding-set=-all{',' + caps if caps else ''}",
        strace, "-f", "-qq", "-o", str(trace),
        # The harness appends "<its python> -m sidekey ...": run that on `python` instead.
        "env", f"PYTHONPATH={_pythonpath()}", "sh", "-c", f'shift; exec {python} "$@"', "sh",
    ]
    d: Daemon = make_daemon(command_prefix=prefix)
    # content-api: whatever runs that Python as nobody (a uid the daemon's is not).
    d.config["peers"] = {"content-api": [{"uid": NOBODY, "exe": python}],
                         "analytics-db": [{"uid": "self"}]}
    d.config_path.write_text(yaml.safe_dump(d.config))
    d.user_token("content-api")  # minted (and kept) while the issuer key is root's
    trace.parent.mkdir(parents=True, exist_ok=True)
    for path in [d.root, *d.root.rglob("*")]:
        os.lchown(path, uid, gid)
    os.chown(trace.parent, uid, gid)
    if ptrace:
        d.start()
        return d
    # Without the capability even the harness's own probe (root) is a hidden peer, so
    # wait for the daemon's "listening" line instead of a /v1/health answer.
    log = d.log_path.open("ab")
    d.proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "sidekey", "--log-level", "debug", "serve",
         "--config", str(d.config_path)], stdout=log, stderr=log, cwd=d.root)
    log.close()
    deadline = time.monotonic() + 30
    while "sidekey listening on" not in d.log():
        assert d.proc.poll() is None and time.monotonic() < deadline, d.log()
        time.sleep(0.05)
    return d


PEER = """
import http.client, json, socket, sys
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(sys.argv[1])
conn = Conn("sidekey", timeout=30)
conn.request("POST", "/v1/authorize", body=sys.stdin.read(),
             headers={"Content-Type": "application/json"})
try:
    resp = conn.getresponse()
except (ConnectionResetError, http.client.RemoteDisconnected):
    print(json.dumps([0, {"closed": "the daemon closed the connection unanswered"}]))
else:
    print(json.dumps([resp.status, json.loads(resp.read() or b"{}")]))
"""


def _authorize_as_nobody(d: Daemon) -> tuple[int, dict[str, Any]]:
    """content-api's authorize+redeem from a process of nobody running the peers' Python."""
    python = d.config["peers"]["content-api"][0]["exe"]
    body = {"server": "content-api", "tool": "create_article", "agent_id": "content-writer",
            "session_id": "s1", "arguments": {"title": "hello"}, "redeem": True,
            "user_token": d.user_token("content-api")}
    out = subprocess.run([python, "-c", PEER, d.socket], input=json.dumps(body), user=NOBODY,
                         group=NOBODY, extra_groups=[], capture_output=True, text=True,
                         timeout=60, check=False, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr + d.log()[-3000:]
    status, answer = json.loads(out.stdout)
    return int(status), answer


def _stop_traced(d: Daemon) -> int:
    """SIGTERM to the daemon itself (strace, the harness's process, does not pass it on);
    strace then exits with the daemon's status."""
    assert d.proc is not None
    children = Path(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    os.kill(int(children[0]), signal.SIGTERM)
    return d.proc.wait(30)


def test_the_daemon_works_inside_the_units_sandbox(make_daemon: Any, tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze", "apt-get install systemd")
    trace_dir = Path(f"/tmp/sk-trace-{os.getpid()}")
    d = _sandboxed(make_daemon, trace_dir / "trace", ptrace=True)
    try:
        st, body = _authorize_as_nobody(d)
        assert st == 200, (body, d.log())
        assert body["lease"]["secrets"]["CONTENT_API_KEY"] == d.secrets["content-api/write-key"]
        assert d.events_of("mcp.redeem"), d.log()
        assert d.request("GET", "/v1/health")[0] == 200
        assert _stop_traced(d) == 0, d.log()
        trace = (trace_dir / "trace").read_text()
    finally:
        d.kill()
        subprocess.run(["rm", "-rf", str(trace_dir)], check=False, timeout=60)
    python = d.config["peers"]["content-api"][0]["exe"]  # what the daemon ran, too
    start = trace.find(f'execve("{python}"')
    assert start >= 0, trace[:2000]
    lines = trace[start:].splitlines()[1:]
    used: set[str] = set()
    wx: list[str] = []
    for line in lines:
        m = re.match(r"\d+\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]", line)
        if m is None:
            continue
        name = m.group(1)
        used.add(name)
        if name in ("mmap", "mprotect", "pkey_mprotect") and "PROT_WRITE" in line \
                and "PROT_EXEC" in line:
            wx.append(line)
    allowed = _syscall_set(analyze, "@system-service")
    denied = _syscall_set(analyze, "@privileged", "@resources")
    assert used, lines[:50]
    # SystemCallFilter=@system-service, SystemCallFilter=~@privileged @resources
    assert used - allowed == set(), sorted(used - allowed)
    assert used & denied == set(), sorted(used & denied)
    # MemoryDenyWriteExecute=yes
    assert wx == [], wx[:5]
    print(f"sandboxed daemon: {len(used)} distinct system calls, all allowed by the unit")


def test_without_ptrace_a_peer_of_another_uid_is_hidden(make_daemon: Any) -> None:
    """The control: the same sandbox without CAP_SYS_PTRACE. hidepid hides nobody's
    process from the daemon, so it is not attested (a refusal with a code), which is why
    the unit pairs ProtectProc= with the capability."""
    trace_dir = Path(f"/tmp/sk-trace-{os.getpid()}-noptrace")
    d = _sandboxed(make_daemon, trace_dir / "trace", ptrace=False)
    try:
        st, body = _authorize_as_nobody(d)
        # The peer's /proc/<pid> does not exist for the daemon: to it the process is gone
        # before it could be attested, so the connection is closed unanswered (server.py)
        # and the refusal is audited.
        assert (st, body) == (0, {"closed": "the daemon closed the connection unanswered"}), body
        refused = [e for e in d.audit_events() if e.get("code") == "peer_gone"
                   or e.get("error", {}).get("code") == "peer_gone"]
        assert refused, [(e["event_type"], e.get("code")) for e in d.audit_events()]
        assert not d.events_of("mcp.redeem")
    finally:
        d.kill()
        subprocess.run(["rm", "-rf", str(trace_dir)], check=False, timeout=60)
