"""Tests that need a program the machine lacks: skipped, and said so loudly.

The README's test command must not pass quietly on a fresh machine while the Redis,
systemd or namespace tests did not run. A test calls :func:`require_binary` (or
:func:`skip_missing`): with ``CI`` set a missing program fails the test; otherwise it is
skipped with a reason that starts with :data:`MISSING_PREFIX`, and
:func:`report` (conftest's ``pytest_terminal_summary``) ends the run with a banner naming
each missing program, how many tests it kept from running, and how to install it.
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, NoReturn

import pytest

MISSING_PREFIX = "missing binary: "
_SEP = " -- install: "


def skip_missing(name: str, install: str) -> NoReturn:
    """Skip the calling test because ``name`` is not installed (fail under ``CI``)."""
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed (CI is set: not skipping); install: {install}")
    pytest.skip(f"{MISSING_PREFIX}{name}{_SEP}{install}")


def require_binary(name: str, install: str, *, also: tuple[str, ...] = ()) -> str:
    """The path of program ``name`` (on PATH, else one of ``also``), or skip/fail."""
    found = shutil.which(name) or next((p for p in also if os.access(p, os.X_OK)), None)
    if found is None:
        skip_missing(name, install)
    return found


def _reason(report: Any) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return str(reason).removeprefix("Skipped: ")


def report(terminalreporter: Any) -> None:
    """The banner at the end of the run (nothing when no test lacked a program)."""
    missing: dict[tuple[str, str], list[str]] = defaultdict(list)
    for rep in terminalreporter.stats.get("skipped", []):
        reason = _reason(rep)
        if reason.startswith(MISSING_PREFIX):
            name, _, install = reason.removeprefix(MISSING_PREFIX).partition(_SEP)
            missing[(name, install)].append(Path(str(rep.nodeid).split("::")[0]).name)
    if not missing:
        return
    total = sum(len(v) for v in missing.values())
    terminalreporter.write_sep(
        "!", f"{total} TESTS DID NOT RUN: PROGRAMS MISSING ON THIS MACHINE", red=True, bold=True)
    for (name, install), files in sorted(missing.items()):
        counts = ", ".join(f"{f} ({files.count(f)})" for f in sorted(set(files)))
        terminalreporter.write_line(f"  {name}: {len(files)} tests skipped: {counts}",
                                    red=True, bold=True)
        terminalreporter.write_line(f"      install: {install}", red=True)
    terminalreporter.write_line(
        "  This run is not a full pass. With CI=true these tests fail instead of skipping.",
        red=True, bold=True)
