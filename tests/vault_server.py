"""A HashiCorp Vault API stand-in on loopback, for the test suite.

No Vault binary can be installed from the package registries these machines reach, so
the Vault backend is tested through hvac against this server. It implements only the
endpoints sidekey uses, with the request and response shapes of Vault's API docs:

* Token auth method -- https://developer.hashicorp.com/vault/api-docs/auth/token
  (``GET /v1/auth/token/lookup-self``: ``{"data": {"accessor", "creation_ttl",
  "expire_time", "id", "renewable", "ttl", ...}}``; ``POST /v1/auth/token/renew-self``
  with an optional ``increment``: ``{"auth": {"client_token", "lease_duration",
  "renewable", ...}}``)
* AppRole auth method -- https://developer.hashicorp.com/vault/api-docs/auth/approle
  ("Login with AppRole": ``POST /v1/auth/{mount}/login`` with ``role_id`` and
  ``secret_id``; ``{"auth": {"client_token", "accessor", "policies", "lease_duration",
  "renewable"}, "data": null, "lease_id": "", ...}``)
* KV secrets engine v2 -- https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2
  ("Read Secret Version": ``GET /v1/{mount}/data/{path}?version=N`` ->
  ``{"data": {"data": {...}, "metadata": {"created_time", "custom_metadata",
  "deletion_time", "destroyed", "version"}}}``; "Create/Update Secret": ``POST`` with
  ``{"options": {"cas": N}, "data": {...}}`` -> ``{"data": {metadata}}``; "Read Secret
  Metadata": ``GET /v1/{mount}/metadata/{path}`` -> ``current_version``, ``versions``)
* Database secrets engine -- https://developer.hashicorp.com/vault/api-docs/secret/databases
  ("Generate Credentials": ``GET /v1/{mount}/creds/{role}`` -> ``{"lease_id",
  "lease_duration", "renewable", "data": {"username", "password"}}``; an unknown role is
  ``400 {"errors": ["unknown role: NAME"]}``)
* ``/sys/leases`` -- https://developer.hashicorp.com/vault/api-docs/system/leases
  ("Revoke lease": ``PUT``/``POST /v1/sys/leases/revoke`` with ``lease_id`` and
  optional ``sync``). The page gives no status code; Vault's handler
  (``vault/logical_system.go`` ``handleRevoke``, ``vault/expiration.go``) answers a
  queued revocation with ``202 Accepted`` and a ``sync: true`` one with ``204``, and a
  lease it does not know (expired, already revoked) is not an error ("If there is no
  entry, nothing to revoke"): the same 202/204.
  "List leases": ``LIST /v1/sys/leases/lookup/{prefix}`` (needs ``sudo``) ->
  ``{"data": {"keys": [...]}}``, the keys relative to the prefix (a deeper level as
  ``"name/"``); an empty listing is Vault's usual ``404 {"errors": []}``. "Read lease":
  ``PUT``/``POST /v1/sys/leases/lookup`` with ``lease_id`` -> ``{"data": {"id",
  "issue_time", "expire_time", "last_renewal", "renewable", "ttl"}}`` (RFC 3339 times
  with nanoseconds, as Vault writes them); an unknown, expired or revoked lease is
  ``400 {"errors": ["invalid lease"]}``.

Errors are ``{"errors": [...]}``: ``403 ["permission denied"]`` for a missing, unknown,
expired or other-namespace ``X-Vault-Token`` (and for paths :meth:`VaultServer.deny`
lists), ``404 {"errors": []}`` for a KV secret (or version) that does not exist,
``503 ["Vault is sealed"]`` when sealed. ``X-Vault-Namespace`` must match the namespace
the token was made in. Login paths do not look at ``X-Vault-Token``.

Knobs for tests: :meth:`~VaultServer.put_secret`, :meth:`~VaultServer.add_approle`,
:meth:`~VaultServer.create_token` (TTL, renewable, max TTL), :meth:`~VaultServer.expire_token`,
:meth:`~VaultServer.add_dynamic_role`, :meth:`~VaultServer.down` / :meth:`~VaultServer.up`
(close / reopen the listener: connection refused), :meth:`~VaultServer.set_delay` (answer
late, per route), :meth:`~VaultServer.fail` (inject error answers), :meth:`~VaultServer.deny`,
:meth:`~VaultServer.set_answer_delay` (create, then answer late: a crash of the client in
between leaves a credential it never saw), :meth:`~VaultServer.set_sealed`;
:attr:`~VaultServer.counts` per route,
:attr:`~VaultServer.log` of every request (method, path, route; never a token),
:attr:`~VaultServer.issued_leases`, :attr:`~VaultServer.revoked_leases`,
:meth:`~VaultServer.live_leases`.

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
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

Answer = tuple[int, dict[str, Any] | None]

_DURATION_RE = re.compile(r"^(\d+)([smh]?)$")


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


@dataclass
class Token:
    id: str
    accessor: str
    ttl: int  # the TTL each grant (issue, renewal) gives; 0: never expires (root)
    renewable: bool
    max_ttl: int  # 0: no max
    namespace: str
    policies: list[str]
    path: str
    issued_at: float
    expires_at: float | None

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


@dataclass
class _KvSecret:
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)
    created: dict[int, str] = field(default_factory=dict)
    current: int = 0


@dataclass
class _Fault:
    status: int
    errors: list[str]
    times: int


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
        status, doc = self.server.vault._respond(self.command, self.path, dict(self.headers), body)
        payload = b"" if doc is None else json.dumps(doc).encode()
        try:
            self.send_response(status)
            if doc is not None:
                self.send_header("Content-Type", "application/json")
            if status != 204:
                self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")
            self.end_headers()
            if status != 204:
                self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_GET = do_POST = do_PUT = do_DELETE = do_LIST = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


class VaultServer:
    """A Vault API stand-in on ``http://127.0.0.1:<free port>`` (see the module doc).

    ``namespace`` is the namespace tokens are made in by default (``None``: the root
    namespace, no ``X-Vault-Namespace`` header). KV v2 is mounted at ``kv_mounts``,
    AppRole at ``approle``, the database engine at ``database``.
    """

    def __init__(
        self,
        *,
        namespace: str | None = None,
        kv_mounts: tuple[str, ...] = ("secret",),
    ) -> None:
        self.namespace = (namespace or "").strip("/")
        self.log: list[tuple[str, str, str]] = []  # (method, path, route)
        self.issued_leases: list[Lease] = []
        self.revoked_leases: list[str] = []  # every revocation request's lease id, in order
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._counts: dict[str, int] = {}
        self._delays: dict[str | None, float] = {}
        self._answer_delays: dict[str, float] = {}
        self._holds: dict[str, threading.Event] = {}
        self._faults: dict[str, _Fault] = {}
        self._denied: list[str] = []
        self._sealed = False
        self._tokens: dict[str, Token] = {}
        self._approles: dict[str, dict[str, dict[str, Any]]] = {"approle": {}}
        self._kv: dict[str, dict[str, _KvSecret]] = {m: {} for m in kv_mounts}
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
        """Answer the next ``times`` requests of ``route`` with ``status`` and ``errors``."""
        with self._lock:
            self._faults[route] = _Fault(status, list(errors or ["internal error"]), times)

    def deny(self, path_prefix: str) -> None:
        """Answer 403 permission denied to any token for paths under ``path_prefix``
        (relative to /v1/): a policy that does not grant them."""
        with self._lock:
            self._denied.append(path_prefix.strip("/"))

    def set_sealed(self, sealed: bool) -> None:
        with self._lock:
            self._sealed = sealed

    # ------------------------------------------------------------------ tokens, roles, data

    def create_token(
        self,
        *,
        ttl: int = 3600,
        renewable: bool = True,
        max_ttl: int = 0,
        namespace: str | None = None,
        policies: list[str] | None = None,
        path: str = "auth/token/create",
    ) -> str:
        """A new token (``ttl=0``: never expires, like a root token)."""
        with self._lock:
            return self._new_token(ttl=ttl, renewable=renewable, max_ttl=max_ttl,
                                   namespace=namespace, policies=policies, path=path).id

    def _new_token(self, *, ttl: int, renewable: bool, max_ttl: int, namespace: str | None,
                   policies: list[str] | None, path: str) -> Token:
        now = time.monotonic()
        token = Token(
            id="hvs." + secrets.token_urlsafe(24),
            accessor=secrets.token_urlsafe(18),
            ttl=ttl,
            renewable=renewable,
            max_ttl=max_ttl,
            namespace=self.namespace if namespace is None else namespace.strip("/"),
            policies=list(policies or ["default"]),
            path=path,
            issued_at=now,
            expires_at=now + ttl if ttl > 0 else None,
        )
        self._tokens[token.id] = token
        return token

    def token(self, token_id: str) -> Token:
        with self._lock:
            return self._tokens[token_id]

    def tokens(self) -> list[Token]:
        with self._lock:
            return list(self._tokens.values())

    def expire_token(self, token_id: str) -> None:
        """Make ``token_id`` expired now (Vault then answers 403 to it)."""
        with self._lock:
            self._tokens[token_id].expires_at = time.monotonic() - 1

    def expire_all_tokens(self) -> None:
        with self._lock:
            for token in self._tokens.values():
                if token.id != self.root_token:
                    token.expires_at = time.monotonic() - 1

    def set_token_ttl(self, token_id: str, seconds: float) -> None:
        """Leave ``token_id`` ``seconds`` to live (its renewal grant is unchanged)."""
        with self._lock:
            self._tokens[token_id].expires_at = time.monotonic() + seconds

    def add_approle(
        self,
        *,
        mount: str = "approle",
        role_id: str | None = None,
        secret_id: str | None = None,
        token_ttl: int = 3600,
        token_max_ttl: int = 0,
        renewable: bool = True,
    ) -> tuple[str, str]:
        """An AppRole whose logins make tokens with these settings; returns
        ``(role_id, secret_id)``."""
        role_id = role_id or secrets.token_hex(16)
        secret_id = secret_id or secrets.token_hex(16)
        with self._lock:
            self._approles.setdefault(mount, {})[role_id] = {
                "secret_id": secret_id, "ttl": token_ttl, "max_ttl": token_max_ttl,
                "renewable": renewable,
            }
        return role_id, secret_id

    def put_secret(self, mount: str, path: str, data: dict[str, Any]) -> int:
        """Write a new KV v2 version; returns its number."""
        with self._lock:
            return self._kv_write(mount, path.strip("/"), dict(data), None)[1]

    def secret_versions(self, mount: str, path: str) -> dict[int, dict[str, Any]]:
        with self._lock:
            entry = self._kv.get(mount, {}).get(path.strip("/"))
            return {} if entry is None else {v: dict(d) for v, d in entry.versions.items()}

    def add_dynamic_role(self, role: str = "readonly", *, mount: str = "database",
                         ttl: int = 3600, renewable: bool = True) -> None:
        with self._lock:
            self._roles.setdefault(mount, {})[role] = {"ttl": ttl, "renewable": renewable}

    def live_leases(self) -> set[str]:
        """Issued, not revoked, not expired."""
        now = time.monotonic()
        with self._lock:
            return {lid for lid, le in self._leases.items()
                    if le.revoked_at is None and le.expires_at > now}

    def lease(self, lease_id: str) -> Lease:
        with self._lock:
            return self._leases[lease_id]

    @property
    def counts(self) -> dict[str, int]:
        """Requests received per route: ``lookup_self``, ``renew_self``, ``login``,
        ``kv_read``, ``kv_write``, ``kv_metadata``, ``creds``, ``revoke``, ``list_leases``,
        ``lookup_lease``, ``other``."""
        with self._lock:
            return dict(self._counts)

    # ------------------------------------------------------------------ serving

    def _route(self, method: str, rel: str) -> tuple[str, dict[str, str]]:
        """Which route ``rel`` (the path after /v1/) is, and its parameters."""
        parts = rel.split("/")
        if rel == "auth/token/lookup-self":
            return "lookup_self", {}
        if rel == "auth/token/renew-self":
            return "renew_self", {}
        if len(parts) == 3 and parts[0] == "auth" and parts[2] == "login":
            return "login", {"mount": parts[1]}
        if rel == "sys/leases/revoke" or rel.startswith("sys/leases/revoke/"):
            return "revoke", {"url_lease_id": rel[len("sys/leases/revoke/"):]}
        if rel == "sys/leases/lookup" and method != "LIST":
            return "lookup_lease", {}
        if rel.startswith("sys/leases/lookup"):
            # Vault's handler (logical_system.go, handleLeaseLookupList) lists under the
            # prefix with a "/" appended when missing; the path has lost it here anyway.
            prefix = rel[len("sys/leases/lookup"):].strip("/")
            return "list_leases", {"prefix": prefix + "/" if prefix else ""}
        if len(parts) >= 3 and parts[0] in self._kv and parts[1] in ("data", "metadata"):
            kind = "kv_metadata" if parts[1] == "metadata" else (
                "kv_read" if method == "GET" else "kv_write")
            return kind, {"mount": parts[0], "path": "/".join(parts[2:])}
        if len(parts) == 3 and parts[0] in self._roles and parts[1] == "creds":
            return "creds", {"mount": parts[0], "role": parts[2]}
        return "other", {}

    def _respond(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> Answer:
        """Runs in a handler thread."""
        answer = self._answer(method, raw_path, headers, body)
        with self._lock:
            late = self._answer_delays.get(self._route(method, self._rel(raw_path))[0], 0.0)
        if late > 0:
            self._stopping.wait(late)
        return answer

    @staticmethod
    def _rel(raw_path: str) -> str:
        return urllib.parse.unquote(urllib.parse.urlsplit(raw_path).path).removeprefix("/v1/").strip("/")

    def _answer(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> Answer:
        url = urllib.parse.urlsplit(raw_path)
        path = urllib.parse.unquote(url.path)
        query = urllib.parse.parse_qs(url.query)
        rel = path.removeprefix("/v1/").strip("/")
        if method == "GET" and query.get("list") == ["true"]:
            method = "LIST"  # Vault takes GET ?list=true for LIST
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
            if self._sealed:
                return 503, {"errors": ["Vault is sealed"]}
            fault = self._faults.get(route)
            if fault is not None and fault.times > 0:
                fault.times -= 1
                return fault.status, {"errors": fault.errors}
            namespace = headers.get("x-vault-namespace", "").strip("/")
            if route == "login":
                return self._login(params["mount"], namespace, doc)
            token = self._tokens.get(headers.get("x-vault-token", ""))
            now = time.monotonic()
            if (
                token is None
                or (token.expires_at is not None and token.expires_at <= now)
                or token.namespace != namespace
                or any(rel == d or rel.startswith(d + "/") for d in self._denied)
            ):
                return 403, {"errors": ["permission denied"]}
            if route == "lookup_self" and method == "GET":
                return 200, self._lookup(token, now)
            if route == "renew_self" and method in ("POST", "PUT"):
                return self._renew(token, doc, now)
            if route == "revoke" and method in ("POST", "PUT"):
                return self._revoke(doc, params["url_lease_id"], now)
            if route == "list_leases" and method == "LIST":
                return self._list_leases(params["prefix"], now)
            if route == "lookup_lease" and method in ("POST", "PUT"):
                return self._lookup_lease(doc, now)
            if route == "kv_read":
                return self._kv_read(params["mount"], params["path"], query)
            if route == "kv_write" and method in ("POST", "PUT"):
                return self._kv_post(params["mount"], params["path"], doc)
            if route == "kv_metadata" and method == "GET":
                return self._kv_metadata(params["mount"], params["path"])
            if route == "creds" and method == "GET":
                return self._creds(params["mount"], params["role"], now)
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

    def _auth_doc(self, token: Token, now: float) -> dict[str, Any]:
        return {
            "client_token": token.id, "accessor": token.accessor, "policies": token.policies,
            "token_policies": token.policies, "metadata": None,
            "lease_duration": token.remaining(now), "renewable": token.renewable,
            "entity_id": "", "token_type": "service", "orphan": True,
        }

    def _lookup(self, token: Token, now: float) -> dict[str, Any]:
        expire_time = None
        if token.expires_at is not None:
            expire_time = (datetime.datetime.now(datetime.UTC)
                           + datetime.timedelta(seconds=token.expires_at - now)).isoformat()
        return self._envelope(data={
            "accessor": token.accessor, "creation_time": int(time.time()),
            "creation_ttl": token.ttl, "display_name": "token", "entity_id": "",
            "expire_time": expire_time, "explicit_max_ttl": token.max_ttl, "id": token.id,
            "identity_policies": [], "issue_time": _now_iso(), "meta": None, "num_uses": 0,
            "orphan": True, "path": token.path, "policies": token.policies,
            "renewable": token.renewable, "ttl": token.remaining(now),
        })

    def _renew(self, token: Token, doc: dict[str, Any], now: float) -> Answer:
        if not token.renewable or token.expires_at is None:
            return 400, {"errors": ["lease is not renewable"]}
        grant = token.ttl
        increment = _seconds(doc.get("increment")) if doc.get("increment") else None
        if increment:
            grant = min(grant, increment)
        if token.max_ttl:
            grant = min(grant, int(token.issued_at + token.max_ttl - now))
        token.expires_at = now + max(grant, 0)
        return 200, self._envelope(auth=self._auth_doc(token, now))

    def _login(self, mount: str, namespace: str, doc: dict[str, Any]) -> Answer:
        roles = self._approles.get(mount)
        if roles is None:
            return 404, {"errors": [f'no handler for route "auth/{mount}/login". route entry not found.']}
        role = roles.get(str(doc.get("role_id", "")))
        if role is None or doc.get("secret_id") != role["secret_id"]:
            return 400, {"errors": ["invalid role or secret ID"]}
        token = self._new_token(
            ttl=role["ttl"], renewable=role["renewable"], max_ttl=role["max_ttl"],
            namespace=namespace, policies=None, path=f"auth/{mount}/login",
        )
        return 200, self._envelope(auth=self._auth_doc(token, time.monotonic()))

    def _revoke(self, doc: dict[str, Any], url_lease_id: str, now: float) -> Answer:
        lease_id = doc.get("lease_id") or url_lease_id
        if not isinstance(lease_id, str) or not lease_id:
            return 400, {"errors": ["lease_id must be specified"]}
        self.revoked_leases.append(lease_id)
        lease = self._leases.get(lease_id)
        if lease is not None and lease.revoked_at is None:
            lease.revoked_at = now
        # Known or not, Vault answers the same: 204 for sync, 202 (queued) otherwise.
        return (204, None) if doc.get("sync") else (202, None)

    def _live(self, lease: Lease, now: float) -> bool:
        return lease.revoked_at is None and lease.expires_at > now

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

    def _kv_write(self, mount: str, path: str, data: dict[str, Any], cas: int | None) -> tuple[bool, int]:
        entry = self._kv.setdefault(mount, {}).setdefault(path, _KvSecret())
        if cas is not None and cas != entry.current:
            return False, entry.current
        entry.current += 1
        entry.versions[entry.current] = data
        entry.created[entry.current] = _now_iso()
        return True, entry.current

    def _metadata(self, entry: _KvSecret, version: int) -> dict[str, Any]:
        return {"created_time": entry.created[version], "custom_metadata": None,
                "deletion_time": "", "destroyed": False, "version": version}

    def _kv_read(self, mount: str, path: str, query: dict[str, list[str]]) -> Answer:
        entry = self._kv[mount].get(path)
        try:
            version = int(query.get("version", ["0"])[0])
        except ValueError:
            return 400, {"errors": ["invalid version"]}
        if entry is None or entry.current == 0:
            return 404, {"errors": []}
        version = version or entry.current
        if version not in entry.versions:
            return 404, {"errors": []}
        return 200, self._envelope(data={"data": dict(entry.versions[version]),
                                         "metadata": self._metadata(entry, version)})

    def _kv_post(self, mount: str, path: str, doc: dict[str, Any]) -> Answer:
        data = doc.get("data")
        if not isinstance(data, dict):
            return 400, {"errors": ["no data provided"]}
        options = doc.get("options") or {}
        cas = options.get("cas") if isinstance(options, dict) else None
        ok, version = self._kv_write(mount, path, data, cas if isinstance(cas, int) else None)
        if not ok:
            return 400, {"errors": ["check-and-set parameter did not match the current version"]}
        return 200, self._envelope(data=self._metadata(self._kv[mount][path], version))

    def _kv_metadata(self, mount: str, path: str) -> Answer:
        entry = self._kv[mount].get(path)
        if entry is None or entry.current == 0:
            return 404, {"errors": []}
        return 200, self._envelope(data={
            "cas_required": False, "created_time": entry.created[min(entry.versions)],
            "current_version": entry.current, "delete_version_after": "0s", "max_versions": 0,
            "oldest_version": min(entry.versions), "updated_time": entry.created[entry.current],
            "custom_metadata": None,
            "versions": {str(v): {"created_time": entry.created[v], "deletion_time": "",
                                  "destroyed": False} for v in entry.versions},
        })

    def _creds(self, mount: str, role_name: str, now: float) -> Answer:
        role = self._roles[mount].get(role_name)
        if role is None:
            return 400, {"errors": [f"unknown role: {role_name}"]}
        lease = Lease(
            lease_id=f"{mount}/creds/{role_name}/{secrets.token_urlsafe(18)}",
            mount=mount, role=role_name,
            username=f"v-token-{role_name}-{secrets.token_hex(8)}",
            password="A1a-" + secrets.token_urlsafe(15),
            lease_duration=role["ttl"], issued_at=now, expires_at=now + role["ttl"],
            issued_wall=time.time(),
        )
        self._leases[lease.lease_id] = lease
        self.issued_leases.append(lease)
        return 200, self._envelope(
            lease_id=lease.lease_id, lease_duration=lease.lease_duration,
            renewable=role["renewable"],
            data={"username": lease.username, "password": lease.password},
        )
