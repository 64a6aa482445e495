"""Packaging: ``python -m build`` makes an sdist and a wheel that carry the license, the
systemd files and the examples (and nothing a local run left beside them); the test
command says loudly what it could not run."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

from dist_build import PLANTED, REPO, build_dists

SYSTEMD_FILES = ["sidekey.service", "sidekey.socket", "sidekey.sysusers", "sidekey.tmpfiles"]
EXAMPLES = ["host/sidekey.yaml", "host/credentials.conf", "host/network.conf",
            "quickstart/sidekey.yaml", "quickstart/run.sh", "vault/sidekey-policy.hcl",
            "kubernetes/pod.yaml", "mcp-content-api/server.py"]


def test_sdist_and_wheel_carry_license_systemd_and_examples() -> None:
    dists = build_dists()
    license_text = (REPO / "LICENSE").read_bytes()
    assert b"Apache License" in license_text and b"Version 2.0, January 2004" in license_text
    assert b"END OF TERMS AND CONDITIONS" in license_text

    with tarfile.open(dists.sdist) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        members = {n.removeprefix(top + "/") for n in names}
        sdist_license = tar.extractfile(f"{top}/LICENSE")
        assert sdist_license is not None and sdist_license.read() == license_text
    for needed in ["LICENSE", "pyproject.toml", "README.md", "src/sidekey/__init__.py",
                   *(f"systemd/{f}" for f in SYSTEMD_FILES),
                   *(f"examples/{f}" for f in EXAMPLES)]:
        assert needed in members, (needed, sorted(members))

    with zipfile.ZipFile(dists.wheel) as whl:
        wnames = set(whl.namelist())
        info = next(n.split("/")[0] for n in wnames if n.endswith(".dist-info/METADATA"))
        data = info.replace(".dist-info", ".data")
        assert whl.read(f"{info}/licenses/LICENSE") == license_text
        meta = Parser().parsestr(whl.read(f"{info}/METADATA").decode())
    # PEP 639: an SPDX expression, the file named; no legacy License: field beside it.
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert "Typing :: Typed" in meta.get_all("Classifier")
    # The host install's files, at <venv>/share/sidekey/ once installed (docs/host-install.md).
    for needed in [*(f"{data}/data/share/sidekey/systemd/{f}" for f in SYSTEMD_FILES),
                   *(f"{data}/data/share/sidekey/examples/{f}" for f in EXAMPLES),
                   f"{data}/data/share/doc/sidekey/host-install.md"]:
        assert needed in wnames, (needed, sorted(wnames))

    # Keys and state a local quickstart run leaves beside the examples never ship.
    for planted in PLANTED:
        name = Path(planted).name
        assert not any(m.endswith("/" + name) or m == planted for m in members), planted
        assert not any(n.endswith("/" + name) for n in wnames), planted


def test_missing_programs_are_reported_loudly(tmp_path: Path) -> None:
    """The README's test command on a machine without systemd's tools: the skipped tests
    are named at the end of the run with the install command; with CI set they fail."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(tmp_path)  # nothing there: systemd-analyze & co are "not installed"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
           str(REPO / "tests" / "test_systemd.py"), "-k", "shipped_units or socket_activation"]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 TESTS DID NOT RUN: PROGRAMS MISSING ON THIS MACHINE" in out.stdout, out.stdout
    assert "systemd-analyze: 1 tests skipped: test_systemd.py (1)" in out.stdout, out.stdout
    assert "systemd-socket-activate: 1 tests skipped" in out.stdout, out.stdout
    assert "install: apt-get install systemd" in out.stdout, out.stdout

    out = subprocess.run(cmd, env={**env, "CI": "true"}, cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "2 failed" in out.stdout and "CI is set: not skipping" in out.stdout, out.stdout


def test_version_names_the_copy_and_python() -> None:
    out = subprocess.run([sys.executable, "-m", "sidekey", "--version"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    import sidekey

    line = out.stdout.strip()
    assert line.startswith(f"sidekey {sidekey.__version__} ("), line
    assert f"{sys.version_info.major}.{sys.version_info.minor}." in line, line
