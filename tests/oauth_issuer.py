"""A real OAuth2 / OpenID Connect issuer on loopback, for the test suite.

:class:`OAuthIssuer` is a small HTTP server (stdlib ``http.server`` in a background
thread) bound to ``127.0.0.1`` on a free port. It publishes

* ``{issuer}/.well-known/openid-configuration`` (OpenID Connect Discovery: ``issuer`` is
  its own URL, ``jwks_uri``, ``token_endpoint`` and the usual capability lists), and/or
* ``/.well-known/oauth-authorization-server{path}`` (RFC 8414: the well-known segment is
  inserted between host and path), per ``discovery=``,
* ``/jwks.json``: one RSA (RS256), one EC P-256 (ES256) and one Ed25519 (EdDSA) public
  key, each with a ``kid``, ``use: sig`` and ``alg``,

and keeps the private keys so tests can :meth:`~OAuthIssuer.mint` tokens, including
deliberately bad ones (any ``alg`` incl. ``none``/HS256, any ``kid``, any header, any key).
It is plain threads and blocking calls, so it works from sync tests and from trio tests
alike (the verifier under test talks to it over real sockets).

Knobs for failure tests: :meth:`rotate` (new keys and kids), :meth:`set_down` (HTTP 500
for everything, or ``refuse=True`` to close the listening socket so connections are
refused), :meth:`set_delay` (answer late), ``discovery_overrides`` (e.g. a wrong
``issuer``), :meth:`add_route` (redirects, oversized or broken bodies). :attr:`counts`
says how many JWKS and discovery requests arrived; :attr:`requests` lists every path.

Use it as a context manager (``with OAuthIssuer() as issuer:``); leaving it stops the
server, joins every thread and closes every socket (the suite runs with
``filterwarnings = error``, so a leaked socket fails the test)::

    with OAuthIssuer() as issuer:
        token = issuer.mint(issuer.claims(scope="read write"), alg="ES256")
        server_config = {"oauth2": issuer.oauth2()}   # issuer + audience (+ jwks_uri=...)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import sys
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, Self

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

DEFAULT_AUDIENCE = "https://content-api.example.test"
DEFAULT_SUBJECT = "alice@example.test"
_ALGORITHMS: dict[str, Any] = jwt.algorithms.get_default_algorithms()

Discovery = Literal["oidc", "oauth", "both", "none"]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# RSA-2048 generation costs ~0.1 s; every issuer makes one per rotation. Keys come
# round-robin from a pool made once per process: any 16 keys in a row are distinct,
# more than one test makes.
_RSA_POOL_SIZE = 16
_rsa_pool: list[Any] = []
_rsa_next = 0
_rsa_lock = threading.Lock()


def _pooled_rsa_key() -> Any:
    global _rsa_next
    with _rsa_lock:
        if len(_rsa_pool) < _RSA_POOL_SIZE:
            _rsa_pool.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
            return _rsa_pool[-1]
        key = _rsa_pool[_rsa_next % _RSA_POOL_SIZE]
        _rsa_next += 1
        return key


def _new_private_key(alg: str) -> Any:
    if alg == "RS256":
        return _pooled_rsa_key()
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"no key type for {alg}")


def public_jwk(private_key: Any, *, kid: str, alg: str) -> dict[str, Any]:
    """The public JWK of ``private_key``, as a real issuer publishes it."""
    jwk: dict[str, Any] = _ALGORITHMS[alg].to_jwk(private_key.public_key(), as_dict=True)
    jwk.pop("key_ops", None)
    jwk.update({"kid": kid, "use": "sig", "alg": alg})
    return jwk


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins handler threads: nothing outlives stop()
    issuer: OAuthIssuer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is expected in these tests; stay quiet.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: nothing left open

    def do_GET(self) -> None:
        status, headers, body = self.server.issuer._respond(self.path)
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(min(length, 1 << 20))
        status, headers, body = self.server.issuer._respond_post(self.path, dict(self.headers), data)
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass


class OAuthIssuer:
    """An OAuth2/OIDC issuer on ``http://127.0.0.1:<free port>{path}`` (see the module doc).

    ``path`` gives the issuer a path component (``/realms/test``) to exercise discovery
    URL rules; ``discovery`` picks which metadata documents are served; ``audience`` is
    the default ``aud`` of :meth:`claims`; ``clock`` (unix seconds) is used for ``iat``/
    ``exp`` defaults so tests with an injected clock mint consistent tokens.
    """

    def __init__(
        self,
        *,
        path: str = "",
        audience: str = DEFAULT_AUDIENCE,
        discovery: Discovery = "oidc",
        clock: Callable[[], float] = time.time,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.tls = tls  # (certificate, key) PEM files: serve https
        if path and (not path.startswith("/") or path.endswith("/")):
            raise ValueError("path must start with '/' and not end with one")
        self.path = path
        self.audience = audience
        self.discovery: Discovery = discovery
        self.clock = clock
        self.discovery_overrides: dict[str, Any] = {}
        self.extra_jwks: list[Any] = []  # appended to /jwks.json as is
        self.requests: list[str] = []
        self._counts = {"jwks": 0, "discovery": 0, "oidc": 0, "oauth": 0, "other": 0}
        self._routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._delay = 0.0
        self._down = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._generation = 0
        self._private: dict[str, tuple[str, Any]] = {}  # kid -> (alg, private key), ever made
        self._published: list[dict[str, Any]] = []  # public JWKs in /jwks.json
        self.kids: dict[str, str] = {}  # alg -> current kid
        # The token endpoint ({issuer}/token, POST): see _respond_post.
        self.clients: dict[str, str] = {}  # client_id -> client_secret
        self.token_mode: str | None = None  # invalid_grant | invalid_target | slow | down | ...
        self.token_delay = 5.0  # token_mode "slow" answers this late
        self.token_expires_in: int | None = 300
        self.token_audiences: set[str] | None = None  # others: invalid_target
        self.token_requests: list[dict[str, str]] = []  # each form (tests only: in memory)
        self.token_response_overrides: dict[str, Any] = {}
        self.rotate()

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
        server.issuer = self
        if self.tls is not None:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self._port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"oauth-issuer-{self._port}", daemon=True,
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

    # ------------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self._port}"

    @property
    def issuer(self) -> str:
        return self.base_url + self.path

    @property
    def jwks_uri(self) -> str:
        return self.base_url + "/jwks.json"

    @property
    def oidc_path(self) -> str:
        return self.path + "/.well-known/openid-configuration"

    @property
    def oauth_path(self) -> str:
        return "/.well-known/oauth-authorization-server" + self.path

    def oauth2(self, **overrides: Any) -> dict[str, Any]:
        """An ``oauth2:`` server config section (plain dict) for this issuer."""
        section: dict[str, Any] = {"issuer": self.issuer, "audience": self.audience}
        section.update(overrides)
        return section

    # ------------------------------------------------------------------ keys and tokens

    def rotate(self, *, keep_old: bool = False) -> dict[str, str]:
        """Make new RS256/ES256/EdDSA keys with new kids; returns alg -> new kid.

        With ``keep_old`` the previous public keys stay in the JWKS (an overlap
        rotation); otherwise they are withdrawn. Old private keys stay available to
        :meth:`mint` by ``kid`` either way.
        """
        with self._lock:
            self._generation += 1
            fresh: list[dict[str, Any]] = []
            for alg in ("RS256", "ES256", "EdDSA"):
                kid = f"{alg.lower()}-{self._generation}-{secrets.token_hex(3)}"
                key = _new_private_key(alg)
                self._private[kid] = (alg, key)
                self.kids[alg] = kid
                fresh.append(public_jwk(key, kid=kid, alg=alg))
            self._published = fresh + (self._published if keep_old else [])
            return dict(self.kids)

    def private_key(self, alg: str = "RS256", kid: str | None = None) -> Any:
        return self._private[kid or self.kids[alg]][1]

    def public_pem(self, alg: str = "RS256") -> bytes:
        """The current public key of ``alg`` as PEM (SubjectPublicKeyInfo)."""
        return bytes(
            self.private_key(alg)
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    def jwks(self) -> dict[str, Any]:
        """The JWKS currently published at ``/jwks.json``."""
        with self._lock:
            extra = [dict(k) if isinstance(k, dict) else k for k in self.extra_jwks]
            return {"keys": [dict(k) for k in self._published] + extra}

    def write_jwks(self, path: Path) -> Path:
        """Write the current JWKS to ``path`` (for ``jwks_file`` configurations)."""
        path.write_text(json.dumps(self.jwks(), indent=1))
        return path

    def claims(self, *, now: float | None = None, ttl: int = 300, **overrides: Any) -> dict[str, Any]:
        """Default access-token claims: iss, aud, sub, scope, client_id, iat, exp = iat + ttl.

        An override of ``None`` removes the claim (``claims(exp=None)``: no ``exp``).
        """
        iat = int(self.clock() if now is None else now)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": DEFAULT_SUBJECT,
            "scope": "articles:read",
            "client_id": "test-agent",
            "iat": iat,
            "exp": iat + ttl,
            "jti": secrets.token_hex(8),
        }
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def mint(
        self,
        claims: Mapping[str, Any],
        *,
        alg: str = "RS256",
        kid: str | None = None,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """A compact JWS over ``claims``.

        ``kid`` defaults to the current key of ``alg``; the signing key defaults to the
        private key of ``kid`` (if this issuer made it) or the current key of ``alg``.
        ``key`` may be any key pyjwt's algorithm accepts, or bytes for HS*. Without a key
        (``alg="none"``, or an alg this issuer has no key for) the signature is empty. ``headers`` are merged into the header; a ``None``
        value removes that member (``headers={"kid": None}``).
        """
        header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
        if kid is None:
            kid = self.kids.get(alg)
        if kid is not None:
            header["kid"] = kid
        for name, value in (headers or {}).items():
            if value is None:
                header.pop(name, None)
            else:
                header[name] = value
        if key is None and alg in self.kids:
            known = self._private.get(kid or "")
            key = known[1] if known is not None and known[0] == alg else self.private_key(alg)
        return self.sign(_json(header), _json(dict(claims)), alg=alg, key=key)

    @staticmethod
    def sign(header: bytes, payload: bytes, *, alg: str, key: Any) -> str:
        """Sign raw header and payload JSON bytes (for tokens :meth:`mint` cannot express)."""
        signing_input = f"{b64url(header)}.{b64url(payload)}".encode("ascii")
        if key is None:  # alg none, or an algorithm nobody signs with: no signature
            signature = b""
        elif alg.startswith("HS"):
            # Done by hand: pyjwt refuses PEM public keys as HMAC secrets, which is
            # exactly the key-confusion attack the tests need to mount.
            digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
            signature = hmac.new(bytes(key), signing_input, digest[alg]).digest()
        else:
            signature = _ALGORITHMS[alg].sign(signing_input, key)
        return f"{signing_input.decode('ascii')}.{b64url(signature)}"

    # ------------------------------------------------------------------ failure knobs

    def set_down(self, down: bool, *, refuse: bool = False) -> None:
        """Down: answer every request with HTTP 500, or with ``refuse`` close the
        listening socket (connection refused). Up again: serve (on the same port)."""
        if down and refuse:
            self._down = False
            self._unlisten()
            return
        self._down = down
        if not down and self._server is None and not self._stopping.is_set():
            self._listen(self._port)

    def set_delay(self, seconds: float) -> None:
        """Wait ``seconds`` before answering each request (cut short by :meth:`stop`)."""
        self._delay = seconds

    def add_route(
        self, path: str, *, status: int = 200, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> str:
        """Serve a fixed response at ``path``; returns its URL."""
        self._routes[path] = (status, dict(headers or {}), body)
        return self.base_url + path

    @property
    def counts(self) -> dict[str, int]:
        """Requests received: ``jwks``, ``discovery`` (``oidc`` + ``oauth``), ``other``."""
        with self._lock:
            return dict(self._counts)

    # ------------------------------------------------------------------ token endpoint

    @property
    def token_endpoint(self) -> str:
        return self.issuer + "/token"

    def token_count(self, grant: str | None = None) -> int:
        """Token requests received (of one grant_type: ``token-exchange`` matches the
        RFC 8693 URN's tail, ``client_credentials``)."""
        with self._lock:
            forms = list(self.token_requests)
        return sum(1 for f in forms if grant is None or f.get("grant_type", "").endswith(grant))

    def verify_issued(self, token: str, *, audience: str) -> dict[str, Any]:
        """The claims of a token this endpoint issued, its signature checked (ES256)."""
        header = jwt.get_unverified_header(token)
        alg, key = self._private[header["kid"]]
        return dict(jwt.decode(token, key.public_key(), algorithms=[alg], audience=audience,
                               issuer=self.issuer))

    def _subject_claims(self, token: str) -> dict[str, Any] | None:
        """A subject token's claims if this issuer signed it and it is unexpired."""
        try:
            header = jwt.get_unverified_header(token)
            alg, key = self._private[header["kid"]]
            return dict(jwt.decode(token, key.public_key(), algorithms=[alg], issuer=self.issuer,
                                   options={"verify_aud": False}, leeway=5))
        except (jwt.PyJWTError, KeyError, ValueError):
            return None

    def _client_of(self, headers: Mapping[str, str], form: dict[str, str]) -> str | None:
        """client_secret_basic (parts form-urlencoded, RFC 6749 2.3.1) or client_secret_post."""
        from urllib.parse import unquote_plus

        auth = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
        if auth.startswith("Basic "):
            try:
                raw = base64.b64decode(auth[6:], validate=True).decode()
            except ValueError:
                return None
            cid, _, secret = raw.partition(":")
            cid, secret = unquote_plus(cid), unquote_plus(secret)
        else:
            cid, secret = form.get("client_id", ""), form.get("client_secret", "")
        known = self.clients.get(cid)
        if known is None or not hmac.compare_digest(known.encode(), secret.encode()):
            return None
        return cid

    def _respond_post(self, path: str, headers: Mapping[str, str],
                      data: bytes) -> tuple[int, dict[str, str], bytes]:
        """The token endpoint: RFC 8693 token exchange and client credentials."""
        from urllib.parse import parse_qsl

        route = path.split("?", 1)[0]
        json_type = {"Content-Type": "application/json", "Cache-Control": "no-store"}
        if route in self._routes:
            return self._routes[route]
        if route != self.path + "/token":
            return 404, json_type, _json({"error": "not_found"})
        form = dict(parse_qsl(data.decode(), keep_blank_values=True))
        with self._lock:
            self.requests.append(route)
            self.token_requests.append(form)
        mode = self.token_mode
        if mode == "slow":
            self._stopping.wait(self.token_delay)
        if mode == "down" or self._down:
            return 500, {"Content-Type": "text/plain"}, b"token endpoint is down (test)\n"

        def error(code: str, status: int = 400) -> tuple[int, dict[str, str], bytes]:
            return status, json_type, _json({"error": code, "error_description": f"test: {code}"})

        client = self._client_of(headers, form)
        if client is None:
            return error("invalid_client", 401)
        if mode in ("invalid_grant", "invalid_target", "invalid_scope", "invalid_request"):
            return error(mode)
        grant = form.get("grant_type")
        audience = form.get("audience") or form.get("resource") or f"client:{client}"
        if self.token_audiences is not None and audience not in self.token_audiences:
            return error("invalid_target")
        now = int(self.clock())
        claims: dict[str, Any] = {"iss": self.issuer, "aud": audience, "iat": now,
                                  "jti": secrets.token_hex(8), "client_id": client}
        if self.token_expires_in is not None:
            claims["exp"] = now + self.token_expires_in
        if form.get("scope"):
            claims["scope"] = form["scope"]
        if grant == "urn:ietf:params:oauth:grant-type:token-exchange":
            if form.get("subject_token_type") != "urn:ietf:params:oauth:token-type:access_token":
                return error("invalid_request")
            subject = self._subject_claims(form.get("subject_token", ""))
            if subject is None:
                return error("invalid_grant")
            claims["sub"] = subject["sub"]
            claims["act"] = {"sub": client}
        elif grant == "client_credentials":
            claims["sub"] = client
        else:
            return error("unsupported_grant_type")
        body: dict[str, Any] = {
            "access_token": self.mint(claims, alg="ES256"),
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "token_type": "Bearer",
        }
        if self.token_expires_in is not None:
            body["expires_in"] = self.token_expires_in
        if form.get("scope"):
            body["scope"] = form["scope"]
        for name, value in self.token_response_overrides.items():
            if value is None:
                body.pop(name, None)
            else:
                body[name] = value
        return 200, json_type, _json(body)

    # ------------------------------------------------------------------ serving

    def _discovery_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "token_endpoint": self.issuer + "/token",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
            "grant_types_supported": ["authorization_code", "client_credentials"],
        }
        for name, value in self.discovery_overrides.items():
            if value is None:
                doc.pop(name, None)
            else:
                doc[name] = value
        return doc

    def _respond(self, path: str) -> tuple[int, dict[str, str], bytes]:
        """Runs in a handler thread."""
        route = path.split("?", 1)[0]
        with self._lock:
            self.requests.append(route)
            if route == "/jwks.json":
                self._counts["jwks"] += 1
            elif route in (self.oidc_path, self.oauth_path):
                self._counts["discovery"] += 1
                self._counts["oidc" if route == self.oidc_path else "oauth"] += 1
            else:
                self._counts["other"] += 1
        if self._delay > 0:
            self._stopping.wait(self._delay)
        if self._down:
            return 500, {"Content-Type": "text/plain"}, b"issuer is down (test)\n"
        json_type = {"Content-Type": "application/json"}
        if route in self._routes:
            return self._routes[route]
        if route == "/jwks.json":
            return 200, {"Content-Type": "application/jwk-set+json"}, _json(self.jwks())
        if route == self.oidc_path and self.discovery in ("oidc", "both"):
            return 200, json_type, _json(self._discovery_doc())
        if route == self.oauth_path and self.discovery in ("oauth", "both"):
            return 200, json_type, _json(self._discovery_doc())
        return 404, json_type, _json({"error": "not_found"})
