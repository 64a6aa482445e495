"""A HashiCorp Vault API stand-in on loopback, for the test suite.

No Vault binary can be installed from the package registries these machines reach, so
the Vault backend is tested through hvac against this server. It implements only the
endpoints sidekey uses, with the request and response shapes of Vault's API docs, AND
the state rules Vault applies to them (issue 11). Each rule names, in a ``#`` comment,
the Vault source it follows. Sources: **V** = hashicorp/vault 3f13e59 (1.14.5, the last
HashiCorp commit in the OpenBao history; read with ``git show 3f13e59:<path>``), **KV** =
hashicorp/vault-plugin-secrets-kv (HEAD 824fb96; the quoted code is the same at v0.15.0),
and the API pages under https://developer.hashicorp.com/vault/api-docs. Research notes:
/work/notes/issue11-research.md.

Endpoints (shapes):

* Token auth method -- api-docs/auth/token: ``GET auth/token/lookup-self``,
  ``POST auth/token/renew-self`` (``increment``), ``POST auth/token/revoke-self``,
  ``POST auth/token/revoke`` (``token``), ``POST auth/token/create[-orphan]``.
* ``sys/policy/{name}`` -- api-docs/system/policy (PUT ``policy`` as HCL, GET, DELETE).
* AppRole -- api-docs/auth/approle: ``POST auth/{mount}/login`` (``role_id``,
  ``secret_id``; unauthenticated).
* KV v2 -- api-docs/secret/kv/kv-v2: ``GET/POST/DELETE {mount}/data/{path}``,
  ``POST {mount}/delete|undelete/{path}``, ``PUT {mount}/destroy/{path}`` (``versions``),
  ``GET/POST/DELETE/LIST {mount}/metadata/{path}``, ``GET/POST {mount}/config``.
* Database engine -- api-docs/secret/databases: ``GET {mount}/creds/{role}``; an unknown
  role is ``400 {"errors": ["unknown role: NAME"]}``.
* ``sys/leases`` -- api-docs/system/leases: ``PUT/POST sys/leases/revoke`` and
  ``sys/leases/revoke/<lease_id>`` (and the legacy ``sys/revoke``), ``LIST
  sys/leases/lookup/{prefix}`` (``sudo``), ``PUT/POST sys/leases/lookup``.
* ``POST sys/capabilities-self`` (``paths``) -- api-docs/system/capabilities-self.
* ``GET/HEAD sys/health`` -- api-docs/system/health (unauthenticated).

State rules (details at each function):

1. Leases die with the token that issued them: its expiry (TTL / max TTL on the
   stand-in's clock), its revocation (revoke-self, revoke), or its last ``num_uses``
   revokes every lease it issued -- at once here; real Vault queues the engine calls.
   ``lease_duration`` is the role's TTL, not capped by the (service) token.
2. Policies: a token made with ``policies=[...]`` (names from :meth:`VaultServer.add_policy`,
   plus Vault's ``default`` policy unless ``no_default_policy``) is checked against them
   with Vault's ACL path matching; a token made without ``policies`` (every older test)
   is unrestricted, like root. A denied path is ``403 ["permission denied"]``; a missing,
   expired, revoked or other-namespace token is ``403`` with :attr:`VaultServer.invalid_token_errors`
   (default ``["permission denied", "invalid token"]``, Vault >= 1.16): match substrings.
3. ``num_uses``: every request with a valid token spends one, denied ones included; at
   zero the token is revoked with its leases; a leased read on the last use is a 400.
4. KV v2: soft delete, destroy, undelete, metadata delete, ``max_versions``, the 404 body
   of a deleted/destroyed version, check-and-set against ``current_version``.
5. ``sys/leases/revoke``: ``sync`` (default true) -> 204 after the engine revoked,
   an engine failure -> 400 (the lease stays); ``sync: false`` -> 202; unknown -> 204.
6. AppRole: secret_id TTL and use count; ``token_ttl``, ``token_max_ttl``, ``token_num_uses``.
7. Rate-limit quotas: 429 with ``Retry-After`` (:meth:`VaultServer.rate_limit`).

Knobs for tests: :meth:`~VaultServer.put_secret`, :meth:`~VaultServer.delete_secret_version`,
:meth:`~VaultServer.destroy_secret_version`, :meth:`~VaultServer.add_approle`,
:meth:`~VaultServer.add_secret_id`, :meth:`~VaultServer.add_policy`,
:meth:`~VaultServer.create_token` (TTL, renewable, max TTL, policies, num_uses),
:meth:`~VaultServer.expire_token`, :meth:`~VaultServer.revoke_token`,
:meth:`~VaultServer.add_dynamic_role`, :meth:`~VaultServer.advance` (move the stand-in's
clock: tokens, leases and secret_ids expire without sleeping), :meth:`~VaultServer.down` /
:meth:`~VaultServer.up`, :meth:`~VaultServer.set_delay`, :meth:`~VaultServer.hold`,
:meth:`~VaultServer.fail` (inject error answers), :meth:`~VaultServer.deny`,
:meth:`~VaultServer.set_answer_delay`, :meth:`~VaultServer.set_sealed`,
:meth:`~VaultServer.rate_limit`, :meth:`~VaultServer.fail_revocations` /
:meth:`~VaultServer.set_revoke_delay` (the database engine's DROP USER fails / is slow);
:attr:`~VaultServer.counts` per route, :attr:`~VaultServer.log` of every request (method,
path, route; never a token), :attr:`~VaultServer.issued_leases`,
:attr:`~VaultServer.revoked_leases` (revocation *requests*), :meth:`~VaultServer.live_leases`.

It is plain threads and blocking calls. Use it as a context manager; leaving it stops
the server, joins every thread and closes every socket (the suite runs with
``filterwarnings = error``)::

    with VaultServer() as vault:
        token = vault.create_token(ttl=3600)
        vault.put_secret("secret", "app/db", {"password": "..."})
"""

from __future__ import annotations

import datetime
import json
import re
import secrets
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

Answer = tuple[int, dict[str, Any] | None]

_DURATION_RE = re.compile(r"^(\d+)([smh]?)$")
# The system max_lease_ttl (V sdk/framework/lease.go CalculateTTL uses sysView.MaxLeaseTTL()
# when nothing tighter is set): 768h.
SYSTEM_MAX_TTL = 768 * 3600
# V vault/request_handling.go handleCancelableRequest, when the request that spent a
# token's last use returned a lease.
LAST_USE_LEASE_ERROR = ("Secret cannot be returned; token had one use left, so leased "
                        "credentials were immediately revoked.")
# V (>= 1.16, docs PR hashicorp/vault#26687): an invalid token gets both texts; their
# order (and whether they come as one multierror string) is unconfirmed.
INVALID_TOKEN_ERRORS = ("permission denied", "invalid token")
# AppRole: every bad credential is this one text since hashicorp/vault#23786 (backported
# to 1.13-1.15): "Normalize error response messages when invalid credentials are provided".
APPROLE_INVALID = "invalid role or secret ID"
CAPABILITIES = frozenset({"create", "read", "update", "patch", "delete", "list", "sudo", "deny",
                          "subscribe"})

# V vault/policy_store.go const defaultPolicy (the entries that apply here).
DEFAULT_POLICY = """
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
path "auth/token/revoke-self" { capabilities = ["update"] }
path "sys/capabilities-self" { capabilities = ["update"] }
path "sys/internal/ui/resultant-acl" { capabilities = ["read"] }
path "sys/renew" { capabilities = ["update"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/lookup" { capabilities = ["update"] }
path "cubbyhole/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "sys/wrapping/wrap" { capabilities = ["update"] }
path "sys/wrapping/lookup" { capabilities = ["update"] }
path "sys/wrapping/unwrap" { capabilities = ["update"] }
path "sys/tools/hash" { capabilities = ["update"] }
path "sys/tools/hash/*" { capabilities = ["update"] }
path "sys/control-group/request" { capabilities = ["update"] }
"""

# V vault/logical_system.go PathsSpecial.Root (the sys paths that need "sudo" besides the
# operation's capability), as request paths; a trailing "*" is a prefix.
_SUDO_PATHS = ("sys/revoke-prefix/*", "sys/revoke-force/*", "sys/leases/revoke-prefix/*",
               "sys/leases/revoke-force/*", "sys/leases/lookup/*", "sys/leases",
               "sys/auth/*", "sys/audit", "sys/audit/*", "sys/rotate", "sys/raw", "sys/raw/*")

_HCL_PATH_RE = re.compile(r'path\s+"([^"]+)"\s*\{(.*?)\}', re.DOTALL)
_HCL_CAPS_RE = re.compile(r"capabilities\s*=\s*\[([^\]]*)\]")


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _seconds(value: object) -> int | None:
    """Vault durations: an int of seconds or "30s" / "5m" / "1h"."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = _DURATION_RE.match(value.strip())
        if m:
            return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    return None


def human_duration(seconds: int) -> str:
    """Go's ``time.Duration.String`` trimmed as V sdk/framework/lease.go humanDuration does
    ("1h0m0s" -> "1h", "1m0s" -> "1m")."""
    if seconds <= 0:
        return "0s"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    text = f"{h}h{m}m{s}s" if h else (f"{m}m{s}s" if m else f"{s}s")
    if text.endswith("m0s"):
        text = text[:-2]
    idx = text.find("h0m")
    if idx > 0:
        text = text[:idx + 1] + text[idx + 3:]
    return text


def parse_policy(rules: str | Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """A policy as ``{path pattern: capabilities}``, from a mapping or from HCL text of the
    ``path "..." { capabilities = [...] }`` form (the only form the stand-in reads)."""
    if isinstance(rules, str):
        text = "\n".join(line.split("#", 1)[0] for line in rules.splitlines())
        parsed: dict[str, list[str]] = {}
        for pattern, body in _HCL_PATH_RE.findall(text):
            caps = _HCL_CAPS_RE.search(body)
            names = re.findall(r'"([^"]*)"', caps.group(1)) if caps else []
            parsed.setdefault(pattern, []).extend(names)
        items: Iterable[tuple[str, Iterable[str]]] = parsed.items()
    else:
        items = rules.items()
    out: dict[str, frozenset[str]] = {}
    for pattern, caps in items:
        capset = frozenset(caps)
        unknown = capset - CAPABILITIES
        if unknown:
            raise ValueError(f"unknown capabilities {sorted(unknown)} on path {pattern!r}")
        # V vault/acl.go NewACL: the same path in two blocks merges; "deny" wins.
        merged = out.get(pattern.lstrip("/"), frozenset()) | capset
        out[pattern.lstrip("/")] = frozenset({"deny"}) if "deny" in merged else merged
    return out


def _acl_lookup(rules: Mapping[str, frozenset[str]], path: str, is_list: bool) -> frozenset[str] | None:
    """The capabilities of the rule that governs ``path``, as V vault/acl.go
    ``ACL.AllowOperation`` picks it: an exact rule first (for LIST also without the
    trailing "/"), else ``CheckAllowedFromNonExactPaths``: the longest plain glob
    (``foo/*``) and every matching ``+`` pattern, ranked by (later first wildcard, not a
    prefix, fewer ``+``, longer, lexicographically greater) -- the highest wins."""
    if path in rules:
        return rules[path]
    if is_list and path.rstrip("/") in rules:
        return rules[path.rstrip("/")]
    # (first wildcard position, not a prefix, -"+" count, length, text) -> higher is better
    best: tuple[tuple[int, bool, int, int, str], frozenset[str]] | None = None
    longest_glob: str | None = None
    for pattern in rules:
        if "+" not in pattern and pattern.endswith("*"):
            prefix = pattern[:-1]
            if path.startswith(prefix) and (longest_glob is None or len(prefix) > len(longest_glob[:-1])):
                longest_glob = pattern
    if longest_glob is not None:
        prefix = longest_glob[:-1]
        best = ((len(prefix), False, 0, len(prefix), prefix), rules[longest_glob])
    path_parts = path.split("/")
    for pattern, caps in rules.items():
        if "+" not in pattern:
            continue
        is_prefix = pattern.endswith("*")
        wc_path = pattern[:-1] if is_prefix else pattern
        acl_parts = wc_path.split("/")
        if len(path_parts) < len(acl_parts) or (not is_prefix and len(path_parts) != len(acl_parts)):
            continue
        plus = 0
        for i, part in enumerate(acl_parts):
            if part == "+":
                plus += 1
            elif part != path_parts[i] and not (
                    is_prefix and i == len(acl_parts) - 1 and path_parts[i].startswith(part)):
                break
        else:
            key = (pattern.index("+"), not is_prefix, -plus, len(wc_path), wc_path)
            if best is None or key > best[0]:
                best = (key, caps)
    return None if best is None else best[1]


@dataclass
class Token:
    id: str
    accessor: str
    ttl: int  # the TTL each grant (issue, renewal) gives; 0: never expires (root)
    renewable: bool
    max_ttl: int  # 0: no max (the system's 768h)
    namespace: str
    policies: list[str]
    path: str
    issued_at: float
    expires_at: float | None
    num_uses: int = 0  # uses left; 0: unlimited
    restricted: bool = False  # policies are enforced (else: every path allowed, like root)
    revoked_at: float | None = None
    revoked_why: str = ""
    parent_id: str = ""  # "" : an orphan (AppRole logins, the knob's tokens)

    def remaining(self, now: float) -> int:
        return 0 if self.expires_at is None else max(0, int(self.expires_at - now))


@dataclass
class Lease:
    lease_id: str
    mount: str
    role: str
    username: str
    password: str
    lease_duration: int
    issued_at: float
    expires_at: float
    revoked_at: float | None = None
    issued_wall: float = 0.0  # time.time() at issue, for "issue_time"
    token_id: str = ""  # the token whose request created it (V expiration.go Register)
    revoked_why: str = ""  # "request", "token expired", "token revoked", "token used up", ...


@dataclass
class _KvVersion:
    data: dict[str, Any] | None  # None once destroyed
    created: str
    deletion_time: str = ""
    destroyed: bool = False


@dataclass
class _KvSecret:
    versions: dict[int, _KvVersion] = field(default_factory=dict)
    current: int = 0
    oldest: int = 0
    max_versions: int = 0
    cas_required: bool = False
    created: str = ""
    updated: str = ""


@dataclass
class _KvConfig:
    max_versions: int = 0
    cas_required: bool = False


@dataclass
class _Fault:
    status: int
    errors: list[str]
    times: int


@dataclass
class _Quota:
    times: int
    retry_after: int
    route: str | None
    headers: bool


@dataclass
class _Request:
    """What the authorization step learned about one request."""
    token: Token | None
    last_use: bool = False


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins handler threads: nothing outlives stop()
    vault: VaultServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is expected in these tests; stay quiet.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: nothing left open

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        status, doc, extra = self.server.vault._respond(self.command, self.path, dict(self.headers), body)
        payload = b"" if doc is None else json.dumps(doc).encode()
        try:
            self.send_response(status)
            if doc is not None:
                self.send_header("Content-Type", "application/json")
            for name, value in extra.items():
                self.send_header(name, value)
            if status != 204:
                self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")
            self.end_headers()
            if status != 204 and self.command != "HEAD":
                self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_GET = do_POST = do_PUT = do_DELETE = do_LIST = do_HEAD = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


class VaultServer:
    """A Vault API stand-in on ``http://127.0.0.1:<free port>`` (see the module doc).

    ``namespace`` is the namespace tokens are made in by default (``None``: the root
    namespace, no ``X-Vault-Namespace`` header). KV v2 is mounted at ``kv_mounts``,
    AppRole at ``approle``, the database engine at ``database``. ``clock`` is the
    stand-in's time source (default :func:`time.monotonic`); :meth:`advance` moves it on.
    ``invalid_token_errors`` is the 403 body for a bad token (the >= 1.16 texts by
    default; pass ``("permission denied",)`` for 1.14).
    """

    def __init__(
        self,
        *,
        namespace: str | None = None,
        kv_mounts: tuple[str, ...] = ("secret",),
        clock: Callable[[], float] | None = None,
        invalid_token_errors: Iterable[str] = INVALID_TOKEN_ERRORS,
    ) -> None:
        self.namespace = (namespace or "").strip("/")
        self.invalid_token_errors = list(invalid_token_errors)
        self.log: list[tuple[str, str, str]] = []  # (method, path, route)
        self.issued_leases: list[Lease] = []
        self.revoked_leases: list[str] = []  # every revocation request's lease id, in order
        self._clock = clock or time.monotonic
        self._offset = 0.0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._counts: dict[str, int] = {}
        self._delays: dict[str | None, float] = {}
        self._answer_delays: dict[str, float] = {}
        self._holds: dict[str, threading.Event] = {}
        self._faults: dict[str, _Fault] = {}
        self._quota: _Quota | None = None
        self._revoke_failures: list[str] = []  # engine errors for the next revocations
        self._revoke_delay = 0.0
        self._denied: list[str] = []
        self._sealed = False
        self._standby = False
        self._tokens: dict[str, Token] = {}
        self._policies: dict[str, dict[str, frozenset[str]]] = {"default": parse_policy(DEFAULT_POLICY)}
        self._policy_texts: dict[str, str] = {"default": DEFAULT_POLICY}
        self._approles: dict[str, dict[str, dict[str, Any]]] = {"approle": {}}
        self._kv: dict[str, dict[str, _KvSecret]] = {m: {} for m in kv_mounts}
        self._kv_config: dict[str, _KvConfig] = {m: _KvConfig() for m in kv_mounts}
        self._roles: dict[str, dict[str, dict[str, Any]]] = {"database": {}}
        self._leases: dict[str, Lease] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self.root_token = self.create_token(ttl=0, renewable=False, policies=["root"])

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Bind 127.0.0.1 on a free port and serve in a background thread."""
        self._stopping.clear()
        self._listen(0)
        return self

    def stop(self) -> None:
        """Stop serving, join every thread and close every socket. Idempotent."""
        self._stopping.set()  # wakes handlers sleeping in a delay
        self._unlisten()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self, port: int) -> None:
        server = _Server(("127.0.0.1", port), _Handler)
        server.vault = self
        self._port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"vault-server-{self._port}", daemon=True,
        )
        self._server, self._thread = server, thread
        thread.start()

    def _unlisten(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=10)

    @property
    def port(self) -> int:
        return self._port

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    # ------------------------------------------------------------------ clock

    def now(self) -> float:
        """The stand-in's clock (``clock()`` plus every :meth:`advance`)."""
        return self._clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the stand-in's clock on: tokens, leases and secret_ids whose time has come
        expire (a token's leases are revoked with it) without anyone sleeping."""
        with self._lock:
            self._offset += seconds
            self._sweep(self.now())

    # ------------------------------------------------------------------ failure knobs

    def down(self) -> None:
        """Close the listening socket: connections are refused until :meth:`up`."""
        self._unlisten()

    def up(self) -> None:
        """Listen again, on the same port."""
        if self._server is None and not self._stopping.is_set():
            self._listen(self._port)

    def set_delay(self, seconds: float, route: str | None = None) -> None:
        """Wait ``seconds`` before answering (``route``: only that route, see
        :attr:`counts`). Cut short by :meth:`stop`."""
        with self._lock:
            self._delays[route] = seconds

    def hold(self, route: str) -> threading.Event:
        """Hold ``route``'s requests (counted, not yet handled) until the returned event
        is set: a test can act in between, with no timing. Cut short by :meth:`stop`."""
        gate = threading.Event()
        with self._lock:
            self._holds[route] = gate
        return gate

    def set_answer_delay(self, seconds: float, route: str) -> None:
        """Handle ``route``'s requests at once (a creds read creates its lease) but answer
        ``seconds`` later. Cut short by :meth:`stop`."""
        with self._lock:
            self._answer_delays[route] = seconds

    def fail(self, route: str, status: int = 500, errors: list[str] | None = None,
             times: int = 1) -> None:
        """Answer the next ``times`` requests of ``route`` with ``status`` and ``errors``
        (before any token is looked at: no ``num_uses`` is spent)."""
        with self._lock:
            self._faults[route] = _Fault(status, list(errors or ["internal error"]), times)

    def rate_limit(self, times: int = 1, *, retry_after: int = 1, route: str | None = None,
                   headers: bool = True) -> None:
        """A rate-limit quota refuses the next ``times`` requests (of ``route``, or any but
        ``sys/health``) with 429.

        V http/util.go rateLimitQuotaWrapping runs before the request reaches the core (no
        token is looked at, no use spent) and answers
        ``429 {"errors": ["request path \\"<path>\\": rate limit quota exceeded"]}``; with
        ``enable_rate_limit_response_headers`` (``headers``) it adds Retry-After and the
        X-Ratelimit-* headers (V vault/quotas/quotas_rate_limit.go allow). ``sys/health``
        is in V vault/quotas/quotas.go defaultExemptPaths."""
        with self._lock:
            self._quota = _Quota(times, retry_after, route, headers)

    def fail_revocations(self, times: int = 1,
                         error: str = 'pq: role "v-token-readonly" cannot be dropped') -> None:
        """The database engine fails the next ``times`` revocations (DROP USER fails)."""
        with self._lock:
            self._revoke_failures = [error] * times

    def set_revoke_delay(self, seconds: float) -> None:
        """The database engine takes ``seconds`` (real time) to revoke a lease: a
        ``sync`` revocation answers that late. Cut short by :meth:`stop`."""
        with self._lock:
            self._revoke_delay = seconds

    def deny(self, path_prefix: str) -> None:
        """Answer 403 permission denied to any token (root included) for paths under
        ``path_prefix`` (relative to /v1/). The request spends a use, as a denial by
        policy does."""
        with self._lock:
            self._denied.append(path_prefix.strip("/"))

    def set_sealed(self, sealed: bool) -> None:
        with self._lock:
            self._sealed = sealed

    def set_standby(self, standby: bool) -> None:
        """``sys/health`` answers 429 (standby) instead of 200."""
        with self._lock:
            self._standby = standby

    # ------------------------------------------------------------------ tokens, roles, data

    def add_policy(self, name: str, rules: str | Mapping[str, Iterable[str]]) -> None:
        """A named ACL policy: HCL text (``path "x/*" { capabilities = ["read"] }``) or
        ``{path: [capabilities]}``. Tokens made with ``policies=[name]`` are held to it."""
        if name in ("root", "default"):
            raise ValueError(f"{name!r} is built in")
        parsed = parse_policy(rules)
        with self._lock:
            self._policies[name] = parsed
            if isinstance(rules, str):
                self._policy_texts[name] = rules

    def create_token(
        self,
        *,
        ttl: int = 3600,
        renewable: bool = True,
        max_ttl: int = 0,
        namespace: str | None = None,
        policies: list[str] | None = None,
        no_default_policy: bool = False,
        num_uses: int = 0,
        path: str = "auth/token/create",
    ) -> str:
        """A new token (``ttl=0``: never expires, like a root token).

        ``policies=None``: unrestricted (every path allowed), as the stand-in always was.
        A list: the token is held to those policies (``"root"``: everything), plus
        Vault's ``default`` policy unless ``no_default_policy`` (V vault/token_store.go
        handleCreateCommon adds "default")."""
        with self._lock:
            return self._new_token(ttl=ttl, renewable=renewable, max_ttl=max_ttl,
                                   namespace=namespace, policies=policies,
                                   no_default_policy=no_default_policy, num_uses=num_uses,
                                   path=path).id

    def _new_token(self, *, ttl: int, renewable: bool, max_ttl: int, namespace: str | None,
                   policies: list[str] | None, path: str, no_default_policy: bool = False,
                   num_uses: int = 0) -> Token:
        now = self.now()
        restricted = policies is not None and "root" not in policies
        if policies is None:
            names = ["default"]
        else:
            unknown = [p for p in policies if p not in self._policies and p != "root"]
            if unknown:
                raise ValueError(f"unknown policies {unknown}: add_policy() them first")
            names = list(policies)
            if restricted and not no_default_policy and "default" not in names:
                names.append("default")
            names.sort()
        if max_ttl and ttl > max_ttl:
            ttl = max_ttl
        token = Token(
            id="hvs." + secrets.token_urlsafe(24),
            accessor=secrets.token_urlsafe(18),
            ttl=ttl,
            renewable=renewable,
            max_ttl=max_ttl,
            namespace=self.namespace if namespace is None else namespace.strip("/"),
            policies=names,
            path=path,
            issued_at=now,
            expires_at=now + ttl if ttl > 0 else None,
            num_uses=num_uses,
            restricted=restricted,
        )
        self._tokens[token.id] = token
        return token

    def token(self, token_id: str) -> Token:
        with self._lock:
            self._sweep(self.now())
            return self._tokens[token_id]

    def tokens(self) -> list[Token]:
        with self._lock:
            self._sweep(self.now())
            return list(self._tokens.values())

    def expire_token(self, token_id: str) -> None:
        """Make ``token_id`` expired now: Vault answers 403 to it and revokes its leases."""
        with self._lock:
            self._tokens[token_id].expires_at = self.now() - 1
            self._sweep(self.now())

    def expire_all_tokens(self) -> None:
        with self._lock:
            for token in self._tokens.values():
                if token.id != self.root_token:
                    token.expires_at = self.now() - 1
            self._sweep(self.now())

    def revoke_token(self, token_id: str) -> None:
        """Revoke ``token_id`` (as ``auth/token/revoke`` does), with its leases."""
        with self._lock:
            self._revoke_token(self._tokens[token_id], self.now(), "token revoked")

    def set_token_ttl(self, token_id: str, seconds: float) -> None:
        """Leave ``token_id`` ``seconds`` to live (its renewal grant is unchanged)."""
        with self._lock:
            self._tokens[token_id].expires_at = self.now() + seconds

    def add_approle(
        self,
        *,
        mount: str = "approle",
        role_id: str | None = None,
        secret_id: str | None = None,
        token_ttl: int = 3600,
        token_max_ttl: int = 0,
        renewable: bool = True,
        token_num_uses: int = 0,
        token_policies: list[str] | None = None,
        secret_id_ttl: int = 0,
        secret_id_num_uses: int = 0,
    ) -> tuple[str, str]:
        """An AppRole whose logins make tokens with these settings; returns
        ``(role_id, secret_id)``. ``token_policies=None``: unrestricted tokens (as before).
        ``secret_id_ttl`` / ``secret_id_num_uses`` (0: unlimited) apply to its secret_ids
        (the first one and those of :meth:`add_secret_id`)."""
        role_id = role_id or secrets.token_hex(16)
        with self._lock:
            if token_policies is not None:
                unknown = [p for p in token_policies if p not in self._policies and p != "root"]
                if unknown:
                    raise ValueError(f"unknown policies {unknown}: add_policy() them first")
            self._approles.setdefault(mount, {})[role_id] = {
                "ttl": token_ttl, "max_ttl": token_max_ttl, "renewable": renewable,
                "num_uses": token_num_uses, "policies": token_policies,
                "secret_id_ttl": secret_id_ttl, "secret_id_num_uses": secret_id_num_uses,
                "secret_ids": {},
            }
        return role_id, self.add_secret_id(role_id, mount=mount, secret_id=secret_id)

    def add_secret_id(self, role_id: str, *, mount: str = "approle", secret_id: str | None = None,
                      ttl: int | None = None, num_uses: int | None = None) -> str:
        """A new secret_id for the role (``ttl`` / ``num_uses``: the role's by default)."""
        secret_id = secret_id or secrets.token_hex(16)
        with self._lock:
            role = self._approles[mount][role_id]
            ttl = role["secret_id_ttl"] if ttl is None else ttl
            # V builtin/credential/approle/validation.go: ExpirationTime = creation + ttl.
            role["secret_ids"][secret_id] = {
                "expires_at": self.now() + ttl if ttl else None,
                "uses": role["secret_id_num_uses"] if num_uses is None else num_uses,
            }
        return secret_id

    def secret_id_uses(self, role_id: str, secret_id: str, *, mount: str = "approle") -> int | None:
        """Uses left of a secret_id (0: unlimited); None once it is gone."""
        with self._lock:
            entry = self._approles[mount][role_id]["secret_ids"].get(secret_id)
            return None if entry is None else int(entry["uses"])

    def put_secret(self, mount: str, path: str, data: dict[str, Any]) -> int:
        """Write a new KV v2 version; returns its number."""
        with self._lock:
            return self._kv_write(mount, path.strip("/"), dict(data))

    def delete_secret_version(self, mount: str, path: str, version: int | None = None) -> None:
        """Soft-delete ``version`` (default: the current one), as ``DELETE data/`` does."""
        with self._lock:
            entry = self._kv[mount][path.strip("/")]
            self._kv_delete(entry, [version or entry.current])

    def destroy_secret_version(self, mount: str, path: str, version: int | None = None) -> None:
        """Destroy ``version`` (default: the current one), as ``PUT destroy/`` does."""
        with self._lock:
            entry = self._kv[mount][path.strip("/")]
            self._kv_destroy(entry, [version or entry.current])

    def secret_versions(self, mount: str, path: str) -> dict[int, dict[str, Any]]:
        """The data of every version still stored (soft-deleted ones too; not destroyed)."""
        with self._lock:
            entry = self._kv.get(mount, {}).get(path.strip("/"))
            if entry is None:
                return {}
            return {v: dict(ver.data) for v, ver in entry.versions.items() if ver.data is not None}

    def secret_current_version(self, mount: str, path: str) -> int:
        """``current_version`` of the metadata (0: no metadata)."""
        with self._lock:
            entry = self._kv.get(mount, {}).get(path.strip("/"))
            return 0 if entry is None else entry.current

    def add_dynamic_role(self, role: str = "readonly", *, mount: str = "database",
                         ttl: int = 3600, renewable: bool = True) -> None:
        with self._lock:
            self._roles.setdefault(mount, {})[role] = {"ttl": ttl, "renewable": renewable}

    def live_leases(self) -> set[str]:
        """Issued, not revoked, not expired."""
        with self._lock:
            now = self.now()
            self._sweep(now)
            return {lid for lid, le in self._leases.items() if self._live(le, now)}

    def lease(self, lease_id: str) -> Lease:
        with self._lock:
            self._sweep(self.now())
            return self._leases[lease_id]

    @property
    def counts(self) -> dict[str, int]:
        """Requests received per route: ``health``, ``lookup_self``, ``renew_self``,
        ``revoke_self``, ``revoke_token``, ``login``, ``kv_read``, ``kv_write``,
        ``kv_delete``, ``kv_undelete``, ``kv_destroy``, ``kv_metadata``, ``kv_config``,
        ``creds``, ``revoke``, ``list_leases``, ``lookup_lease``, ``capabilities_self``,
        ``other``."""
        with self._lock:
            return dict(self._counts)

    # ------------------------------------------------------------------ token and lease state
    # With self._lock held.

    def _token_live(self, token: Token, now: float) -> bool:
        # V vault/token_store.go lookupInternal: a token past its expire time is not
        # returned (403) even before the expiration manager revoked it; one whose
        # NumUses is tokenRevocationPending neither.
        return token.revoked_at is None and (token.expires_at is None or token.expires_at > now)

    def _revoke_token(self, token: Token, now: float, why: str) -> None:
        """V vault/token_store.go revokeInternal -> ExpirationManager.RevokeByToken: every
        lease indexed under the token is revoked (V queues them, lazyRevokeInternal; the
        stand-in revokes at once)."""
        if token.revoked_at is not None:
            return
        token.revoked_at = now
        token.revoked_why = why
        for lease in self._leases.values():
            if lease.token_id == token.id and lease.revoked_at is None:
                lease.revoked_at = now
                lease.revoked_why = why
        # V token_store.go revokeTree: a token's children (auth/token/create without
        # no_parent) go with it, and their leases.
        for child in [t for t in self._tokens.values() if t.parent_id == token.id]:
            self._revoke_token(child, now, "parent token revoked")

    def _sweep(self, now: float) -> None:
        """Expire what the clock has passed: a token at its TTL / max TTL is revoked with
        its leases (V vault/expiration.go: the token's own lease timer fires ->
        revokeEntry -> tokenStore.revokeTree); AppRole secret_ids past their TTL go."""
        for token in self._tokens.values():
            if token.revoked_at is None and token.expires_at is not None and token.expires_at <= now:
                self._revoke_token(token, token.expires_at, "token expired")
        for roles in self._approles.values():
            for role in roles.values():
                ids = role["secret_ids"]
                for sid in [s for s, e in ids.items() if e["expires_at"] is not None and e["expires_at"] <= now]:
                    del ids[sid]

    def _live(self, lease: Lease, now: float) -> bool:
        return lease.revoked_at is None and lease.expires_at > now

    # ------------------------------------------------------------------ serving

    def _route(self, method: str, rel: str) -> tuple[str, dict[str, str]]:
        """Which route ``rel`` (the path after /v1/) is, and its parameters."""
        parts = rel.split("/")
        if rel == "sys/health":
            return "health", {}
        if rel == "auth/token/lookup-self":
            return "lookup_self", {}
        if rel == "auth/token/renew-self":
            return "renew_self", {}
        if rel == "auth/token/revoke-self":
            return "revoke_self", {}
        if rel == "auth/token/revoke":
            return "revoke_token", {}
        if rel in ("auth/token/create", "auth/token/create-orphan"):
            return "create_token", {"orphan": "1" if rel.endswith("orphan") else ""}
        if len(parts) == 3 and parts[:2] == ["sys", "policy"]:
            return "policy", {"name": parts[2]}
        if rel == "sys/capabilities-self":
            return "capabilities_self", {}
        if len(parts) == 3 and parts[0] == "auth" and parts[2] == "login":
            return "login", {"mount": parts[1]}
        for base in ("sys/leases/revoke", "sys/revoke"):
            # V vault/logical_system_paths.go: "(leases/)?revoke" + OptionalParamRegex("url_lease_id")
            if rel == base or rel.startswith(base + "/"):
                return "revoke", {"url_lease_id": rel[len(base) + 1:]}
        if rel == "sys/leases/lookup" and method != "LIST":
            return "lookup_lease", {}
        if rel.startswith("sys/leases/lookup"):
            # Vault's handler (logical_system.go, handleLeaseLookupList) lists under the
            # prefix with a "/" appended when missing; the path has lost it here anyway.
            prefix = rel[len("sys/leases/lookup"):].strip("/")
            return "list_leases", {"prefix": prefix + "/" if prefix else ""}
        if len(parts) == 2 and parts[0] in self._kv and parts[1] == "config":
            return "kv_config", {"mount": parts[0]}
        if len(parts) >= 3 and parts[0] in self._kv:
            kind = {"metadata": "kv_metadata", "delete": "kv_delete", "undelete": "kv_undelete",
                    "destroy": "kv_destroy"}.get(parts[1])
            if parts[1] == "data":
                kind = {"GET": "kv_read", "DELETE": "kv_delete"}.get(method, "kv_write")
            if kind is not None:
                return kind, {"mount": parts[0], "path": "/".join(parts[2:])}
        if len(parts) == 3 and parts[0] in self._roles and parts[1] == "creds":
            return "creds", {"mount": parts[0], "role": parts[2]}
        return "other", {}

    def _respond(self, method: str, raw_path: str, headers: dict[str, str],
                 body: bytes) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        """Runs in a handler thread."""
        extra: dict[str, str] = {}
        status, doc = self._answer(method, raw_path, headers, body, extra)
        with self._lock:
            late = self._answer_delays.get(self._route(method, self._rel(raw_path))[0], 0.0)
        if late > 0:
            self._stopping.wait(late)
        return status, doc, extra

    @staticmethod
    def _rel(raw_path: str) -> str:
        return urllib.parse.unquote(urllib.parse.urlsplit(raw_path).path).removeprefix("/v1/").strip("/")

    def _answer(self, method: str, raw_path: str, headers: dict[str, str], body: bytes,
                extra: dict[str, str]) -> Answer:
        url = urllib.parse.urlsplit(raw_path)
        path = urllib.parse.unquote(url.path)
        query = urllib.parse.parse_qs(url.query)
        rel = path.removeprefix("/v1/").strip("/")
        if method == "GET" and query.get("list") == ["true"]:
            method = "LIST"  # Vault takes GET ?list=true for LIST
        # The path the ACL sees: V http/logical.go buildLogicalRequestNoAuth appends "/" to
        # a LIST request's path.
        acl_path = path.removeprefix("/v1/").lstrip("/")
        if method == "LIST" and not acl_path.endswith("/"):
            acl_path += "/"
        headers = {k.lower(): v for k, v in headers.items()}
        with self._lock:
            route, params = self._route(method, rel)
            self.log.append((method, path, route))
            self._counts[route] = self._counts.get(route, 0) + 1
            delay = self._delays.get(route, self._delays.get(None, 0.0))
            gate = self._holds.get(route)
        if delay > 0:
            self._stopping.wait(delay)
        if gate is not None:
            while not gate.wait(0.05) and not self._stopping.is_set():
                pass
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            return 400, {"errors": ["failed to parse JSON input"]}
        if not isinstance(doc, dict):
            return 400, {"errors": ["failed to parse JSON input"]}
        with self._lock:
            now = self.now()
            self._sweep(now)
            quota = self._quota
            if (quota is not None and quota.times > 0 and route != "health"
                    and quota.route in (None, route)):
                quota.times -= 1
                if quota.headers:
                    extra.update({"Retry-After": str(quota.retry_after), "X-Ratelimit-Limit": "1",
                                  "X-Ratelimit-Remaining": "0", "X-Ratelimit-Reset": str(quota.retry_after)})
                return 429, {"errors": [f'request path "{rel}": rate limit quota exceeded']}
            if route == "health" and method in ("GET", "HEAD"):
                return self._health(query)
            if self._sealed:
                return 503, {"errors": ["Vault is sealed"]}
            fault = self._faults.get(route)
            if fault is not None and fault.times > 0:
                fault.times -= 1
                return fault.status, {"errors": fault.errors}
            namespace = headers.get("x-vault-namespace", "").strip("/")
            if route == "login":
                # Unauthenticated: V builtin/credential/approle/backend.go PathsSpecial.Unauthenticated.
                return self._login(params["mount"], namespace, doc, now)
            token = self._tokens.get(headers.get("x-vault-token", ""))
            if token is None or not self._token_live(token, now) or token.namespace != namespace:
                # No token entry: nothing to spend (V request_handling.go: te is nil).
                return 403, {"errors": list(self.invalid_token_errors)}
            req = _Request(token)
            # V vault/request_handling.go handleRequest: "We run this logic first because
            # we want to decrement the use count even in the case of an error" -- UseToken
            # before the ACL outcome is acted on, so a denied request spends a use too.
            if token.num_uses > 0:
                token.num_uses -= 1
                req.last_use = token.num_uses == 0
            op = self._operation(method, route, params)
            if not self._allowed(token, acl_path, op, method == "LIST") or any(
                    rel == d or rel.startswith(d + "/") for d in self._denied):
                return self._finish(req, (403, {"errors": ["permission denied"]}), now)
            if route == "revoke" and method in ("POST", "PUT"):
                plan = self._revoke_plan(doc, params["url_lease_id"])
                if isinstance(plan, str):
                    return self._finish(req, (400, {"errors": [plan]}), now)
                lease_id, sync = plan
                engine_delay = self._revoke_delay if sync else 0.0
            else:
                return self._finish(req, self._dispatch(method, route, params, rel, query, doc,
                                                        token, now), now)
        # A sync revocation waits for the engine outside the lock (other requests go on).
        if engine_delay > 0:
            self._stopping.wait(engine_delay)
        with self._lock:
            now = self.now()
            return self._finish(req, self._revoke(lease_id, sync, now), now)

    def _finish(self, req: _Request, answer: Answer, now: float) -> Answer:
        """After the handler: a token whose last use this was is revoked with its leases
        (V request_handling.go: the deferred CreateOrFetchRevocationLeaseByToken + LazyRevoke),
        and a lease this very request created is not handed out: 400 (V
        handleCancelableRequest, "Secret cannot be returned...")."""
        token = req.token
        if token is None or not req.last_use:
            return answer
        self._revoke_token(token, now, "token used up")
        status, doc = answer
        if status == 200 and doc is not None and doc.get("lease_id"):
            return 400, {"errors": [LAST_USE_LEASE_ERROR]}
        return answer

    def _operation(self, method: str, route: str, params: dict[str, str]) -> str:
        """The ACL operation of a request. POST/PUT is "create" where the path has an
        existence check and the target does not exist (KV v2 data/ and metadata/: KV
        path_data.go dataExistenceCheck, metadata exists or not), else "update"."""
        if method == "LIST":
            return "list"
        if method in ("GET", "HEAD"):
            return "read"
        if method == "DELETE":
            return "delete"
        if route in ("kv_write", "kv_metadata"):
            exists = self._kv[params["mount"]].get(params["path"]) is not None
            return "update" if exists else "create"
        return "update"

    def _capabilities(self, token: Token, path: str, is_list: bool) -> frozenset[str] | None:
        """The token's capabilities on ``path`` (None: no rule matches); {"root"} for root."""
        if not token.restricted:
            return frozenset({"root"})
        merged: dict[str, frozenset[str]] = {}
        for name in token.policies:
            for pattern, caps in self._policies[name].items():
                both = merged.get(pattern, frozenset()) | caps
                merged[pattern] = frozenset({"deny"}) if "deny" in both else both
        return _acl_lookup(merged, path, is_list)

    def _allowed(self, token: Token, path: str, op: str, is_list: bool) -> bool:
        """V vault/acl.go AllowOperation (deny first, then the operation's capability)
        plus the sudo check for root paths (V vault/request_handling.go CheckToken:
        "root privileges" for PathsSpecial.Root)."""
        caps = self._capabilities(token, path, is_list)
        if caps is not None and "root" in caps:
            return True
        if caps is None or "deny" in caps or op not in caps:
            return False
        needs_sudo = any(path == p or (p.endswith("*") and path.startswith(p[:-1])) for p in _SUDO_PATHS)
        return "sudo" in caps if needs_sudo else True

    def _dispatch(self, method: str, route: str, params: dict[str, str], rel: str,
                  query: dict[str, list[str]], doc: dict[str, Any], token: Token, now: float) -> Answer:
        writes = ("POST", "PUT")
        if route == "lookup_self" and method == "GET":
            return 200, self._lookup(token, now)
        if route == "renew_self" and method in writes:
            return self._renew(token, doc, now)
        if route == "revoke_self" and method in writes:
            # V vault/token_store.go handleRevokeSelf: the token and its leases go; 204.
            self._revoke_token(token, now, "token revoked")
            return 204, None
        if route == "revoke_token" and method in writes:
            target = self._tokens.get(str(doc.get("token", "")))
            if not doc.get("token"):
                return 400, {"errors": ["missing token"]}
            if target is not None:
                self._revoke_token(target, now, "token revoked")
            return 204, None
        if route == "create_token" and method in writes:
            return self._create_token_api(token, doc, bool(params["orphan"]), now)
        if route == "policy":
            return self._policy_api(method, params["name"], doc)
        if route == "capabilities_self" and method in writes:
            return self._capabilities_self(token, doc)
        if route == "list_leases" and method == "LIST":
            return self._list_leases(params["prefix"], now)
        if route == "lookup_lease" and method in writes:
            return self._lookup_lease(doc, now)
        if route == "kv_read" and method == "GET":
            return self._kv_read(params["mount"], params["path"], query)
        if route == "kv_write" and method in writes:
            return self._kv_post(params["mount"], params["path"], doc)
        if route in ("kv_delete", "kv_undelete", "kv_destroy") and (
                method in writes or (route == "kv_delete" and method == "DELETE")):
            return self._kv_versions_op(route, method, params["mount"], params["path"], doc)
        if route == "kv_metadata":
            return self._kv_metadata(method, params["mount"], params["path"], doc)
        if route == "kv_config":
            return self._kv_config_op(method, params["mount"], doc)
        if route == "creds" and method == "GET":
            return self._creds(params["mount"], params["role"], token, now)
        return 404, {"errors": [f'no handler for route "{rel}". route entry not found.']}

    # The helpers below run with self._lock held.

    def _envelope(self, **fields: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "request_id": secrets.token_hex(16), "lease_id": "", "renewable": False,
            "lease_duration": 0, "data": None, "wrap_info": None, "warnings": None,
            "auth": None,
        }
        doc.update(fields)
        return doc

    def _health(self, query: dict[str, list[str]]) -> Answer:
        """V http/sys_health.go getSysHealth: unauthenticated (never touches the token
        store, so it spends no use), 200 active / 429 standby / 503 sealed, each code
        overridable by ``activecode`` / ``standbycode`` / ``sealedcode``; ``standbyok``
        makes a standby 200."""
        def code(name: str, default: int) -> int:
            try:
                return int(query.get(name, [str(default)])[0])
            except ValueError:
                return default
        if self._sealed:
            status = code("sealedcode", 503)
        elif self._standby:
            status = 200 if query.get("standbyok", [""])[0] in ("true", "1") else code("standbycode", 429)
        else:
            status = code("activecode", 200)
        return status, {
            "initialized": True, "sealed": self._sealed, "standby": self._standby,
            "performance_standby": False, "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled", "server_time_utc": int(time.time()),
            "version": "1.14.5", "cluster_name": "vault-cluster-standin",
            "cluster_id": "00000000-0000-0000-0000-000000000000",
        }

    def _auth_doc(self, token: Token, now: float) -> dict[str, Any]:
        return {
            "client_token": token.id, "accessor": token.accessor, "policies": token.policies,
            "token_policies": token.policies, "metadata": None,
            "lease_duration": token.remaining(now), "renewable": token.renewable,
            "entity_id": "", "token_type": "service", "orphan": True,
            "mfa_requirement": None, "num_uses": token.num_uses,
        }

    def _lookup(self, token: Token, now: float) -> dict[str, Any]:
        expire_time = None
        if token.expires_at is not None:
            expire_time = (datetime.datetime.now(datetime.UTC)
                           + datetime.timedelta(seconds=token.expires_at - now)).isoformat()
        # V vault/token_store.go handleLookup; num_uses is what is left after this request.
        return self._envelope(data={
            "accessor": token.accessor, "creation_time": int(time.time()),
            "creation_ttl": token.ttl, "display_name": "token", "entity_id": "",
            "expire_time": expire_time, "explicit_max_ttl": token.max_ttl if token.path.startswith("auth/token") else 0,
            "id": token.id, "identity_policies": [], "issue_time": _now_iso(), "meta": None,
            "num_uses": token.num_uses, "orphan": True, "path": token.path,
            "policies": token.policies, "renewable": token.renewable,
            "ttl": token.remaining(now), "type": "service",
        })

    def _renew(self, token: Token, doc: dict[str, Any], now: float) -> Answer:
        """V vault/expiration.go RenewToken -> sdk/framework/lease.go CalculateTTL: the new
        TTL is ``increment`` if given, else the token's (role's) TTL; capped so the token
        never outlives issue time + max TTL (the system's 768h when none), with the
        warning 'TTL of "…" exceeded the effective max_ttl of "…"; TTL value is capped
        accordingly'."""
        if not token.renewable or token.expires_at is None:
            return 400, {"errors": ["lease is not renewable"]}
        increment = _seconds(doc.get("increment")) if doc.get("increment") else None
        grant = increment or token.ttl
        max_valid = int(token.issued_at + (token.max_ttl or SYSTEM_MAX_TTL) - now)
        if max_valid <= 0:
            return 400, {"errors": ["past the max TTL, cannot renew"]}
        warnings = None
        if grant > max_valid:
            warnings = [f'TTL of "{human_duration(grant)}" exceeded the effective max_ttl of '
                        f'"{human_duration(max_valid)}"; TTL value is capped accordingly']
            grant = max_valid
        token.expires_at = now + grant
        return 200, self._envelope(auth=self._auth_doc(token, now), warnings=warnings)

    def _login(self, mount: str, namespace: str, doc: dict[str, Any], now: float) -> Answer:
        """V builtin/credential/approle/path_login.go pathLoginUpdate: an unknown role_id,
        an unknown / expired / used-up secret_id are all 400 "invalid role or secret ID"
        (hashicorp/vault#23786). A secret_id with ``secret_id_num_uses`` left 1 is deleted
        by this (successful) login, otherwise its count goes down. Expiry: V checks none
        at login (tidySecretID removes it within a minute); the stand-in refuses at once."""
        roles = self._approles.get(mount)
        if roles is None:
            return 404, {"errors": [f'no handler for route "auth/{mount}/login". route entry not found.']}
        role = roles.get(str(doc.get("role_id", "")))
        if role is None:
            return 400, {"errors": [APPROLE_INVALID]}
        secret_id = str(doc.get("secret_id", ""))
        entry = role["secret_ids"].get(secret_id)
        if entry is None:
            return 400, {"errors": [APPROLE_INVALID]}
        if entry["uses"] == 1:
            del role["secret_ids"][secret_id]
        elif entry["uses"] > 1:
            entry["uses"] -= 1
        # sdk/helper/tokenutil: token_ttl, token_max_ttl, token_num_uses, token_policies.
        token = self._new_token(
            ttl=role["ttl"], renewable=role["renewable"], max_ttl=role["max_ttl"],
            namespace=namespace, policies=role["policies"], path=f"auth/{mount}/login",
            num_uses=role["num_uses"],
        )
        return 200, self._envelope(auth=self._auth_doc(token, now))

    def _create_token_api(self, parent: Token, doc: dict[str, Any], orphan: bool, now: float) -> Answer:
        """``POST auth/token/create`` (api-docs/auth/token "Create token"): ``policies``
        (default: the parent's), ``ttl``, ``explicit_max_ttl``, ``num_uses``,
        ``renewable``, ``no_default_policy``, ``no_parent``. V token_store.go
        handleCreateCommon: a non-root parent may only hand out a subset of its own
        policies; the new token is the caller's child (revoked with it) unless orphan."""
        raw = doc.get("policies")
        policies = [str(p) for p in raw] if isinstance(raw, list) and raw else None
        if policies is None:  # the parent's (an unrestricted parent's child is unrestricted)
            policies = [p for p in parent.policies if p != "default"] if parent.restricted else None
        elif parent.restricted:
            extra = set(policies) - set(parent.policies) - {"default"}
            if extra:
                return 400, {"errors": ["child policies must be subset of parent"]}
        unknown = [p for p in policies or [] if p not in self._policies and p != "root"]
        if unknown:
            return 400, {"errors": [f"policy {unknown[0]!r} does not exist"]}
        ttl = _seconds(doc.get("ttl")) or (parent.ttl if parent.expires_at is not None else 0) \
            or SYSTEM_MAX_TTL
        token = self._new_token(
            ttl=ttl, renewable=bool(doc.get("renewable", True)),
            max_ttl=_seconds(doc.get("explicit_max_ttl")) or 0, namespace=parent.namespace,
            policies=policies, path="auth/token/create",
            no_default_policy=bool(doc.get("no_default_policy")),
            num_uses=_weak_int(doc.get("num_uses", 0)) or 0,
        )
        if not (orphan or doc.get("no_parent")):
            token.parent_id = parent.id
        return 200, self._envelope(auth={**self._auth_doc(token, now), "orphan": not token.parent_id})

    def _policy_api(self, method: str, name: str, doc: dict[str, Any]) -> Answer:
        """``sys/policy/<name>`` (api-docs/system/policy): PUT/POST ``{"policy": hcl}`` ->
        204, GET -> ``{"name", "rules"}``, DELETE -> 204. "root" cannot be changed."""
        if method in ("POST", "PUT"):
            if name == "root":
                return 400, {"errors": ['cannot update "root" policy']}
            text = doc.get("policy") or doc.get("rules")
            if not isinstance(text, str):
                return 400, {"errors": ["'policy' parameter not supplied or empty"]}
            try:
                self._policies[name] = parse_policy(text)
            except ValueError as exc:
                return 400, {"errors": [f"failed to parse policy: {exc}"]}
            self._policy_texts[name] = text
            return 204, None
        if method == "DELETE":
            if name in ("root", "default"):
                return 400, {"errors": [f'cannot delete "{name}" policy']}
            self._policies.pop(name, None)
            return 204, None
        if name not in self._policies:
            return 404, {"errors": []}
        rules = self._policy_texts.get(name, "")
        return 200, {**self._envelope(data={"name": name, "rules": rules}), "name": name, "rules": rules}

    def _capabilities_self(self, token: Token, doc: dict[str, Any]) -> Answer:
        """V vault/logical_system.go handleCapabilities + vault/capabilities.go
        Core.Capabilities + vault/acl.go ACL.Capabilities: per path the sorted capability
        names ("root" for root, "deny" when nothing is granted); ``capabilities`` too
        when one path is asked; the data is also put at the top level (V http/handler.go
        injectDataIntoTopRoutes)."""
        raw = doc.get("paths") or doc.get("path")
        if isinstance(raw, str):
            raw = [p.strip() for p in raw.split(",") if p.strip()]
        if not isinstance(raw, list) or not raw or not all(isinstance(p, str) for p in raw):
            return 400, {"errors": ["paths must be supplied"]}
        data: dict[str, Any] = {}
        for p in raw:
            caps = self._capabilities(token, p.lstrip("/"), True)
            if caps is not None and "root" in caps:
                data[p] = ["root"]
                continue
            names = sorted(c for c in (caps or frozenset()) if c not in ("deny", "subscribe"))
            data[p] = ["deny"] if caps is None or "deny" in caps or not names else names
        if len(raw) == 1:
            data["capabilities"] = data[raw[0]]
        return 200, {**self._envelope(data=data), **data}

    def _revoke_plan(self, doc: dict[str, Any], url_lease_id: str) -> tuple[str, bool] | str:
        """``(lease_id, sync)`` or the 400 error text. V vault/logical_system.go
        handleRevoke: the body's ``lease_id`` first, else the URL's; ``sync`` is a
        TypeBool field with Default: true."""
        lease_id = doc.get("lease_id") or url_lease_id
        if not isinstance(lease_id, str) or not lease_id:
            return "lease_id must be specified"
        sync = doc.get("sync", True)
        if isinstance(sync, str):
            sync = sync.lower() not in ("false", "0", "f")
        return lease_id, bool(sync)

    def _revoke(self, lease_id: str, sync: bool, now: float) -> Answer:
        """sync: V ExpirationManager.Revoke -> revokeCommon: the engine revokes first; its
        error is 400 "failed to revoke entry: resp: … err: …" (handleErrorNoReadOnlyForward
        -> ErrInvalidRequest) and the lease stays; success -> 204. Not sync: LazyRevoke ->
        202 (V queues and retries a failing engine; the stand-in revokes at once, and an
        injected engine failure leaves the lease live). An unknown lease is no error
        ("If there is no entry, nothing to revoke"): 204 / 202."""
        self.revoked_leases.append(lease_id)
        lease = self._leases.get(lease_id)
        if lease is not None and self._live(lease, now):
            if self._revoke_failures:
                error = self._revoke_failures.pop(0)
                if sync:
                    return 400, {"errors": [f"failed to revoke entry: resp: (*logical.Response)(nil) "
                                            f"err: {error}"]}
                return 202, None
            lease.revoked_at = now
            lease.revoked_why = "request"
        return (204, None) if sync else (202, None)

    def _list_leases(self, prefix: str, now: float) -> Answer:
        keys: set[str] = set()
        for lease_id, lease in self._leases.items():
            if not lease_id.startswith(prefix) or not self._live(lease, now):
                continue
            rest = lease_id[len(prefix):]
            head, sep, _ = rest.partition("/")
            keys.add(head + sep)
        if not keys:
            return 404, {"errors": []}
        return 200, self._envelope(data={"keys": sorted(keys)})

    def _lookup_lease(self, doc: dict[str, Any], now: float) -> Answer:
        lease_id = doc.get("lease_id")
        if not isinstance(lease_id, str) or not lease_id:
            return 400, {"errors": ["missing lease ID"]}
        lease = self._leases.get(lease_id)
        if lease is None or not self._live(lease, now):
            return 400, {"errors": ["invalid lease"]}

        def rfc3339(ts: float) -> str:
            # Vault writes nanoseconds and an offset: 2017-04-30T10:18:11.228946471-04:00
            dt = datetime.datetime.fromtimestamp(ts, datetime.UTC)
            return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond:06d}123Z"

        left = lease.expires_at - now
        return 200, self._envelope(data={
            "id": lease.lease_id, "issue_time": rfc3339(lease.issued_wall),
            "expire_time": rfc3339(time.time() + left), "last_renewal": None,
            "renewable": True, "ttl": int(left),
        })

    # ---- KV v2

    def _kv_write(self, mount: str, path: str, data: dict[str, Any]) -> int:
        """A new version. KV path_data.go KeyMetadata.AddVersion: current_version + 1; once
        current - oldest >= max_versions (the key's, else the mount config's, else 10),
        the versions up to current - max_versions are dropped."""
        entry = self._kv.setdefault(mount, {}).get(path)
        stamp = _now_iso()
        if entry is None:
            entry = self._kv[mount][path] = _KvSecret(created=stamp)
        entry.current += 1
        entry.versions[entry.current] = _KvVersion(data=data, created=stamp)
        entry.updated = stamp
        config = self._kv_config.setdefault(mount, _KvConfig())
        max_versions = max(entry.max_versions, config.max_versions) or 10
        if entry.current - entry.oldest >= max_versions:
            drop_to = entry.current - max_versions
            for v in range(entry.oldest, drop_to + 1):
                entry.versions.pop(v, None)
            entry.oldest = drop_to + 1
        return entry.current

    def _metadata(self, entry: _KvSecret, version: int) -> dict[str, Any]:
        ver = entry.versions[version]
        return {"created_time": ver.created, "custom_metadata": None,
                "deletion_time": ver.deletion_time, "destroyed": ver.destroyed, "version": version}

    def _kv_read(self, mount: str, path: str, query: dict[str, list[str]]) -> Answer:
        """KV path_data.go pathDataRead: no metadata or no such version -> nil -> 404
        {"errors": []} (V sdk/logical/response_util.go RespondErrorCommon); a deleted or
        destroyed version -> logical.RespondWithStatusCode(resp, 404): the whole envelope
        with data null and the version's metadata, and no "errors" key."""
        entry = self._kv[mount].get(path)
        try:
            version = int(query.get("version", ["0"])[0])
        except ValueError:
            return 400, {"errors": ["invalid version"]}
        if entry is None:
            return 404, {"errors": []}
        version = version if version > 0 else entry.current
        ver = entry.versions.get(version)
        if ver is None:
            return 404, {"errors": []}
        doc = self._envelope(data={"data": None, "metadata": self._metadata(entry, version)})
        if ver.deletion_time or ver.destroyed or ver.data is None:
            return 404, doc
        doc["data"]["data"] = dict(ver.data)
        return 200, doc

    def _kv_post(self, mount: str, path: str, doc: dict[str, Any]) -> Answer:
        """KV path_data.go pathDataWrite + validateCheckAndSetOption: ``options.cas`` is
        WeakDecoded to an int and must equal the metadata's current_version (which counts
        deleted and destroyed versions; 0 only when there is no metadata), else 400
        "check-and-set parameter did not match the current version"; without cas and
        with cas_required (mount config or key metadata): 400 "check-and-set parameter
        required for this call"."""
        data = doc.get("data")
        if not isinstance(data, dict):
            return 400, {"errors": ["no data provided"]}
        options = doc.get("options") or {}
        entry = self._kv[mount].get(path)
        current = 0 if entry is None else entry.current
        if isinstance(options, dict) and "cas" in options:
            cas = _weak_int(options["cas"])
            if cas is None:
                return 400, {"errors": ["error parsing check-and-set parameter"]}
            if cas != current:
                return 400, {"errors": ["check-and-set parameter did not match the current version"]}
        elif self._kv_config[mount].cas_required or (entry is not None and entry.cas_required):
            return 400, {"errors": ["check-and-set parameter required for this call"]}
        version = self._kv_write(mount, path, dict(data))
        return 200, self._envelope(data=self._metadata(self._kv[mount][path], version))

    def _kv_delete(self, entry: _KvSecret, versions: list[int]) -> None:
        # KV path_delete.go pathDeleteWrite / path_data.go pathDataDelete: sets
        # DeletionTime (a missing, destroyed or already deleted version is skipped);
        # current_version is unchanged.
        for v in versions:
            ver = entry.versions.get(v)
            if ver is not None and not ver.destroyed and not ver.deletion_time:
                ver.deletion_time = _now_iso()

    def _kv_destroy(self, entry: _KvSecret, versions: list[int]) -> None:
        # KV path_destroy.go: Destroyed = true and the data is gone; deletion_time stays as
        # it was ("" if never soft-deleted); current_version is unchanged.
        for v in versions:
            ver = entry.versions.get(v)
            if ver is not None:
                ver.destroyed = True
                ver.data = None

    def _kv_versions_op(self, route: str, method: str, mount: str, path: str,
                        doc: dict[str, Any]) -> Answer:
        """``DELETE data/`` (the current version), ``POST delete/``, ``POST undelete/``,
        ``PUT destroy/`` with ``versions``: 204; no metadata -> 204 too (nothing to do)."""
        entry = self._kv[mount].get(path)
        if route == "kv_delete" and method == "DELETE":
            if entry is not None:
                self._kv_delete(entry, [entry.current])
            return 204, None
        raw = doc.get("versions")
        versions = [v for v in (_weak_int(x) for x in raw) if v is not None] if isinstance(raw, list) else []
        if not versions:
            return 400, {"errors": ["No version number provided"]}
        if entry is None:
            return 204, None
        if route == "kv_delete":
            self._kv_delete(entry, versions)
        elif route == "kv_destroy":
            self._kv_destroy(entry, versions)
        else:
            # KV path_delete.go pathUndeleteWrite: clears DeletionTime unless destroyed.
            for v in versions:
                ver = entry.versions.get(v)
                if ver is not None and not ver.destroyed:
                    ver.deletion_time = ""
        return 204, None

    def _kv_metadata(self, method: str, mount: str, path: str, doc: dict[str, Any]) -> Answer:
        entry = self._kv[mount].get(path)
        if method == "DELETE":
            # KV path_metadata.go pathMetadataDelete: every version and the metadata go;
            # the next write is version 1 again (cas 0).
            self._kv[mount].pop(path, None)
            return 204, None
        if method in ("POST", "PUT"):
            if entry is None:
                entry = self._kv[mount][path] = _KvSecret(created=_now_iso())
            if "max_versions" in doc:
                entry.max_versions = _weak_int(doc["max_versions"]) or 0
            if "cas_required" in doc:
                entry.cas_required = bool(doc["cas_required"])
            return 204, None
        if method == "LIST":
            prefix = path.rstrip("/") + "/"
            keys = {k[len(prefix):].split("/")[0] + ("/" if "/" in k[len(prefix):] else "")
                    for k in self._kv[mount] if k.startswith(prefix)}
            return (200, self._envelope(data={"keys": sorted(keys)})) if keys else (404, {"errors": []})
        if entry is None:
            return 404, {"errors": []}
        return 200, self._envelope(data={
            "cas_required": entry.cas_required, "created_time": entry.created,
            "current_version": entry.current, "delete_version_after": "0s",
            "max_versions": entry.max_versions, "oldest_version": entry.oldest,
            "updated_time": entry.updated, "custom_metadata": None,
            "versions": {str(v): {"created_time": ver.created, "deletion_time": ver.deletion_time,
                                  "destroyed": ver.destroyed} for v, ver in entry.versions.items()},
        })

    def _kv_config_op(self, method: str, mount: str, doc: dict[str, Any]) -> Answer:
        config = self._kv_config[mount]
        if method in ("POST", "PUT"):
            if "max_versions" in doc:
                config.max_versions = _weak_int(doc["max_versions"]) or 0
            if "cas_required" in doc:
                config.cas_required = bool(doc["cas_required"])
            return 204, None
        return 200, self._envelope(data={"cas_required": config.cas_required,
                                         "delete_version_after": "0s",
                                         "max_versions": config.max_versions})

    # ---- database engine

    def _creds(self, mount: str, role_name: str, token: Token, now: float) -> Answer:
        """A new lease, indexed under the requesting token (V vault/expiration.go Register:
        ClientToken + createIndexByToken). ``lease_duration`` is the role's TTL: for a
        service token Register does NOT cap it by the token's expiry (only batch tokens),
        so it says nothing about when the token -- and with it the lease -- dies."""
        role = self._roles[mount].get(role_name)
        if role is None:
            return 400, {"errors": [f"unknown role: {role_name}"]}
        lease = Lease(
            lease_id=f"{mount}/creds/{role_name}/{secrets.token_urlsafe(18)}",
            mount=mount, role=role_name,
            username=f"v-token-{role_name}-{secrets.token_hex(8)}",
            password="A1a-" + secrets.token_urlsafe(15),
            lease_duration=role["ttl"], issued_at=now, expires_at=now + role["ttl"],
            issued_wall=time.time(), token_id=token.id,
        )
        self._leases[lease.lease_id] = lease
        self.issued_leases.append(lease)
        return 200, self._envelope(
            lease_id=lease.lease_id, lease_duration=lease.lease_duration,
            renewable=role["renewable"],
            data={"username": lease.username, "password": lease.password},
        )


def _weak_int(value: object) -> int | None:
    """mapstructure.WeakDecode into an int, as KV's check-and-set parsing does: ints,
    floats (truncated), bools (0/1), numeric strings ("" is 0); None if not a number."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        if value == "":
            return 0
        try:
            return int(value, 0)
        except ValueError:
            return None
    return None
