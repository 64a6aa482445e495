"""A loopback HTTPS collector for the webhook audit sink's tests: a real TLS server
(``http.server`` over ``ssl``, certificate from a throwaway CA the test writes) standing
in for a Splunk HEC / Elastic / Datadog intake. It records every POST, answers with a
status the test chooses, can demand an auth header, and can go down and come back on the
same port (an outage).
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import json
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


def make_ca(directory: Path, host: str = "localhost") -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for ``host`` (DNS and 127.0.0.1) signed by it:
    ``(ca.pem, cert.pem, key.pem)``."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "webhook test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class Collector:
    """The server. ``requests``: (path, headers, body) of every POST it answered 2xx;
    ``refused``: the statuses of the others. ``answer``: a function of (path, headers,
    body) returning (status, body, extra headers), default 200 ``{"text":"Success"}``."""

    def __init__(self, directory: Path, *, auth: tuple[str, str] | None = None) -> None:
        self.ca, self.cert, self.key = make_ca(directory)
        self.auth = auth  # (header, exact value) demanded, else 401
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.refused: list[int] = []
        self.answer: Callable[[str, dict[str, str], bytes], tuple[int, bytes, dict[str, str]]] | None = None
        self.lock = threading.Lock()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def start(self) -> Collector:
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with collector.lock:
                    collector._connections.add(self.connection)

            def finish(self) -> None:
                with collector.lock:
                    collector._connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                if collector.auth is not None and headers.get(collector.auth[0].lower()) != collector.auth[1]:
                    status, answer, extra = 401, b'{"text":"Invalid token","code":4}', {}
                elif collector.answer is not None:
                    status, answer, extra = collector.answer(self.path, headers, body)
                else:
                    status, answer, extra = 200, b'{"text":"Success","code":0}', {}
                with collector.lock:
                    if 200 <= status < 300:
                        collector.requests.append((self.path, headers, body))
                    else:
                        collector.refused.append(status)
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        class Server(http.server.ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

        server = Server(("127.0.0.1", self.port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Down: the port refuses connections (open ones are cut)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:
            open_ones, self._connections = list(self._connections), set()
        for conn in open_ones:  # kept-alive connections go down with it
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def ndjson_events(self) -> list[dict[str, Any]]:
        """Every event received so far (NDJSON bodies), in arrival order."""
        with self.lock:
            bodies = [body for _, _, body in self.requests]
        return [json.loads(line) for body in bodies for line in body.splitlines() if line]

    def lines(self) -> list[bytes]:
        with self.lock:
            bodies = [body for _, _, body in self.requests]
        return [line for body in bodies for line in body.splitlines() if line]
