"""docs/host-install.md, followed step by step in a throwaway root.

The root stands for a bare Debian host: merged /usr, systemd's own units (copied from
this machine, as a Debian host has them) and /bin/kill. Into it go, as the guide says:
the venv at /opt/sidekey with the wheel ``python -m build`` made, the sysusers.d and
tmpfiles.d files (applied with ``--root``), the units, the example drop-ins and the
production config. Then ``systemd-analyze verify --root`` must pass, ``systemd-analyze
security --offline=true --root`` must score at most 1.5, ``sidekey check-config``
(the installed executable) must accept the installed config, and the installed
executable must serve on a socket handed over by socket activation with its keys
taken from ``$CREDENTIALS_DIRECTORY``, as LoadCredentialEncrypted= provides them.

Two deviations from the guide, both because systemd is not PID 1 here: the daemon's
dependencies are not downloaded again into the root's venv (a .pth file lends it this
interpreter's site-packages; the wheel itself is installed with pip as the guide says),
and the credentials are plain files in a directory instead of ``systemd-creds
encrypt`` output (encrypting needs the host's credential key, which a test must not
create on this machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import yaml

from dist_build import build_dists
from harness import UnixHTTPConnection
from missing_binary import require_binary

MAX_EXPOSURE = 1.5
STEP_TIMEOUT_S = 120


def _run(*cmd: str | Path, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                         timeout=STEP_TIMEOUT_S, check=False, env=env)
    if ok:
        assert out.returncode == 0, f"{cmd}: {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def _bare_debian_root(root: Path) -> None:
    """A merged-/usr tree with what a Debian host's systemd brings: its unit files and kill."""
    for d in ("usr/bin", "usr/sbin", "usr/lib/systemd", "etc/systemd/system", "var/lib", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib"):
        (root / link).symlink_to(f"usr/{link}")
    system_units = Path("/usr/lib/systemd/system")
    assert system_units.is_dir(), "this machine has no systemd unit directory"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    shutil.copy2("/usr/bin/kill", root / "usr/bin/kill")


def _install_venv(root: Path, wheel: Path) -> Path:
    """Guide step 2: python3 -m venv /opt/sidekey && pip install '<wheel>[daemon]'."""
    venv = root / "opt/sidekey"
    _run(sys.executable, "-m", "venv", venv)
    _run(venv / "bin/pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
         "-q", wheel)
    # The daemon extra's dependencies: lent from this interpreter (see the module docstring).
    purelib = Path(_run(venv / "bin/python", "-c",
                        "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    lend = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "zz-lend-test-deps.pth").write_text("".join(f"{p}\n" for p in sorted(lend)))
    return venv


def _exposure(output: str) -> float:
    found = re.findall(r"Overall exposure level for \S+: (\d+\.\d+)", output)
    assert len(found) == 1, output
    return float(found[0])


def test_host_install_follows_the_guide(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze", "apt-get install systemd")
    sysusers = require_binary("systemd-sysusers", "apt-get install systemd")
    tmpfiles = require_binary("systemd-tmpfiles", "apt-get install systemd")
    activate = require_binary("systemd-socket-activate", "apt-get install systemd")
    root = tmp_path / "root"
    _bare_debian_root(root)

    # Step 2: the executable, in a venv under /opt/sidekey; the host files come with it.
    venv = _install_venv(root, build_dists().wheel)
    sidekey = venv / "bin/sidekey"
    version = _run(sidekey, "--version").stdout
    assert re.fullmatch(r"sidekey \S+ \(installed from sidekey-\S+\.whl; CPython 3\.\d+\.\d+\)\n",
                        version), version
    share = venv / "share/sidekey"

    # Step 3: user, groups, directories, units.
    (root / "usr/lib/sysusers.d").mkdir(parents=True, exist_ok=True)
    (root / "usr/lib/tmpfiles.d").mkdir(parents=True, exist_ok=True)
    shutil.copy(share / "systemd/sidekey.sysusers", root / "usr/lib/sysusers.d/sidekey.conf")
    _run(sysusers, f"--root={root}", "sidekey.conf")
    shutil.copy(share / "systemd/sidekey.tmpfiles", root / "usr/lib/tmpfiles.d/sidekey.conf")
    _run(tmpfiles, f"--root={root}", "--create", "sidekey.conf")
    passwd = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc/passwd").read_text().splitlines()}
    groups = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc/group").read_text().splitlines()}
    assert "sidekey" in passwd and passwd["sidekey"][6] == "/usr/sbin/nologin", passwd
    assert {"sidekey", "sidekey-clients"} <= set(groups), groups
    uid, gid = int(passwd["sidekey"][2]), int(groups["sidekey"][2])
    etc = (root / "etc/sidekey").stat()
    assert (stat.S_IMODE(etc.st_mode), etc.st_uid, etc.st_gid) == (0o750, 0, gid)
    state = (root / "var/lib/sidekey").stat()
    assert (stat.S_IMODE(state.st_mode), state.st_uid, state.st_gid) == (0o700, uid, gid)
    units = root / "etc/systemd/system"
    for name in ("sidekey.service", "sidekey.socket"):
        shutil.copy(share / "systemd" / name, units / name)
    (units / "sidekey.service.d").mkdir()

    # Step 4: the configuration, checked by the installed executable.
    for f in (share / "examples/host").glob("*.yaml"):
        shutil.copy(f, root / "etc/sidekey" / f.name)
        (root / "etc/sidekey" / f.name).chmod(0o640)
    config = root / "etc/sidekey/sidekey.yaml"
    checked = _run(sidekey, "check-config", "-c", config, "--json")
    summary = json.loads(checked.stdout)
    assert summary["secrets_mapped"] > 0 and set(summary["backends"]) == {"vault", "local"}

    # Steps 5 and 6: the credentials and network drop-ins.
    for name in ("credentials.conf", "network.conf"):
        shutil.copy(share / "examples/host" / name, units / "sidekey.service.d" / name)

    # Step 7: verify, and the sandbox's score.
    verify = _run(analyze, "verify", f"--root={root}", "sidekey.socket", "sidekey.service", ok=False)
    assert verify.returncode == 0 and "sidekey" not in verify.stderr, verify.stderr
    security = _run(analyze, "security", "--offline=true", f"--root={root}", "sidekey.service",
                    ok=False)
    exposure = _exposure(security.stdout)
    print(f"systemd-analyze security: overall exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, security.stdout
    # The unit runs what step 2 installed, with the keys of step 5.
    service = (units / "sidekey.service").read_text()
    assert "\nExecStart=/opt/sidekey/bin/sidekey serve --config /etc/sidekey/sidekey.yaml\n" in service
    assert "\nLoadCredentialEncrypted=local-key:/etc/sidekey/local-key.cred\n" in service
    assert "\nWatchdogSec=" in service and "\nType=notify\n" in service

    # And the verify really looks at the installed tree: without the executable it fails.
    sidekey.rename(sidekey.with_name("sidekey.moved"))
    broken = _run(analyze, "verify", f"--root={root}", "sidekey.service", ok=False)
    assert broken.returncode != 0 and "/opt/sidekey/bin/sidekey" in broken.stderr, broken.stderr
    sidekey.with_name("sidekey.moved").rename(sidekey)

    _serve_installed(tmp_path, sidekey, config, activate)


def _serve_installed(tmp_path: Path, sidekey: Path, config: Path, activate: str) -> None:
    """The installed executable, socket-activated, its keys from $CREDENTIALS_DIRECTORY.

    The production config names Vault and Redis, which are not here: the same config
    with its state in SQLite and every secret in the local store (still keyed by the
    local-key credential), its peers this uid, its audit checkpoints signed with the
    audit-key credential."""
    run = Path(tempfile_short())
    try:
        creds = run / "creds"
        creds.mkdir(mode=0o700)
        _run(sidekey, "keygen", "local", "--out", creds / "local-key")
        _run(sidekey, "keygen", "audit", "--out", creds / "audit-key")
        cfg = yaml.safe_load(config.read_text())
        cfg["state"] = {"dir": str(run / "state")}
        cfg["listen"]["socket"] = str(run / "unused.sock")
        cfg["backends"] = {"local": {**cfg["backends"]["local"], "path": str(run / "state/secrets.enc")}}
        cfg["secrets"] = {srv: {tool: {k: {"backend": "local", "name": f"{srv}/{k}"} for k in refs}
                                for tool, refs in tools.items()}
                          for srv, tools in cfg["secrets"].items()}
        cfg["peers"] = {srv: [{"uid": "self"}] for srv in cfg["peers"]}
        cfg["audit"]["sinks"] = [{"type": "file"}]
        cfg["policy"] = {"registry_health_checks": False}
        local_cfg = config.with_name("local.yaml")
        local_cfg.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds)}
        _run(sidekey, "secrets", "put", "-c", local_cfg, "content-api/CONTENT_API_KEY",
             "--from-file", creds / "audit-key.pub", env=env)

        sock_path = run / "sidekey.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(run / "notify"))
        notify.settimeout(20)
        log = (run / "daemon.log").open("wb")
        proc = subprocess.Popen(
            [activate, "-l", str(sock_path), "-E", f"NOTIFY_SOCKET={run / 'notify'}",
             "-E", f"CREDENTIALS_DIRECTORY={creds}", "-E", "WATCHDOG_USEC=2000000",
             str(sidekey), "serve", "--config", str(local_cfg)],
            stdout=log, stderr=log)
        log.close()
        try:
            deadline = time.monotonic() + 20
            while not sock_path.exists():
                assert time.monotonic() < deadline and proc.poll() is None, \
                    (run / "daemon.log").read_text()
                time.sleep(0.05)
            conn = UnixHTTPConnection(str(sock_path), timeout=20)
            conn.request("GET", "/v1/health")
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            assert resp.status == 200, (body, (run / "daemon.log").read_text())
            got = [notify.recv(4096)]
            while b"WATCHDOG=1" not in got:
                got.append(notify.recv(4096))
            assert got[0] == b"READY=1", got
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, (run / "daemon.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            notify.close()
        events = [json.loads(ln) for ln in (run / "state/audit.jsonl").read_text().splitlines()]
        started = next(e for e in events if e.get("event_type") == "daemon.started")
        assert started["socket"] == str(sock_path)
        # The checkpoint key came from the credential directory: checkpoints are signed.
        assert any(e.get("event_type") == "audit.checkpoint" for e in events), \
            [e.get("event_type") for e in events]
    finally:
        shutil.rmtree(run, ignore_errors=True)


def tempfile_short() -> str:
    """A short directory for AF_UNIX paths (at most 107 bytes; pytest's tmp_path may be longer)."""
    import tempfile

    return tempfile.mkdtemp(prefix="sk-host-")


@pytest.fixture(autouse=True)
def _installed_code_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # The root's venv must not pick up this checkout's source through PYTHONPATH: the
    # installed wheel is what is under test.
    monkeypatch.delenv("PYTHONPATH", raising=False)
