"""The example's upstream services, as separate processes would run them in production:
a demo identity provider's token endpoint and the HTTPS APIs two of the tools call.

    python upstreams.py --keys DIR [--init] [--idp-port 8768] [--api-port 8767]

- **IdP** (``https://localhost:8768/token``): OAuth 2.0 Token Exchange (RFC 8693) for
  the sidekey daemon (client ``sidekey``, ``client_secret_basic``). It takes a user's
  access token from the quickstart's demo issuer (``DIR/demo-issuer.pem``; this IdP *is*
  that issuer) and issues a short-lived token for ``https://metrics.example.com`` with
  the user's ``sub``: what ``query_metrics`` gets in its lease under the example's
  config, instead of a shared database password.
- **APIs** (``https://localhost:8767``): ``GET /cms/articles`` (the content API; takes the
  content-api read key as ``Authorization: Bearer``, which sidekey injects on the way
  out: ``list_articles`` never holds it) and ``GET /metrics/page_views`` (takes only a
  token this IdP issued for the metrics audience, and answers for that token's user).

``--init`` creates, in ``DIR`` when missing: a demo CA (``demo-ca.pem``), a certificate
for localhost signed by it (``demo-tls.pem``, ``demo-tls.key``) and the IdP's client
secret for the daemon (``demo-idp-client-secret``, 0600; ``run.sh daemon`` also puts it
in the daemon's store). No key or token is ever printed or logged.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hmac
import ipaddress
import json
import os
import secrets
import ssl
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from upstream import FakeCMS, FakeMetricsDB, accepts, note_access

from sidekey.devissuer import kid_of
from sidekey.tokens import load_ed25519_private

ISSUER = "https://auth.example.com"  # the seed's issuer, which the quickstart demo key plays
CLIENT_ID = "sidekey"
METRICS_AUDIENCE = "https://metrics.example.com"
METRICS_SCOPES = {"metrics:read"}
TOKEN_TTL_S = 300
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a URN
MAX_BODY = 64 * 1024


# ---------------------------------------------------------------------------- --init


def init(keys: Path) -> None:
    """Create the demo CA, the localhost certificate and the IdP client secret."""
    keys.mkdir(parents=True, exist_ok=True)
    if not (keys / "demo-ca.pem").exists() or not (keys / "demo-tls.pem").exists():
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sidekey example demo CA")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=365))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                           key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, key_cert_sign=True,
                                           crl_sign=True, encipher_only=False,
                                           decipher_only=False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
                .issuer_name(ca_name).public_key(leaf_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=365))
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        pem = serialization.Encoding.PEM
        _write(keys / "demo-ca.pem", ca.public_bytes(pem), 0o644)
        _write(keys / "demo-tls.pem", leaf.public_bytes(pem), 0o644)
        _write(keys / "demo-tls.key", leaf_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    if not (keys / "demo-idp-client-secret").exists():
        _write(keys / "demo-idp-client-secret", secrets.token_urlsafe(24).encode(), 0o600)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


# ---------------------------------------------------------------------------- services


class Services:
    def __init__(self, keys: Path) -> None:
        self.signing_key = load_ed25519_private(keys / "demo-issuer.pem")
        self.kid = kid_of(keys / "demo-issuer-jwks.json")
        self.jwks = jwt.PyJWKSet.from_json((keys / "demo-issuer-jwks.json").read_text())
        self.client_secret = (keys / "demo-idp-client-secret").read_text().strip()
        self.cms = FakeCMS()
        self.metrics = FakeMetricsDB()

    def verify(self, token: str, audience: str | None) -> dict[str, Any]:
        """The claims of a token this issuer signed (for ``audience``, or any audience)."""
        key = next(k for k in self.jwks.keys if k.key_id == jwt.get_unverified_header(token)["kid"])
        claims: dict[str, Any] = jwt.decode(
            token, key.key, algorithms=["EdDSA"], issuer=ISSUER, audience=audience,
            options={"verify_aud": audience is not None, "require": ["exp", "sub"]})
        return claims

    # -------------------------------------------------------------- the IdP

    def token(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        """RFC 8693 §2.1 request -> §2.2.1 answer or an RFC 6749 §5.2 error."""
        if not self._client_ok(headers.get("Authorization", "")):
            return 401, {"error": "invalid_client"}
        form = {k: v[0] for k, v in parse_qs(body.decode("ascii", "replace")).items()}
        if form.get("grant_type") != EXCHANGE:
            return 400, {"error": "unsupported_grant_type"}
        if form.get("subject_token_type") != ACCESS_TOKEN_TYPE:
            return 400, {"error": "invalid_request", "error_description": "subject_token_type"}
        try:
            subject = self.verify(form.get("subject_token", ""), audience=None)
        except Exception:
            return 400, {"error": "invalid_grant"}
        if form.get("audience") != METRICS_AUDIENCE:
            return 400, {"error": "invalid_target"}
        scopes = set(form.get("scope", "").split()) or METRICS_SCOPES
        if not scopes <= METRICS_SCOPES:
            return 400, {"error": "invalid_scope"}
        now = int(time.time())
        issued = jwt.encode({
            "iss": ISSUER, "sub": subject["sub"], "aud": METRICS_AUDIENCE,
            "scope": " ".join(sorted(scopes)), "iat": now, "exp": now + TOKEN_TTL_S,
            "jti": uuid.uuid4().hex, "act": {"sub": CLIENT_ID},
        }, self.signing_key, algorithm="EdDSA", headers={"kid": self.kid})
        return 200, {"access_token": issued, "issued_token_type": ACCESS_TOKEN_TYPE,
                     "token_type": "Bearer", "expires_in": TOKEN_TTL_S,
                     "scope": " ".join(sorted(scopes))}

    def _client_ok(self, authorization: str) -> bool:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            client, _, secret = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return False
        return client == CLIENT_ID and hmac.compare_digest(secret, self.client_secret)

    # -------------------------------------------------------------- the APIs

    def api(self, path: str, query: dict[str, str], authorization: str) -> tuple[int, dict[str, Any]]:
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credential:
            return 401, {"error": "a bearer credential is required"}
        if path == "/cms/articles":
            if not accepts(credential, "read"):
                return 401, {"error": "the content API refused the credential"}
            note_access("list (https)", "read")
            text, section = query.get("q", "").lower(), query.get("section")
            found = [a for a in self.cms.articles.values()
                     if text in a["title"].lower() and section in (None, a["section"])]
            return 200, {"articles": found[: int(query.get("limit", "10"))]}
        if path == "/metrics/page_views":
            try:
                claims = self.verify(credential, audience=METRICS_AUDIENCE)
            except Exception:
                return 401, {"error": "the metrics API takes only tokens issued for it"}
            if "metrics:read" not in str(claims.get("scope", "")).split():
                return 403, {"error": "metrics:read is required"}
            days = max(1, min(365, int(query.get("days", "7"))))
            section = query.get("section")
            rows = [r for r in self.metrics.rows[: days * len(self.metrics.SECTIONS)]
                    if section in (None, r["section"])]
            # Per user: what this user may see (here: every row, labelled with who asked).
            return 200, {"user": claims["sub"], "rows": rows}
        return 404, {"error": "not found"}


def handler(services: Services, kind: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            if kind != "idp" or urlsplit(self.path).path != "/token" or length > MAX_BODY:
                self._answer(404, {"error": "not found"})
                return
            self._answer(*services.token(self.headers, self.rfile.read(length)))

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if kind != "api":
                self._answer(404, {"error": "not found"})
                return
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            self._answer(*services.api(url.path, query, self.headers.get("Authorization", "")))

        def log_message(self, format: str, *args: Any) -> None:
            pass  # request lines would carry query strings; nothing is logged

    return Handler


def serve(services: Services, keys: Path, port: int, kind: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), handler(services, kind))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(keys / "demo-tls.pem", keys / "demo-tls.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=Path, required=True,
                        help="the quickstart's keys directory (demo issuer key, demo CA)")
    parser.add_argument("--init", action="store_true", help="create the demo CA, the TLS "
                        "certificate and the IdP client secret when missing, then exit")
    parser.add_argument("--idp-port", type=int, default=8768)
    parser.add_argument("--api-port", type=int, default=8767)
    args = parser.parse_args()
    if args.init:
        init(args.keys)
        return
    services = Services(args.keys)
    serve(services, args.keys, args.idp_port, "idp")
    serve(services, args.keys, args.api_port, "api")
    print(f"IdP https://localhost:{args.idp_port}/token, APIs https://localhost:{args.api_port} "
          f"(CA {args.keys / 'demo-ca.pem'})", file=sys.stderr, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
