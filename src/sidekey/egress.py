"""Egress with injection: the decisions, without I/O (issue 16, item 1).

A secret of a tool may carry an ``egress:`` rule instead of being handed out. The MCP
server then sends its upstream HTTPS requests through the daemon's socket
(``<METHOD> /v1/egress/<lease_id>/<host>[:port]/<path>?<query>``); the daemon checks
the request against the rule, injects the credential and sends it itself
(:mod:`sidekey.daemon.egress`). This module holds what that needs and can be tested
without sockets: the rule's config shape and its load-time checks, parsing the egress
target, matching a request against the rules, the request headers passed upstream and
the response headers passed back, rendering the injected credential, the byte strings
that would reveal it (redacted from what flows back) and the audit entry of one
upstream request (no query values, no credential).
"""

from __future__ import annotations

import base64
import ipaddress
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

EGRESS_PREFIX = "/v1/egress/"
# Contract limits (not tunables).
MAX_TIMEOUT_S = 60.0
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024
MAX_RESPONSE_BYTES_CAP = 64 * 1024 * 1024
# Per lease: upstream requests in flight at once, and in all for one call.
MAX_IN_FLIGHT_PER_LEASE = 8
MAX_REQUESTS_PER_CALL = 256
# Entries of a call's audit record, and their JSON bytes (then only counted:
# egress_dropped). The bytes keep the mcp.tool_call event under its 16 KiB cap next to
# 8 KiB of arguments: an event over it would lose the whole list to a digest.
MAX_AUDIT_ENTRIES = 100
MAX_AUDIT_BYTES = 6 * 1024
MAX_QUERY_NAMES = 16  # parameter names kept per audit entry
MAX_AUDIT_PATH = 128
REDACTED = b"[REDACTED]"

HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
HeaderName = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")]
Template = Annotated[str, Meta(min_length=1, max_length=1024)]


class _E(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class EgressBasic(_E, frozen=True, kw_only=True):
    """HTTP basic authentication (RFC 7617): ``Authorization: Basic base64(user:password)``."""

    username: Template
    password: Template


class EgressQuery(_E, frozen=True, kw_only=True):
    """A query parameter added to the upstream URL (any parameter of that name the
    MCP server sent is removed first)."""

    name: Annotated[str, Meta(min_length=1, max_length=128)]
    value: Template


class EgressInject(_E, frozen=True, kw_only=True):
    """How the credential goes into the request: exactly one of ``header`` (with
    ``value``), ``basic`` or ``query``. Templates name the secret as ``{ALIAS}``."""

    header: HeaderName | None = None
    value: Template | None = None
    basic: EgressBasic | None = None
    query: EgressQuery | None = None


class EgressRule(_E, frozen=True, kw_only=True):
    """``secrets.<server>.<tool>.<ALIAS>.egress``: the secret is never handed out; the
    daemon sends the tool's upstream requests that match this rule with it injected."""

    hosts: Annotated[list[Annotated[str, Meta(min_length=1, max_length=262)]], Meta(min_length=1, max_length=64)]
    methods: Annotated[list[HttpMethod], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["GET", "HEAD"])
    # Path prefixes (string prefixes of the percent-decoded path; "/v1/" for a directory).
    paths: Annotated[list[Annotated[str, Meta(min_length=1, max_length=1024)]], Meta(max_length=64)] = []
    inject: EgressInject
    ca_file: str | None = None  # PEM bundle to verify the upstream with; default system CAs
    timeout_s: Annotated[float, Meta(gt=0, le=MAX_TIMEOUT_S)] = DEFAULT_TIMEOUT_S
    # Default: listen.max_body_bytes (the daemon reads no more than that anyway).
    max_request_bytes: Annotated[int, Meta(ge=0)] | None = None
    max_response_bytes: Annotated[int, Meta(gt=0, le=MAX_RESPONSE_BYTES_CAP)] = DEFAULT_MAX_RESPONSE_BYTES


# --------------------------------------------------------------------------- load-time checks

_TEMPLATE_FIELD = re.compile(r"\{([^{}]*)\}")
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# Headers the injected one may not be: framing, routing and the hop-by-hop set.
_NOT_INJECTABLE = frozenset((
    "host", "content-length", "content-type", "transfer-encoding", "connection", "keep-alive",
    "te", "trailer", "upgrade", "proxy-connection", "expect", "cookie"))


def parse_host(text: str) -> tuple[str, int]:
    """``host`` or ``host:port`` (``[v6]:port``) as (lower-case host, port; 443 if
    none). Raises ValueError: wildcards, schemes, paths, user info and bad ports."""
    if not text or any(c in text for c in "/@?#*\\ \t%") or "://" in text:
        raise ValueError("expected host or host:port (no scheme, path, user info or wildcard)")
    host, port = text, 443
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed [ in an IPv6 address")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("expected [v6]:port")
            port = _port(rest[1:])
        ipaddress.IPv6Address(host)  # raises ValueError
        return host.lower(), port
    if ":" in text:
        host, _, port_text = text.rpartition(":")
        port = _port(port_text)
    host = host.lower().rstrip(".")
    try:
        ipaddress.ip_address(host)
        return host, port
    except ValueError:
        pass
    labels = host.split(".")
    if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError("not a valid host name")
    return host, port


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError("the port must be 1-65535")
    return int(text)


def _template_problems(where: str, template: str, alias: str) -> list[str]:
    names = _TEMPLATE_FIELD.findall(template)
    bad = [n for n in names if n != alias]
    problems = [f"{where}: {{{n}}}: a template may name only its own secret, {{{alias}}}"
                for n in bad]
    stripped = _TEMPLATE_FIELD.sub("", template)
    if "{" in stripped or "}" in stripped:
        problems.append(f"{where}: unbalanced {{ or }}")
    return problems


def rule_problems(alias: str, rule: EgressRule, *, max_body_bytes: int) -> list[str]:
    """What is wrong with one secret's egress rule (``.<field>: problem`` each, to be
    appended to ``$.secrets.<server>.<tool>.<alias>.egress``)."""
    problems: list[str] = []
    for i, host in enumerate(rule.hosts):
        try:
            parse_host(host)
        except ValueError as exc:
            problems.append(f".hosts.{i}: {exc}")
    for i, path in enumerate(rule.paths):
        if not path.startswith("/"):
            problems.append(f".paths.{i}: a path prefix starts with /")
        elif _dot_segment(path):
            problems.append(f".paths.{i}: no . or .. segments")
    if len(set(rule.methods)) != len(rule.methods):
        problems.append(".methods: listed twice")
    inj = rule.inject
    forms = [f for f, given in (("header", inj.header is not None), ("basic", inj.basic is not None),
                                ("query", inj.query is not None)) if given]
    if len(forms) != 1:
        problems.append(".inject: set exactly one of header (with value), basic or query")
    if inj.header is not None:
        if inj.value is None:
            problems.append(f'.inject.value: header needs value (e.g. "Bearer {{{alias}}}")')
        if inj.header.lower() in _NOT_INJECTABLE or inj.header.lower().startswith("proxy-"):
            problems.append(f".inject.header: {inj.header} cannot carry a credential here")
    elif inj.value is not None:
        problems.append(".inject.value: only with header")
    templates: list[tuple[str, str]] = []
    if inj.value is not None:
        templates.append((".inject.value", inj.value))
    if inj.basic is not None:
        templates += [(".inject.basic.username", inj.basic.username),
                      (".inject.basic.password", inj.basic.password)]
        if ":" in inj.basic.username:
            problems.append(".inject.basic.username: a basic user name has no colon (RFC 7617)")
    if inj.query is not None:
        templates.append((".inject.query.value", inj.query.value))
    for where, template in templates:
        problems += _template_problems(where, template, alias)
    if templates and not any("{" + alias + "}" in t for _, t in templates):
        problems.append(f".inject: no template names the secret ({{{alias}}})")
    if rule.max_request_bytes is not None and rule.max_request_bytes > max_body_bytes:
        problems.append(f".max_request_bytes: more than listen.max_body_bytes ({max_body_bytes}), "
                        "which bounds every request the daemon reads")
    return problems


def tool_rule_problems(rules: Mapping[str, EgressRule]) -> list[str]:
    """Problems across one tool's egress secrets (``<alias>.egress: problem``): two
    rules naming the same host must verify it with the same CA bundle."""
    seen: dict[tuple[str, int], tuple[str, str | None]] = {}
    problems: list[str] = []
    for alias, rule in sorted(rules.items()):
        for host in rule.hosts:
            try:
                key = parse_host(host)
            except ValueError:
                continue  # reported by rule_problems
            other = seen.setdefault(key, (alias, rule.ca_file))
            if other[1] != rule.ca_file:
                problems.append(f"{alias}.egress.ca_file: {host} is verified with another "
                                f"ca_file by {other[0]}; one host, one CA bundle")
    return problems


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Target:
    """One egress request's destination, parsed from the daemon path."""

    lease_id: str
    host: str
    port: int
    raw_path: str  # as sent (percent-encoded), starts with "/"
    path: str  # percent-decoded, for matching
    query: str  # raw, without "?"

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 443 else f"{host}:{self.port}"


class BadTarget(ValueError):
    """The egress path is malformed (answered 400 egress_bad_target)."""


_LEASE_ID = re.compile(r"^lse_[A-Za-z0-9]{1,64}$")


def _dot_segment(decoded_path: str) -> bool:
    # "..;x" too: some servers (Tomcat, Spring) drop a segment's ;parameters first.
    return any(seg.partition(";")[0] in (".", "..") for seg in decoded_path.split("/"))


def parse_target(path: str, query: str) -> Target:
    """``/v1/egress/<lease_id>/<host>[:port]/<path>`` (and the raw query) as a
    :class:`Target`. Raises :class:`BadTarget`: a path that could mean something else
    upstream than what is matched here (dot segments, backslashes, encoded NUL or
    slash-like bytes, a fragment) is refused, not normalized."""
    if not path.startswith(EGRESS_PREFIX):
        raise BadTarget("not an egress path")
    lease_id, sep, rest = path[len(EGRESS_PREFIX):].partition("/")
    if not sep or not _LEASE_ID.match(lease_id):
        raise BadTarget("expected /v1/egress/<lease_id>/<host>[:port]/<path>")
    authority, slash, tail = rest.partition("/")
    try:
        host, port = parse_host(authority)
    except ValueError as exc:
        raise BadTarget(f"upstream host: {exc}") from None
    raw_path = "/" + tail if slash else "/"
    if "#" in raw_path or "#" in query:
        raise BadTarget("a fragment is never sent upstream")
    try:
        decoded = urllib.parse.unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise BadTarget("the path is not UTF-8 once percent-decoded") from None
    if "\\" in decoded or "\x00" in decoded or any(ord(c) < 0x20 or c == "\x7f" for c in decoded):
        raise BadTarget("backslash or control character in the path")
    if _dot_segment(decoded) or _dot_segment(raw_path):
        raise BadTarget("a . or .. path segment")
    if "?" in decoded or "%2f" in raw_path.lower():
        raise BadTarget("an encoded / or ? in the path")
    return Target(lease_id=lease_id, host=host, port=port, raw_path=raw_path, path=decoded,
                  query=query)


def rule_allows(rule: EgressRule, method: str, target: Target) -> bool:
    """Whether ``rule`` allows ``method`` to ``target`` (host and port exact, path a prefix)."""
    if method not in rule.methods:
        return False
    if not any(parse_host(h) == (target.host, target.port) for h in rule.hosts):
        return False
    return not rule.paths or any(target.path.startswith(p) for p in rule.paths)


def why_refused(rules: Mapping[str, EgressRule], method: str, target: Target) -> str:
    """A message for a refused request (which of host, method, path did not match)."""
    hosts = [r for r in rules.values()
             if any(parse_host(h) == (target.host, target.port) for h in r.hosts)]
    if not hosts:
        return f"host {target.authority} is not allowed for this tool"
    if not any(method in r.methods for r in hosts):
        return f"method {method} is not allowed to {target.authority} for this tool"
    return f"path is not allowed on {target.authority} for this tool"


# Request headers never passed upstream: hop-by-hop (RFC 9110 7.6.1), framing (httpx
# sets it for the body it sends), cookies (a session the upstream handed out would be a
# credential that outlives the call; none are passed either way) and proxy credentials.
_DROP_REQUEST = frozenset((
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authorization", "proxy-authenticate", "host", "content-length",
    "cookie", "expect", "accept-encoding"))
# Response headers never passed back: hop-by-hop and framing (the daemon frames its own
# answer; the body is decoded, so content-encoding goes too), cookies, and the names the
# daemon's answer carries itself.
_DROP_RESPONSE = frozenset((
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "content-length", "content-encoding",
    "content-type", "set-cookie", "set-cookie2", "x-request-id", "server", "cache-control"))
UPSTREAM_MARK = (b"sidekey-egress", b"upstream")


def upstream_request_headers(headers: Mapping[str, str], injected: Iterable[str]) -> list[tuple[str, str]]:
    """The MCP server's request headers as passed upstream: without the dropped set,
    any ``sidekey-*`` header, and any header of an injected name."""
    drop = {h.lower() for h in injected}
    return [(k, v) for k, v in headers.items()
            if k not in _DROP_REQUEST and k not in drop and not k.startswith("sidekey-")]


def render(template: str, alias: str, value: str) -> str:
    return template.replace("{" + alias + "}", value)


@dataclass(frozen=True, slots=True)
class Injection:
    """What one secret adds to a request: headers, a query parameter, and the byte
    strings that reveal it (redacted from what flows back)."""

    headers: tuple[tuple[str, str], ...]
    query: tuple[str, str] | None
    needles: tuple[bytes, ...]


def injection(alias: str, rule: EgressRule, value: str) -> Injection:
    """Render ``rule.inject`` with the secret ``value``. The needles: the value itself,
    as JSON and URL encode it, and each rendered credential (a header value, the
    base64 of basic auth), longest first."""
    inj = rule.inject
    raw = value.encode()
    needles = {raw, urllib.parse.quote(value, safe="").encode(),
               urllib.parse.quote_plus(value).encode(), msgspec.json.encode(value)[1:-1]}
    headers: tuple[tuple[str, str], ...] = ()
    query = None
    if inj.header is not None and inj.value is not None:
        rendered = render(inj.value, alias, value)
        headers = ((inj.header, rendered),)
        needles.add(rendered.encode())
    elif inj.basic is not None:
        user = render(inj.basic.username, alias, value)
        password = render(inj.basic.password, alias, value)
        blob = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers = (("authorization", "Basic " + blob),)
        needles.add(blob.encode())
    elif inj.query is not None:
        rendered = render(inj.query.value, alias, value)
        query = (inj.query.name, rendered)
        needles.add(urllib.parse.quote(rendered, safe="").encode())
    return Injection(headers=headers, query=query,
                     needles=tuple(sorted((n for n in needles if n), key=len, reverse=True)))


def upstream_query(raw_query: str, add: Sequence[tuple[str, str]]) -> str:
    """The raw query with ``add``'s parameters replacing any of the same name."""
    names = {name for name, _ in add}
    kept = [part for part in raw_query.split("&") if part
            and urllib.parse.unquote_plus(part.partition("=")[0]) not in names]
    kept += [f"{urllib.parse.quote(n, safe='')}={urllib.parse.quote(v, safe='')}" for n, v in add]
    return "&".join(kept)


def reveals(data: bytes, needles: Sequence[bytes]) -> bool:
    return any(n in data for n in needles)


def redact(data: bytes, needles: Sequence[bytes]) -> tuple[bytes, int]:
    """``data`` with every needle replaced by ``[REDACTED]``; and how many were."""
    count = 0
    for needle in needles:
        if needle in data:
            count += data.count(needle)
            data = data.replace(needle, REDACTED)
    return data, count


def response_headers(raw: Iterable[tuple[bytes, bytes]], needles: Sequence[bytes]
                     ) -> tuple[list[tuple[bytes, bytes]], bytes, int]:
    """The upstream's response headers as passed back: (headers, content type, how
    many were stripped because they reveal the credential). Dropped: see
    ``_DROP_RESPONSE``, any ``sidekey-*`` header (the daemon's mark is its own)."""
    out: list[tuple[bytes, bytes]] = []
    content_type = b"application/octet-stream"
    stripped = 0
    for name, value in raw:
        key = name.lower()
        if reveals(value, needles) or reveals(name, needles):
            stripped += 1
            continue
        if key == b"content-type":
            content_type = value
            continue
        if key.decode("latin-1") in _DROP_RESPONSE or key.startswith(b"sidekey-"):
            continue
        out.append((key, value))
    return out, content_type, stripped


def audit_entry(method: str, target: Target) -> dict[str, Any]:
    """An upstream request as the audit records it: the query's parameter names only
    (values may be data or credentials), never a value."""
    names: list[str] = []
    for part in target.query.split("&"):
        if part:
            name = urllib.parse.unquote_plus(part.partition("=")[0])[:32]
            if name not in names:
                names.append(name)
    entry: dict[str, Any] = {"method": method, "host": target.host, "port": target.port,
                             "path": target.raw_path[:MAX_AUDIT_PATH]}
    if names:
        entry["query"] = names[:MAX_QUERY_NAMES]
    return entry
