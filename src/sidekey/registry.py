"""Central-registry verdict for one server. Pure: no I/O, today's date is passed in.

The central registry (``central-registry.yaml``, section ``registry:``) lists the MCP
servers an organisation runs, with a lifecycle ``status`` and an optional version pin.
:func:`evaluate` turns one entry into a :class:`RegistryVerdict` that the policy chain
(:mod:`sidekey.policy`) applies as its registry step:

- a registry that lists servers is authoritative: a server missing from it is denied
  (``server_not_registered``); an empty registry (no ``servers:``) checks nothing;
- ``active`` servers pass; ``deprecated`` servers pass with a warning until their
  ``deprecation_date`` and are denied from that date on (``server_deprecated``);
  ``retired`` servers are denied (``server_retired``); messages name the date and the
  ``replacement`` so the caller knows where to move;
- a pinned ``version`` denies a server reporting another one (``version_mismatch``);
  with ``require_version`` a pinned server that reports no version is denied too.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from .config import RegistryEntry

SERVER_NOT_REGISTERED = "server_not_registered"
SERVER_DEPRECATED = "server_deprecated"
SERVER_RETIRED = "server_retired"
VERSION_MISMATCH = "version_mismatch"


@dataclass(frozen=True, slots=True)
class RegistryVerdict:
    """The registry step's outcome.

    ``rule`` names the registry rule that applied (``registry.active:<server>``,
    ``registry.deprecated:<server>``, ...), whether it passed or denied. On a denial
    ``code`` and ``message`` are set; ``warnings`` are for the caller even when ``ok``.
    """

    ok: bool
    rule: str
    code: str | None = None
    message: str | None = None
    warnings: tuple[str, ...] = ()


def _move_to(entry: RegistryEntry) -> str:
    """The "what to do instead" half of a message."""
    if entry.replacement:
        return f'use "{entry.replacement}"'
    if entry.owner:
        return f'no replacement is listed; ask its owner "{entry.owner}"'
    return "no replacement is listed"


def _deny(rule: str, code: str, message: str, warnings: tuple[str, ...] = ()) -> RegistryVerdict:
    return RegistryVerdict(ok=False, rule=rule, code=code, message=message, warnings=warnings)


def evaluate(
    entry: RegistryEntry | None,
    *,
    server: str,
    registry_listed: bool,
    today: datetime.date,
    server_version: str | None,
    require_version: bool,
) -> RegistryVerdict:
    """Judge ``server`` against its central-registry ``entry``.

    ``registry_listed`` says whether the registry lists any server at all (if it does,
    a missing entry is a denial). ``today`` is the caller's date (UTC in the daemon);
    a deprecated server stops working *on* its ``deprecation_date``. ``server_version``
    is what the calling server reported; ``require_version`` makes reporting one
    mandatory for servers whose entry pins a version.

    Returns a verdict; never raises for a policy outcome.
    """
    if entry is None:
        if registry_listed:
            return _deny(
                f"registry.unlisted:{server}",
                SERVER_NOT_REGISTERED,
                f'server "{server}" is not listed in the central registry; '
                "add it to registry.servers before it can be used",
            )
        return RegistryVerdict(ok=True, rule=f"registry.unlisted:{server}")

    warnings: tuple[str, ...] = ()
    if entry.status == "retired":
        return _deny(
            f"registry.retired:{server}",
            SERVER_RETIRED,
            f'server "{server}" is retired; {_move_to(entry)}',
        )
    if entry.status == "deprecated":
        rule = f"registry.deprecated:{server}"
        date = entry.deprecation_date
        if date is not None and today >= date:
            return _deny(
                rule,
                SERVER_DEPRECATED,
                f'server "{server}" was deprecated on {date.isoformat()}; {_move_to(entry)}',
            )
        if date is not None:
            warnings = (
                f'server "{server}" is deprecated and stops working on {date.isoformat()}; '
                f"{_move_to(entry)}",
            )
        else:
            warnings = (f'server "{server}" is deprecated (no end date set); {_move_to(entry)}',)
    else:
        rule = f"registry.active:{server}"

    pinned = entry.version
    if pinned is not None:
        if server_version is None:
            if require_version:
                return _deny(
                    f"registry.version:{server}",
                    VERSION_MISMATCH,
                    f'server "{server}" did not send server_version; the central registry '
                    f"pins version {pinned}: send server_version with every authorize call",
                    warnings,
                )
        elif server_version != pinned:
            return _deny(
                f"registry.version:{server}",
                VERSION_MISMATCH,
                f'server "{server}" reports version {server_version} but the central '
                f"registry pins {pinned}; deploy {pinned} or update the registry entry",
                warnings,
            )
    return RegistryVerdict(ok=True, rule=rule, warnings=warnings)
