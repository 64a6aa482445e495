"""``sidekey check-config --probe``: reach every backend and issuer the config names, and
check that every mapped secret exists, so a typo in a secret name or an unreachable
Vault fails at check time instead of at the first call.

Everything goes through the daemon's own code paths (the backends' ``health`` and
``fetch``, Vault's capability check, the OAuth verifier's key loading), each step bounded
in time. Values fetched are dropped at once: the report names secrets, versions and
errors, never a value. Dynamic secrets are not fetched (that would mint a credential);
Vault's capability check covers them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import trio

from .backends import Backend, build_backends, unwrap
from .config import LoadedConfig, SecretRef, WebhookSinkConfig
from .oauth import OAuthVerifier
from .protocol import SidekeyError

log = logging.getLogger(__name__)

# One probe step (a health check, a capability check, one secret's fetch, one issuer's
# keys) never waits longer than this: a backend's own timeout_s plus slack, capped.
MAX_STEP_S = 30.0
ISSUER_FETCH_TIMEOUT_S = 5.0
MAX_ERROR_CHARS = 300


@dataclass(slots=True)
class _Use:
    ref: SecretRef
    used_by: list[str] = field(default_factory=list)


def _mapped(loaded: LoadedConfig) -> dict[str, dict[str, _Use]]:
    """backend -> secret label -> the reference and who uses it (tools, audit sinks)."""
    out: dict[str, dict[str, _Use]] = {}

    def add(ref: SecretRef, user: str) -> None:
        # Two references with one label but different selectors (version, JSON key) are
        # two checks.
        pinned = ref.version or ref.version_stage or ref.version_id
        key = ref.label + (f"@{pinned}" if pinned else "") + (f"#{ref.json_key}" if ref.json_key else "")
        use = out.setdefault(ref.backend, {}).setdefault(key, _Use(ref))
        use.used_by.append(user)

    for server, tools in loaded.config.secrets.items():
        for tool, refs in tools.items():
            for alias, ref in refs.items():
                add(ref, f"{server}/{tool} {alias}")
    for i, sink in enumerate(loaded.config.audit.sinks):
        if isinstance(sink, WebhookSinkConfig) and sink.auth is not None:
            add(sink.auth.secret, f"audit.sinks.{i} ({sink.name or 'webhook'}) auth")
    return out


def _step_s(loaded: LoadedConfig, name: str) -> float:
    timeout = getattr(loaded.config.backends[name], "timeout_s", 5.0)
    return min(MAX_STEP_S, 2 * float(timeout) + 1.0)


def _error(exc: BaseException, step_s: float) -> dict[str, str]:
    if isinstance(exc, trio.TooSlowError):
        return {"code": "probe_timeout", "error": f"no answer within {step_s:g} s"}
    if isinstance(exc, SidekeyError):
        return {"code": exc.code, "error": exc.message[:MAX_ERROR_CHARS]}
    return {"code": "probe_failed", "error": f"{type(exc).__name__}"}


async def _probe_backend(backend: Backend, kind: str, uses: dict[str, _Use],
                         step_s: float) -> dict[str, Any]:
    inner = unwrap(backend)  # past any cache: the backend itself is asked
    out: dict[str, Any] = {"ok": False, "type": kind, "reached": False}
    try:
        with trio.fail_after(step_s):
            health = await inner.health()
    except (SidekeyError, trio.TooSlowError) as exc:
        out.update(_error(exc, step_s))
        return out
    if not health.get("ok"):
        out.update(code="backend_unavailable",
                   error=str(health.get("error") or "the backend reports itself not ok")
                   [:MAX_ERROR_CHARS])
        return out
    out["reached"] = True
    probe = getattr(inner, "probe", None)
    if probe is not None:  # Vault: one sys/capabilities-self for what the config needs
        try:
            with trio.fail_after(step_s):
                out["missing"] = await probe([u.ref for u in uses.values()])
        except (SidekeyError, trio.TooSlowError) as exc:
            out.update(_error(exc, step_s))
            return out
    secrets: dict[str, dict[str, Any]] = {}
    for label, use in sorted(uses.items()):
        entry: dict[str, Any] = {"used_by": use.used_by}
        if use.ref.kind == "dynamic":
            entry.update(ok=True, checked="dynamic: not fetched (that would create a "
                                          "credential); the capability check covers it")
            secrets[label] = entry
            continue
        if use.ref.kind == "oauth_token_exchange":
            entry.update(ok=True, checked="token exchange: needs a user's token; the backend's "
                                          "probe reached the token endpoint and authenticated")
            secrets[label] = entry
            continue
        try:
            with trio.fail_after(step_s):
                value = await inner.fetch(use.ref)
            entry.update(ok=True, version=value.version)
            del value  # the value itself is never kept, shown or logged
        except (SidekeyError, trio.TooSlowError) as exc:
            entry.update(ok=False, **_error(exc, step_s))
        secrets[label] = entry
    out["secrets"] = secrets
    out["ok"] = (all(s["ok"] for s in secrets.values())
                 and not any(m.get("required") for m in out.get("missing", ())))
    return out


async def _probe_issuers(loaded: LoadedConfig) -> dict[str, dict[str, Any]]:
    """Each OAuth2 issuer the servers name, with this host's key source applied: its keys
    loaded as a token verification would load them."""
    verifier = OAuthVerifier(base_dir=loaded.base_dir, fetch_timeout_s=ISSUER_FETCH_TIMEOUT_S)
    out: dict[str, dict[str, Any]] = {}
    try:
        for server in sorted(loaded.config.servers):
            spec = loaded.oauth2_for(server)
            if spec is None:
                continue
            entry = out.get(spec.issuer)
            if entry is not None:
                entry["servers"].append(server)
                continue
            entry = out[spec.issuer] = {"servers": [server]}
            try:
                with trio.fail_after(ISSUER_FETCH_TIMEOUT_S + 1):
                    kind, location, kids = await verifier.probe(spec)
                entry.update(ok=bool(kids), source=kind, location=location, kids=kids)
                if not kids:
                    entry.update(code="jwks_unavailable", error="the key set has no usable key")
            except (SidekeyError, trio.TooSlowError) as exc:
                entry.update(ok=False, **_error(exc, ISSUER_FETCH_TIMEOUT_S + 1))
    finally:
        with trio.CancelScope(shield=True):
            await verifier.aclose()
    return out


def run_probe(loaded: LoadedConfig) -> dict[str, Any]:
    """Probe every backend (reached, capabilities, each mapped secret present) and every
    issuer (keys loaded). Returns ``{"backends": {...}, "issuers": {...}}``; an entry's
    ``ok`` is false on any failure, with ``code`` and ``error`` saying what. Raises
    :class:`~sidekey.protocol.ConfigError` when a backend cannot even be built (a
    missing key file)."""
    uses = _mapped(loaded)
    backends = build_backends(loaded)

    async def main() -> dict[str, Any]:
        result: dict[str, Any] = {"backends": {}, "issuers": {}}
        try:
            for name, backend in backends.items():
                kind = str(type(loaded.config.backends[name]).__struct_config__.tag)
                result["backends"][name] = await _probe_backend(
                    backend, kind, uses.get(name, {}), _step_s(loaded, name))
            result["issuers"] = await _probe_issuers(loaded)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(MAX_STEP_S):
                for backend in backends.values():
                    await backend.aclose()
        return result

    return trio.run(main)


def failures(result: dict[str, Any]) -> list[str]:
    """One line per failure of a :func:`run_probe` result (empty: all passed)."""
    out: list[str] = []
    for name, b in result["backends"].items():
        if "error" in b:
            out.append(f"backend {name} ({b['type']}): {b['code']}: {b['error']}")
        for m in b.get("missing", ()):
            if m.get("required"):
                out.append(f"backend {name}: capability {m['capability']} on {m['path']} "
                           f"missing, needed for {m['needed_for']}")
        for label, s in b.get("secrets", {}).items():
            if not s["ok"]:
                out.append(f"backend {name}: secret {label} (used by "
                           f"{', '.join(s['used_by'])}): {s['code']}: {s['error']}")
    for issuer, i in result["issuers"].items():
        if not i.get("ok"):
            out.append(f"issuer {issuer} (servers {', '.join(i['servers'])}): "
                       f"{i.get('code')}: {i.get('error')}")
    return out


def report_lines(result: dict[str, Any]) -> list[str]:
    """The human-readable probe report (``check-config --probe`` without --json)."""
    lines: list[str] = []
    for name, b in result["backends"].items():
        if "error" in b:
            lines.append(f"probe backend {name} ({b['type']}): FAILED: {b['code']}: {b['error']}")
            continue
        secrets = b.get("secrets", {})
        bad = [label for label, s in secrets.items() if not s["ok"]]
        lines.append(f"probe backend {name} ({b['type']}): reached; "
                     f"{len(secrets) - len(bad)}/{len(secrets)} mapped secrets found")
        for m in b.get("missing", ()):
            kind = "MISSING" if m["required"] else "missing (optional)"
            lines.append(f"probe backend {name}: {kind} {m['capability']} on {m['path']}, "
                         f"for {m['needed_for']}")
        for label in bad:
            s = secrets[label]
            lines.append(f"probe backend {name}: MISSING secret {label} (used by "
                         f"{', '.join(s['used_by'])}): {s['code']}: {s['error']}")
    for issuer, i in result["issuers"].items():
        if i.get("ok"):
            lines.append(f"probe issuer {issuer}: {len(i['kids'])} key(s) from {i['source']} "
                         f"{i['location']} (servers {', '.join(i['servers'])})")
        else:
            lines.append(f"probe issuer {issuer}: FAILED: {i.get('code')}: {i.get('error')}")
    return lines
