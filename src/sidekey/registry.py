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

A server that only the registry knows (not declared under ``servers:`` on this host)
cannot be called here; :func:`undeclared` still answers with what the registry says about
it (``server_deprecated`` / ``server_retired`` with the date and the replacement), so a
caller still pointed at a phased-out server learns where to move instead of a bare
``server_unknown``.

:func:`listing` and :func:`select` answer the inventory question ("which MCP servers are
deployed, who owns them, when were they last reviewed?") for ``sidekey registry list``
and ``GET /v1/registry``: one :class:`RegistryRow` per server the registry lists or this
host declares.
"""

from __future__ import annotations

import datetime
import urllib.parse
from dataclasses import dataclass

from .config import Config, RegistryEntry
from .protocol import BadRequest

SERVER_NOT_REGISTERED = "server_not_registered"
SERVER_DEPRECATED = "server_deprecated"
SERVER_RETIRED = "server_retired"
VERSION_MISMATCH = "version_mismatch"
SERVER_UNKNOWN = "server_unknown"

# Bounds of the listing's filters (query parameters of GET /v1/registry).
MAX_STALE_DAYS = 36_500  # a century: anything larger is a typo
MAX_OWNER_CHARS = 128


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


def move_details(entry: RegistryEntry | None) -> dict[str, str]:
    """Machine-readable facts for a registry denial's error body: the entry's
    ``deprecation_date`` and ``replacement`` when it has them."""
    if entry is None:
        return {}
    out: dict[str, str] = {}
    if entry.deprecation_date is not None:
        out["deprecation_date"] = entry.deprecation_date.isoformat()
    if entry.replacement:
        out["replacement"] = entry.replacement
    return out


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


def undeclared(entry: RegistryEntry | None, *, server: str, today: datetime.date) -> RegistryVerdict:
    """The verdict for a call naming ``server`` that is not declared under ``servers:``
    on this host (always a denial: nothing here can serve it).

    If the central registry lists it as ``retired``, or as ``deprecated`` (whether or
    not its ``deprecation_date`` has passed: it is not deployed here either way), the
    registry's code and a message naming the date and the replacement; otherwise
    ``server_unknown``.
    """
    not_here = "and is not declared under servers: on this host"
    if entry is not None and entry.status == "retired":
        return _deny(f"registry.retired:{server}", SERVER_RETIRED,
                     f'server "{server}" is retired {not_here}; {_move_to(entry)}')
    if entry is not None and entry.status == "deprecated":
        date = entry.deprecation_date
        if date is None:
            when = "is deprecated (no end date set)"
        elif today >= date:
            when = f"was deprecated on {date.isoformat()}"
        else:
            when = f"is deprecated (it stops working on {date.isoformat()})"
        return _deny(f"registry.deprecated:{server}", SERVER_DEPRECATED,
                     f'server "{server}" {when} {not_here}; {_move_to(entry)}')
    return _deny(f"server.undeclared:{server}", SERVER_UNKNOWN,
                 f'server "{server}" is not declared under servers: in this host\'s config')


@dataclass(frozen=True, slots=True)
class RegistryRow:
    """One server of the inventory.

    ``declared``: under ``servers:`` on this host (deployed here); ``listed``: in the
    central registry. ``status`` is the registry's lifecycle status, ``"unregistered"``
    for a declared server a listing registry does not name (its calls are denied), or
    None when there is no registry at all. ``last_review`` is the registry's
    ``last_audit``. ``verdict`` is what the registry step answers a call today:
    ``"allow"``, ``"warn"`` (deprecated, still working) or the denial's code
    (a version pin is not judged: that depends on what the server reports).
    """

    server: str
    declared: bool
    listed: bool
    owner: str | None
    version: str | None
    status: str | None
    deprecation_date: datetime.date | None
    replacement: str | None
    last_review: datetime.date | None
    url: str | None
    verdict: str

    def review_age_days(self, today: datetime.date) -> int | None:
        """Days since the last review (None: never reviewed)."""
        return None if self.last_review is None else (today - self.last_review).days

    def is_stale(self, days: int, today: datetime.date) -> bool:
        """Last review more than ``days`` days before ``today``; a server never
        reviewed is always stale (it is the first one a review is due for)."""
        age = self.review_age_days(today)
        return age is None or age > days


def listing(cfg: Config, *, today: datetime.date) -> list[RegistryRow]:
    """Every server the central registry lists or this host declares, sorted by name."""
    entries = cfg.registry.servers
    listed = bool(entries)
    rows: list[RegistryRow] = []
    for name in sorted(set(entries) | set(cfg.servers)):
        entry = entries.get(name)
        declared = name in cfg.servers
        if declared:
            v = evaluate(entry, server=name, registry_listed=listed, today=today,
                         server_version=None, require_version=False)
            verdict = (v.code or "denied") if not v.ok else ("warn" if v.warnings else "allow")
        else:
            verdict = undeclared(entry, server=name, today=today).code or SERVER_UNKNOWN
        if entry is not None:
            status: str | None = entry.status
        else:
            status = "unregistered" if listed else None
        url = entry.url if entry is not None and entry.url else cfg.servers[name].url if declared else None
        rows.append(RegistryRow(
            server=name, declared=declared, listed=entry is not None,
            owner=entry.owner if entry else None, version=entry.version if entry else None,
            status=status, deprecation_date=entry.deprecation_date if entry else None,
            replacement=entry.replacement if entry else None,
            last_review=entry.last_audit if entry else None, url=url, verdict=verdict,
        ))
    return rows


def select(
    rows: list[RegistryRow], *, today: datetime.date, stale_days: int | None = None,
    owner: str | None = None,
) -> list[RegistryRow]:
    """The rows whose last review is older than ``stale_days`` days (never reviewed
    counts as stale), and whose owner is exactly ``owner``; None skips a filter."""
    return [
        r for r in rows
        if (stale_days is None or r.is_stale(stale_days, today))
        and (owner is None or r.owner == owner)
    ]


def row_record(row: RegistryRow, *, today: datetime.date,
               health: dict[str, object] | None) -> dict[str, object]:
    """One row as JSON (``GET /v1/registry`` and ``registry list --json``): dates as
    ISO-8601, ``review_age_days`` as of ``today``, and ``health``, the daemon's latest
    health check of the server (None: not checked, or no daemon asked)."""
    return {
        "server": row.server,
        "owner": row.owner,
        "version": row.version,
        "status": row.status,
        "deprecation_date": row.deprecation_date.isoformat() if row.deprecation_date else None,
        "replacement": row.replacement,
        "last_review": row.last_review.isoformat() if row.last_review else None,
        "review_age_days": row.review_age_days(today),
        "health": health,
        "declared": row.declared,
        "listed": row.listed,
        "verdict": row.verdict,
        "url": row.url,
    }


QUERY_PARAM_INVALID = "query_param_invalid"
QUERY_PARAM_UNKNOWN = "query_param_unknown"
QUERY_PARAMS = ("stale", "owner", "as_of")
MAX_QUERY_CHARS = 1024


@dataclass(frozen=True, slots=True)
class RegistryQuery:
    """The filters of a registry listing. ``as_of``: the date review ages are counted
    to (None: today, UTC, by the caller's clock)."""

    stale_days: int | None = None
    owner: str | None = None
    as_of: datetime.date | None = None


def _invalid(param: str, message: str) -> BadRequest:
    return BadRequest(f"{param}: {message}", code=QUERY_PARAM_INVALID, param=param)


def check_stale(value: str) -> int:
    """``stale``: whole days, 0..MAX_STALE_DAYS. Raises BadRequest (query_param_invalid)."""
    if not value.isascii() or not value.isdigit() or len(value) > 6:
        raise _invalid("stale", f"expected a whole number of days (0 to {MAX_STALE_DAYS})")
    days = int(value)
    if days > MAX_STALE_DAYS:
        raise _invalid("stale", f"at most {MAX_STALE_DAYS} days")
    return days


def check_owner(value: str) -> str:
    """``owner``: as the registry spells it, 1..MAX_OWNER_CHARS printable characters."""
    if not 0 < len(value) <= MAX_OWNER_CHARS or not value.isprintable() or value.strip() != value:
        raise _invalid("owner", f"expected an owner name as the registry spells it (1 to "
                                f"{MAX_OWNER_CHARS} printable characters, no surrounding spaces)")
    return value


def check_as_of(value: str) -> datetime.date:
    """``as_of``: a date, YYYY-MM-DD."""
    if len(value) != 10:
        raise _invalid("as_of", "expected a date as YYYY-MM-DD")
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise _invalid("as_of", "expected a date as YYYY-MM-DD") from None


def parse_query(query: str) -> RegistryQuery:
    """The filters of ``GET /v1/registry?stale=DAYS&owner=NAME&as_of=YYYY-MM-DD``.

    Raises :class:`BadRequest`: ``query_param_unknown`` for a parameter not among
    :data:`QUERY_PARAMS`, ``query_param_invalid`` for a bad or repeated value
    (``details.param`` names the parameter either way).
    """
    if len(query) > MAX_QUERY_CHARS:
        raise BadRequest(f"query longer than {MAX_QUERY_CHARS} characters",
                         code=QUERY_PARAM_INVALID, param=None)
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False,
                                       errors="strict", max_num_fields=len(QUERY_PARAMS) + 1)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the query string is malformed (too many parameters or not UTF-8)",
                         code=QUERY_PARAM_INVALID, param=None) from None
    seen: dict[str, str] = {}
    for name, value in pairs:
        if name not in QUERY_PARAMS:
            raise BadRequest(f"unknown query parameter {name[:40]!r} (known: "
                             f"{', '.join(QUERY_PARAMS)})", code=QUERY_PARAM_UNKNOWN,
                             param=name[:40])
        if name in seen:
            raise _invalid(name, "given more than once")
        seen[name] = value
    return RegistryQuery(
        stale_days=check_stale(seen["stale"]) if "stale" in seen else None,
        owner=check_owner(seen["owner"]) if "owner" in seen else None,
        as_of=check_as_of(seen["as_of"]) if "as_of" in seen else None,
    )
