"""A real HTTPS upstream for the egress tests and benchmark: stdlib http.server + ssl in a
thread, with its own CA (made here with ``cryptography``).

Every request is recorded (method, path, headers, body). Paths choose the behaviour:
``/echo...`` answers 200 with the Authorization header (and the query) echoed in a
response header and in a JSON body; ``/slow?s=N`` sleeps N seconds first; ``/huge?mb=N``
streams N MiB; ``/redirect`` answers 302 to ``/echo``; ``/hold`` waits until the test sets
``Upstream.holds``; anything else 200 ``ok``.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(directory: Path, name: str = "sidekey test CA") -> tuple[Path, Any, Any]:
    """A self-signed CA: (its PEM file, key, certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{name.replace(' ', '-')}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_leaf(directory: Path, ca_key: Any, ca_cert: Any) -> tuple[Path, Path]:
    """A server certificate for localhost and 127.0.0.1: (cert PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("localhost"))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / "leaf.pem", directory / "leaf.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """A running upstream: ``port``, its CA's PEM (``ca_file``) and what it was sent."""

    port: int
    ca_file: Path
    seen: list[Seen] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None
    # /hold waits for this (at most 8 s), then answers like /ok.
    holds: threading.Event = field(default_factory=threading.Event)

    @property
    def host(self) -> str:
        return f"localhost:{self.port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two writes: no 40 ms delayed-ACK stall
    upstream: Upstream

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        self.upstream.seen.append(Seen(self.command, self.path,
                                       {k.lower(): v for k, v in self.headers.items()}, body))
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path.startswith("/slow"):
            time.sleep(float(query.get("s", "5")))
        if url.path.startswith("/hold"):
            self.upstream.holds.wait(8)
        if url.path.startswith("/huge"):
            total = int(float(query.get("mb", "8")) * 1024 * 1024)
            self.send_response(200)
            self.send_header("content-type", "application/octet-stream")
            if "nolength" in query:  # close-delimited: the cap is found by reading
                self.send_header("connection", "close")
                self.close_connection = True
            else:
                self.send_header("content-length", str(total))
            self.end_headers()
            chunk = b"x" * 65536
            sent = 0
            try:
                while sent < total:
                    self.wfile.write(chunk)
                    sent += len(chunk)
            except OSError:
                pass
            return
        if url.path.startswith("/redirect"):
            self._answer(302, b"", [("location", "/echo")])
            return
        if url.path.startswith("/echo") or url.path.startswith("/slow"):
            auth = self.headers.get("authorization", "")
            payload = json.dumps({"authorization": auth, "query": url.query, "path": url.path,
                                  "method": self.command, "body": body.decode(errors="replace"),
                                  "headers": dict(self.headers.items())}).encode()
            self._answer(200, payload, [("content-type", "application/json"),
                                        ("x-echo-authorization", auth),
                                        ("x-echo-query", url.query),
                                        ("set-cookie", "session=abc"),
                                        ("x-upstream", "yes")])
            return
        self._answer(200, b"ok", [("content-type", "text/plain")])

    def _answer(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle


def start_upstream(directory: Path, *, ca: tuple[Path, Any, Any] | None = None) -> Upstream:
    """Start an HTTPS upstream on a free loopback port, with a new CA unless ``ca`` is
    given (``make_ca``'s result)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_file, ca_key, ca_cert = ca or make_ca(directory)
    cert, key = make_leaf(directory, ca_key, ca_cert)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    upstream = Upstream(port=0, ca_file=ca_file)
    handler = type("Handler", (_Handler,), {"upstream": upstream})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    upstream.port = server.server_address[1]
    upstream.server = server
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return upstream
