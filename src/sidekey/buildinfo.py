"""What ``sidekey --version`` prints: the version and where this copy came from.

Standard library only: ``sidekey --version`` answers even where only the client is
installed (``pip install sidekey`` without the ``daemon`` extra).

The "build" is what pip recorded when it installed this copy (PEP 610
``direct_url.json``): the wheel or directory it came from, an editable checkout, or a
package index. No git revision is stamped into the package at build time: a wheel built
from an sdist has no git to ask, and a stamp that is only sometimes there would be a
guess. The Python it runs on is part of the line (the daemon's behaviour depends on it).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path
from urllib.parse import unquote, urlparse

from . import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


def origin() -> str:
    """Where the running copy of the package comes from, in a few words."""
    try:
        dist = importlib.metadata.distribution("sidekey")
    except importlib.metadata.PackageNotFoundError:
        return f"not installed: {PACKAGE_DIR.parent}"
    try:
        info = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        info = {}
    url = str(info.get("url", "")) if isinstance(info, dict) else ""
    where = Path(unquote(urlparse(url).path)) if url.startswith("file:") else None
    if isinstance(info, dict) and isinstance(info.get("dir_info"), dict) \
            and info["dir_info"].get("editable"):
        if where is not None and PACKAGE_DIR.is_relative_to(where.resolve()):
            return f"editable install of {where}"
    elif PACKAGE_DIR.is_relative_to(Path(str(dist.locate_file(""))).resolve()):
        if where is not None:
            return f"installed from {where.name}"
        return f"installed from {url}" if url else "installed from a package index"
    # The importable package is not the installed distribution's (PYTHONPATH, a checkout).
    return f"source tree {PACKAGE_DIR.parent}"


def version_line() -> str:
    """``sidekey 0.1.0 (installed from sidekey-0.1.0-py3-none-any.whl; CPython 3.11.2)``."""
    return (f"sidekey {__version__} ({origin()}; "
            f"{platform.python_implementation()} {platform.python_version()})")
