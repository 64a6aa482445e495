"""The daemon: wires config, state store, audit, backends, tokens and leases together
and implements the v1 endpoints on top of :mod:`sidekey.server`.

Every endpoint declares its minimum RBAC tier in the route table
(:class:`~sidekey.daemon.app.Sidekey`). Every security decision (allow, deny, rejection,
replay, release, expiry) writes an audit event, durably, *before* the response leaves;
if audit cannot record, the call fails 503.

One module per room, every import pointing down:

* :mod:`.context`: the shared state and helpers (the only module the rooms share);
* :mod:`.calls`: the governed call (authorize, redeem, release);
* :mod:`.introspect`: a user's bearer token verified for the calling server;
* :mod:`.admin`: tokens, rotation, the reload endpoint, status, approvals;
* :mod:`.lifecycle`: reload, start-up recovery, sweeps, retries, expiry;
* :mod:`.scrape`: ``GET /v1/metrics`` and the loopback TCP metrics listener;
* :mod:`.app`: the application, its routes and dispatch, and :func:`run`.

A constant lives in the module that reads it (in :mod:`.context` when several do): patch
it there.
"""

from .app import Sidekey, _selector_uids, run
from .context import REJECTION_EVENT_BYTES, ConfigTrust, Route, StoreJournal, build_codec
from .lifecycle import check_config_signature

__all__ = [
    "REJECTION_EVENT_BYTES",
    "ConfigTrust",
    "Route",
    "Sidekey",
    "StoreJournal",
    "_selector_uids",
    "build_codec",
    "check_config_signature",
    "run",
]
