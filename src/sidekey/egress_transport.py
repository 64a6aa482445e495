"""httpx transports that send a tool call's upstream requests through the daemon's
egress (:meth:`sidekey.client.Lease.transport`; issue 16, item 1).

``https://cms.example.com:8443/v1/x?y=1`` becomes
``GET /v1/egress/<lease_id>/cms.example.com:8443/v1/x?y=1`` on the client's own
kept-alive Unix-socket connections; the daemon checks it against the tool's egress
rules, injects the credential, sends it over verified TLS and answers the upstream's
status, headers and body (marked ``sidekey-egress: upstream``). An answer without that
mark is the daemon's own refusal: raised as the client's typed error for its code. The
credential never reaches this process.

Imported only by ``Lease.transport()``: httpx is not a dependency of the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import msgspec

from .client import EGRESS_TIMEOUT_S, _error_from_response

if TYPE_CHECKING:
    from .client import AsyncClient, Client

_MARK = b"sidekey-egress"
# Framing is the client's own (the body is sent whole, with its length).
_DROP = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection",
                   b"keep-alive", b"upgrade", b"te", b"trailer", b"expect"))


def egress_target(lease_id: str, url: httpx.URL) -> str:
    """The daemon path for ``url``. Raises httpx.UnsupportedProtocol for anything but
    https (the daemon sends https only)."""
    if url.scheme != "https":
        raise httpx.UnsupportedProtocol(
            f"sidekey egress sends https:// requests only, not {url.scheme}://")
    host = url.raw_host.decode("ascii")
    if ":" in host:
        host = f"[{host}]"
    authority = host if url.port is None else f"{host}:{url.port}"
    return f"/v1/egress/{lease_id}/{authority}{url.raw_path.decode('ascii')}"


def _headers(request: httpx.Request) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in request.headers.raw if k.lower() not in _DROP]


def _timeout(request: httpx.Request) -> float:
    """The whole exchange's bound: the longest of the request's httpx timeouts (the
    daemon bounds the upstream by its rule), or EGRESS_TIMEOUT_S."""
    timeouts = request.extensions.get("timeout") or {}
    values = [v for v in timeouts.values() if isinstance(v, int | float) and v > 0]
    return float(max(values)) + 1.0 if values else EGRESS_TIMEOUT_S


def _response(status: int, head: Any, body: bytes, request: httpx.Request) -> httpx.Response:
    headers = [(k, v) for k, v in head]
    if not any(k.lower() == _MARK for k, _ in headers):
        # The daemon's own answer (a refusal, the upstream unreachable...), not the
        # upstream's: its typed error, with the daemon's code.
        try:
            data = msgspec.json.decode(body)
        except msgspec.DecodeError:
            data = None
        raise _error_from_response(
            status, data, {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers},
            f"{request.method} {request.url.host} (egress)")
    headers = [(k, v) for k, v in headers if k.lower() != _MARK]
    return httpx.Response(status, headers=headers, content=body, request=request,
                          extensions={"http_version": b"HTTP/1.1"})


def transport(client: AsyncClient | Client, lease_id: str) -> httpx.AsyncBaseTransport | httpx.BaseTransport:
    """The transport for a lease of ``client`` (async for an AsyncClient)."""
    from .client import AsyncClient

    if isinstance(client, AsyncClient):
        return AsyncEgressTransport(client, lease_id)
    return EgressTransport(client, lease_id)


def http_client(client: AsyncClient | Client, lease_id: str,
                kw: dict[str, Any]) -> httpx.AsyncClient | httpx.Client:
    """An httpx client over :func:`transport` (``kw``: its constructor's arguments)."""
    from .client import AsyncClient

    kw.setdefault("timeout", httpx.Timeout(EGRESS_TIMEOUT_S))
    if isinstance(client, AsyncClient):
        return httpx.AsyncClient(transport=AsyncEgressTransport(client, lease_id), **kw)
    return httpx.Client(transport=EgressTransport(client, lease_id), **kw)


class AsyncEgressTransport(httpx.AsyncBaseTransport):
    """For ``httpx.AsyncClient(transport=...)``: a lease of an :class:`AsyncClient`
    (asyncio or trio)."""

    def __init__(self, client: AsyncClient, lease_id: str) -> None:
        self._client = client
        self._lease_id = lease_id

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        target = egress_target(self._lease_id, request.url)
        body = await request.aread()
        status, head, data = await self._client._egress(
            request.method, target, _headers(request), body, _timeout(request))
        return _response(status, head, data, request)


class EgressTransport(httpx.BaseTransport):
    """For ``httpx.Client(transport=...)``: a lease of a sync :class:`Client`."""

    def __init__(self, client: Client, lease_id: str) -> None:
        self._client = client
        self._lease_id = lease_id

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        target = egress_target(self._lease_id, request.url)
        body = request.read()
        status, head, data = self._client._egress(
            request.method, target, _headers(request), body, _timeout(request))
        return _response(status, head, data, request)
