"""Build sidekey's sdist and wheel as a release would, once per test process.

``python -m build`` (PEP 517, isolated: it installs the build backend named in
pyproject.toml from the package index) runs on a copy of the checkout: the files git
tracks plus untracked, not-ignored ones (what a clean checkout of the commit would hold),
so a build never writes build/ or *.egg-info into the working tree and the test sees
what a release would ship. ``plant`` adds files to the copy first (e.g. a key a local
quickstart run left behind, which must never ship).
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 600  # the isolated build env is installed from the package index
# Left behind by examples/quickstart/run.sh and a local daemon: must not reach an sdist.
PLANTED = {
    "examples/quickstart/keys/local.key": b"0" * 32,
    "examples/quickstart/state/secrets.enc": b"not a real store",
    "examples/quickstart/keys/token-keys.json": b"{}",
}


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path
    log: str


_built: Dists | None = None


def checkout_files() -> list[str]:
    """The checkout's files as a clean clone of the current work would have them."""
    if (REPO / ".git").exists() and shutil.which("git"):
        out = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True, check=True, timeout=60,
        ).stdout.decode()
        return [f for f in out.split("\0") if f and (REPO / f).is_file()]
    skip = {".venv", "build", ".git", "__pycache__", ".pytest_cache", ".mypy_cache",
            ".ruff_cache", ".hypothesis"}
    return [str(p.relative_to(REPO)) for p in REPO.rglob("*")
            if p.is_file() and not skip.intersection(p.relative_to(REPO).parts)
            and not p.name.endswith(".egg-info")]


def build_dists() -> Dists:
    """The sdist and the wheel (built once per process, removed at exit)."""
    global _built
    if _built is not None:
        return _built
    work = Path(tempfile.mkdtemp(prefix="sk-dist-"))
    atexit.register(shutil.rmtree, work, True)
    src = work / "src"
    for rel in checkout_files():
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    for rel, data in PLANTED.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    out = work / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(src)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False,
    )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"python -m build failed ({proc.returncode}):\n{log[-4000:]}")
    sdists = sorted(out.glob("sidekey-*.tar.gz"))
    wheels = sorted(out.glob("sidekey-*-py3-none-any.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    _built = Dists(sdist=sdists[0], wheel=wheels[0], log=log)
    return _built
