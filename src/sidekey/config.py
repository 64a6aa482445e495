"""Configuration: the main ``sidekey.yaml`` plus the policy files it ``include:``s.

The four policy files keep the shapes of ``shared/seed-configs`` (``servers``,
``registry``, ``agents``, ``limits``); sidekey's own sections (``listen``, ``state``,
``tokens``, ``leases``, ``backends``, ``secrets``, ``peers``, ``rbac``, ``audit``) live
in the main file. Everything is decoded into frozen msgspec Structs that forbid
unknown keys; an error names the file and the path of the offending value.
Relative paths are resolved against the directory of the main file.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml
from msgspec import Meta

from .egress import EgressRule
from .egress import rule_problems as egress_rule_problems
from .egress import tool_rule_problems as egress_tool_problems
from .protocol import MAX_TOKEN_TTL_S, ConfigError

PosFloat = Annotated[float, Meta(gt=0)]
PosInt = Annotated[int, Meta(gt=0)]

TIERS = ("owner", "admin", "security", "approver", "service", "anonymous")
SELF = "self"  # in peer selectors and rbac: "the uid/gid the daemon runs as"


class _C(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


# --------------------------------------------------------------------------- sidekey's own


class ListenConfig(_C, frozen=True, kw_only=True):
    socket: str = "/run/sidekey/sidekey.sock"
    # Socket file mode as an octal string ("0660"). Quote it in YAML.
    mode: Annotated[str, Meta(pattern=r"^0?[0-7]{3}$")] = "0660"
    max_connections: Annotated[int, Meta(gt=0, le=65536)] = 512
    max_header_bytes: Annotated[int, Meta(ge=1024, le=1024 * 1024)] = 16 * 1024
    max_body_bytes: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 256 * 1024
    header_timeout_s: PosFloat = 5.0
    body_timeout_s: PosFloat = 10.0
    idle_timeout_s: PosFloat = 120.0
    # A connection that has not sent the first byte of its first request by then is
    # closed (idle_timeout_s applies between requests of a keep-alive connection).
    first_request_timeout_s: PosFloat = 5.0
    # Connection slots per peer uid (SO_PEERCRED). "service" uids are those the peers or
    # rbac selectors can give a tier above anonymous (and the daemon's own uid); any other
    # process is anonymous: few slots per uid, and all of them together at most
    # max_anonymous_connections, so a flooding uid never takes an attested server's slot.
    max_connections_per_service_uid: Annotated[int, Meta(gt=0, le=65536)] = 256
    max_connections_per_anonymous_uid: Annotated[int, Meta(gt=0, le=65536)] = 8
    max_anonymous_connections: Annotated[int, Meta(gt=0, le=65536)] = 128
    shutdown_grace_s: Annotated[float, Meta(ge=0, le=300)] = 10.0

    @property
    def mode_int(self) -> int:
        return int(self.mode, 8)


class LogConfig(_C, frozen=True, kw_only=True):
    """The daemon's own log on stderr (sidekey.logs); the audit log is ``audit:``."""

    # text: the classic lines; json: one object per line with the request's fields.
    format: Literal["text", "json"] = "text"
    # The --log-level flag and $SIDEKEY_LOG_LEVEL win over this (default: info).
    level: Literal["debug", "info", "warning", "error"] | None = None
    # One line per request (logger sidekey.request); default on for json, off for text.
    requests: bool | None = None


class MetricsConfig(_C, frozen=True, kw_only=True):
    # A loopback TCP address ("127.0.0.1:9464", "[::1]:9464") where a Prometheus server
    # scrapes GET /metrics (and nothing else). Off by default; the same metrics are on
    # the socket as GET /v1/metrics (tier admin). The listener has no authentication:
    # any local process can read it, so only loopback addresses are accepted.
    listen: str | None = None


class StateConfig(_C, frozen=True, kw_only=True):
    # sqlite: one file under dir (the embedded default); redis: shared across hosts.
    backend: Literal["sqlite", "redis"] = "sqlite"
    dir: str = "/var/lib/sidekey"
    redis_url: Annotated[str, Meta(pattern=r"^(redis|rediss|unix)://")] | None = None
    # The Redis password from a file (0600) or a systemd credential, never inline.
    redis_password_file: str | None = None
    redis_password_credential: str | None = None
    redis_tls_ca_file: str | None = None
    redis_key_prefix: Annotated[str, Meta(max_length=64)] = "sidekey:"
    redis_timeout_s: PosFloat = 2.0
    # On a store failure decisions fail closed (503 state_unavailable); "local" lets
    # rate counters (only) fall back to this host's memory. Token burning always fails closed.
    on_store_failure: Literal["closed", "local"] = "closed"
    # Ended leases are kept this long (for `sidekey status` and investigations; the
    # audit trail keeps their history), then purged (SQLite and Redis). At full load
    # this bounds the database: about 0.4 KB per call kept.
    lease_retention_s: Annotated[float, Meta(ge=60, le=30 * 86400)] = 86400.0


class IssuerKey(_C, frozen=True, kw_only=True):
    kid: Annotated[str, Meta(min_length=1, max_length=128)]
    # Ed25519 public key: raw 32 bytes base64url, or a PEM file path in public_key_file.
    public_key: str | None = None
    public_key_file: str | None = None


class TrustedIssuer(_C, frozen=True, kw_only=True):
    issuer: Annotated[str, Meta(min_length=1, max_length=256)]
    algorithm: Literal["EdDSA"] = "EdDSA"
    keys: Annotated[list[IssuerKey], Meta(min_length=1)]


class TokensConfig(_C, frozen=True, kw_only=True):
    # Self-issued token "iss"; default "sidekey:<hostname>".
    issuer: str | None = None
    # HMAC key set file written by `sidekey keygen tokens`; default <state.dir>/token-keys.json.
    keyset: str | None = None
    ttl_seconds: Annotated[int, Meta(gt=0, le=MAX_TOKEN_TTL_S)] = MAX_TOKEN_TTL_S
    leeway_seconds: Annotated[int, Meta(ge=0, le=30)] = 5
    trusted_issuers: list[TrustedIssuer] = []


class LeasesConfig(_C, frozen=True, kw_only=True):
    max_ttl_seconds: Annotated[int, Meta(gt=0, le=MAX_TOKEN_TTL_S)] = MAX_TOKEN_TTL_S
    # How often revocations of dynamic credentials that failed (backend down) are retried.
    revocation_retry_s: Annotated[float, Meta(ge=0.1, le=3600)] = 60.0
    # Memory for call records (a call's arguments and facts, kept from authorize until
    # its lease ends, for the mcp.tool_call event): bytes per MCP server and in total on
    # this host. Over budget, that server's oldest records go (the mcp.authorize event
    # keeps the arguments); records also go at token expiry and at lease end.
    pending_bytes_per_server: Annotated[int, Meta(ge=1 << 20, le=1 << 34)] = 64 << 20
    pending_bytes_total: Annotated[int, Meta(ge=1 << 20, le=1 << 36)] = 256 << 20


NonNegFloat = Annotated[float, Meta(ge=0)]


class LocalBackendConfig(_C, frozen=True, kw_only=True, tag="local", tag_field="type"):
    path: str
    key_file: str | None = None
    # Name of a systemd credential ($CREDENTIALS_DIRECTORY/<name>) holding the key.
    key_credential: str | None = None
    cache_ttl_s: NonNegFloat = 0.0  # decrypting locally is cheaper than a cache
    stale_if_error_s: NonNegFloat = 0.0


class VaultBackendConfig(_C, frozen=True, kw_only=True, tag="vault", tag_field="type"):
    """HashiCorp Vault through hvac. Secrets in files or systemd credentials, never inline."""

    addr: Annotated[str, Meta(pattern=r"^https?://")]
    namespace: str | None = None
    auth: Literal["token", "approle"] = "token"
    # auth: token -> the token from a file or a systemd credential
    token_file: str | None = None
    token_credential: str | None = None
    # auth: approle -> role_id here, secret_id from a file or a systemd credential
    role_id: str | None = None
    approle_mount: str = "approle"
    secret_id_file: str | None = None
    secret_id_credential: str | None = None
    # TLS
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    timeout_s: PosFloat = 5.0
    # Renew the token when less than this many seconds of its TTL are left.
    renew_before_s: PosFloat = 300.0
    max_concurrency: Annotated[int, Meta(gt=0, le=64)] = 8
    cache_ttl_s: NonNegFloat = 60.0
    stale_if_error_s: NonNegFloat = 0.0


class AwsBackendConfig(_C, frozen=True, kw_only=True, tag="aws", tag_field="type"):
    """AWS Secrets Manager through boto3 (credentials from boto3's default chain)."""

    region: str
    endpoint_url: str | None = None
    profile: str | None = None
    timeout_s: PosFloat = 5.0
    max_concurrency: Annotated[int, Meta(gt=0, le=64)] = 8
    cache_ttl_s: NonNegFloat = 60.0
    stale_if_error_s: NonNegFloat = 0.0


class OAuthBackendConfig(_C, frozen=True, kw_only=True, tag="oauth", tag_field="type"):
    """An OAuth 2.0 token endpoint (sidekey.backends.oauth): the secrets that name this
    backend are access tokens it obtains per call, by RFC 8693 token exchange of the
    user's verified bearer token (``kind: oauth_token_exchange``) or by the client
    credentials grant (``kind: oauth_client_credentials``, RFC 6749 section 4.4)."""

    # https, or http to a loopback address (127.0.0.1, ::1, localhost) only.
    token_endpoint: Annotated[str, Meta(min_length=1, max_length=2048)]
    client_id: Annotated[str, Meta(min_length=1, max_length=256)]
    # The client's secret, read through another backend (never written in the config).
    client_secret: SecretRef
    client_auth: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    ca_file: str | None = None  # verification always on: system CAs, or this bundle
    # One token request (connect, send, answer) never waits longer than this.
    timeout_s: Annotated[float, Meta(gt=0, le=30)] = 5.0
    # A cached token is used until this long before its expires_in runs out.
    refresh_margin_s: Annotated[float, Meta(ge=0, le=3600)] = 30.0
    # Issued tokens kept in memory (least recently used go first).
    max_cached_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000


BackendConfig = LocalBackendConfig | VaultBackendConfig | AwsBackendConfig | OAuthBackendConfig


class SecretRef(_C, frozen=True, kw_only=True):
    """Where one secret of a tool's lease comes from. Which keys apply depends on the
    backend's type (checked at load): local ``name``; vault ``mount`` + ``path``
    (+ ``key``, ``version``; ``kind: dynamic`` for per-call credentials such as
    ``database/creds/<role>``, optionally from a warm ``pool_size``); aws ``secret_id``
    (+ ``version_stage`` or ``version_id``, ``json_key``)."""

    backend: str
    name: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    mount: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    path: Annotated[str, Meta(min_length=1, max_length=512)] | None = None
    key: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    version: PosInt | None = None
    kind: Literal["static", "dynamic", "oauth_token_exchange", "oauth_client_credentials"] = "static"
    pool_size: Annotated[int, Meta(ge=0, le=100)] = 0
    secret_id: Annotated[str, Meta(min_length=1, max_length=2048)] | None = None
    version_stage: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    version_id: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    json_key: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    # Cache lifetime for this secret (static secrets only); default: the backend's.
    cache_ttl_s: NonNegFloat | None = None
    # kind oauth_token_exchange / oauth_client_credentials (an oauth backend): what the
    # token is for. audience (RFC 8693) and/or resource (RFC 8707, an absolute URI);
    # scopes requested; token types (RFC 8693; default ...:token-type:access_token).
    audience: Annotated[str, Meta(min_length=1, max_length=512)] | None = None
    resource: Annotated[str, Meta(min_length=1, max_length=2048)] | None = None
    scopes: Annotated[list[Annotated[str, Meta(min_length=1, max_length=256)]],
                      Meta(max_length=64)] = []
    requested_token_type: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    subject_token_type: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    # Egress with injection (sidekey.egress): never handed out; the daemon sends the
    # tool's matching upstream requests with it injected.
    egress: EgressRule | None = None

    @property
    def label(self) -> str:
        """A stable, value-free name for logs, audit and cache keys."""
        if self.name is not None:
            return self.name
        if self.secret_id is not None:
            return self.secret_id
        if self.kind in OAUTH_KINDS:
            target = self.audience or self.resource or "default"
            return f"{self.kind}:{target}" + (f"[{' '.join(self.scopes)}]" if self.scopes else "")
        return f"{self.mount}/{self.path}" + (f"#{self.key}" if self.key else "")


OAUTH_KINDS = ("oauth_token_exchange", "oauth_client_credentials")
# The SecretRef fields only an oauth backend's references use.
_OAUTH_FIELDS = ("audience", "resource", "requested_token_type", "subject_token_type")


# Selector keys that an unprivileged local user cannot satisfy at will: the kernel's
# credentials and the system manager's unit. exe / exe_sha256 alone are not among them:
# anyone who may run that binary (or interpreter) matches them.
BOUNDARY_SELECTOR_KEYS = ("uid", "user", "gid", "group", "supplementary_group", "unit")
# The keys a peer attested by uid/gid only can match (peer.UID_ONLY_SELECTOR_KEYS).
UID_ONLY_SELECTOR_KEYS = ("uid", "user", "gid", "group")


class PeerSelector(_C, frozen=True, kw_only=True):
    """All selectors given must match (like a SPIRE workload entry)."""

    uid: int | Literal["self"] | None = None
    user: str | None = None
    gid: int | Literal["self"] | None = None
    group: str | None = None
    supplementary_group: str | None = None
    unit: str | None = None
    exe: str | None = None
    exe_sha256: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")] | None = None


class AttestationConfig(_C, frozen=True, kw_only=True):
    """How peers whose pid the daemon cannot see are treated (peer.py, "PID namespace").

    ``pid_namespace``: ``refuse`` (default): such a peer is anonymous, and every request
    above the anonymous tier is refused with ``peer_unattested`` and a message naming
    this key. ``uid_only``: it is attested by the socket's uid and gid alone and may match
    peers selectors made of uid/user/gid/group keys only (never exe, exe_sha256, unit,
    supplementary_group); it holds tier service at most, its tokens are bound to
    its uid (not to a process), and a process that inherited its socket is not told apart.
    """

    pid_namespace: Literal["refuse", "uid_only"] = "refuse"


class RbacEntry(_C, frozen=True, kw_only=True):
    uids: list[int | Literal["self"]] = []
    users: list[str] = []
    gids: list[int | Literal["self"]] = []
    groups: list[str] = []
    units: list[str] = []


class RbacConfig(_C, frozen=True, kw_only=True):
    owner: RbacEntry = msgspec.field(default_factory=lambda: RbacEntry(uids=["self"]))
    admin: RbacEntry = RbacEntry()
    security: RbacEntry = RbacEntry()
    approver: RbacEntry = RbacEntry()
    service: RbacEntry = RbacEntry()


class RejectionAuditLimit(_C, frozen=True, kw_only=True):
    """Audit volume of refused callers that are not attested above tier anonymous
    (and of every transport-level refusal), per uid: the first ``burst`` refusals of each
    ``per_seconds`` window get their full event, the rest one
    ``request.rejected.suppressed`` event with counts by error code when the window closes."""

    burst: Annotated[int, Meta(ge=1, le=100_000)] = 20
    per_seconds: Annotated[float, Meta(ge=1, le=3600)] = 10.0
    # uids tracked at once (least recently refused are summarised and forgotten first).
    max_uids: Annotated[int, Meta(ge=1, le=1_000_000)] = 4096


# One audit.redact_keys / redact_tool_fields entry, and how many a list may hold.
RedactNeedle = Annotated[str, Meta(min_length=1, max_length=64)]
MAX_REDACT_NEEDLES = 256


class FileSinkConfig(_C, frozen=True, kw_only=True, tag_field="type", tag="file"):
    """The local audit file (path: audit.path; fsync: audit.fsync): always required, the
    source of truth every other sink forwards from (sidekey.audit.forward)."""

    required: bool = True
    # Rotation: the file is renamed to <name>.<UTC time>.<last seq> and a new one started,
    # once it holds rotate_bytes, or rotate_every_s after it was started (at the next
    # event); keep: rotated files kept (the oldest beyond are deleted; None: all).
    rotate_bytes: Annotated[int, Meta(ge=4096)] | None = None
    rotate_every_s: Annotated[float, Meta(ge=1)] | None = None
    keep: Annotated[int, Meta(ge=1, le=100_000)] | None = None


class SyslogSinkConfig(_C, frozen=True, kw_only=True, tag_field="type", tag="syslog"):
    """RFC 5424 messages (sidekey.audit.syslog) of the lines the file committed."""

    # A name for health and alerts; default "syslog" (two syslog sinks need distinct names).
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")] | None = None
    required: bool = False
    transport: Literal["unix", "tcp"] = "unix"
    socket: str = "/dev/log"  # transport unix: a datagram socket
    host: str | None = None  # transport tcp
    port: Annotated[int, Meta(ge=1, le=65535)] = 6514
    tls: bool = False  # verification always on: system CAs, or ca_file
    ca_file: str | None = None
    format: Literal["json", "cef"] = "json"
    facility: Literal[
        "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
        "authpriv", "ftp", "ntp", "security", "console", "solaris-cron", "local0", "local1",
        "local2", "local3", "local4", "local5", "local6", "local7"] = "authpriv"
    app_name: Annotated[str, Meta(min_length=1, max_length=48, pattern=r"^[\x21-\x7e]+$")] = "sidekey"
    max_message_bytes: Annotated[int, Meta(ge=256, le=1_048_576)] = 8192
    queue_max: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000
    queue_max_bytes: Annotated[int, Meta(ge=65536, le=1 << 32)] = 64 * 1024 * 1024
    deliver_timeout_s: Annotated[float, Meta(gt=0, le=60)] = 5.0


class WebhookAuthConfig(_C, frozen=True, kw_only=True):
    """The webhook's auth header: ``<header>: <prefix><secret>``, the secret read through
    a backend (like a tool's secrets), never written in the config."""

    header: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")] = "Authorization"
    # Text before the secret, e.g. "Splunk " (HEC) or "Bearer "; "" for DD-API-KEY.
    prefix: Annotated[str, Meta(max_length=64, pattern=r"^[\x20-\x7e]*$")] = ""
    secret: SecretRef


class WebhookSinkConfig(_C, frozen=True, kw_only=True, tag_field="type", tag="webhook"):
    """HTTPS POST of batches of the lines the file committed (sidekey.audit.webhook):
    the audit file is the spool, a cursor per sink in <state.dir>/audit-sinks/."""

    # A name for health, alerts and the cursor file; default "webhook".
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")] | None = None
    required: bool = False
    url: Annotated[str, Meta(min_length=1, max_length=2048)]
    # ndjson: the file's lines; json_array: one JSON array (Datadog); splunk_hec: HEC
    # event envelopes; elastic_bulk: _bulk create actions of ECS documents.
    # otlp_json: an OTLP/HTTP JSON logs export request (OpenTelemetry Collector /v1/logs).
    format: Literal["ndjson", "json_array", "splunk_hec", "elastic_bulk", "otlp_json"] = "ndjson"
    # Extra headers that are not secrets (a name that looks like one is refused: use auth).
    headers: Annotated[dict[
        Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")],
        Annotated[str, Meta(max_length=1024, pattern=r"^[\x20-\x7e]*$")]], Meta(max_length=16)] = {}
    auth: WebhookAuthConfig | None = None
    ca_file: str | None = None  # verification always on: system CAs, or this bundle
    timeout_s: Annotated[float, Meta(gt=0, le=120)] = 10.0
    batch_lines: Annotated[int, Meta(ge=1, le=10_000)] = 500
    batch_bytes: Annotated[int, Meta(ge=4096, le=100 * 1024 * 1024)] = 1024 * 1024
    # How far (bytes of the audit file) the sink may fall behind before it skips ahead.
    spool_max_bytes: Annotated[int, Meta(ge=65536, le=1 << 40)] = 1024 * 1024 * 1024
    deliver_timeout_s: Annotated[float, Meta(gt=0, le=60)] = 5.0


AuditSinkConfig = FileSinkConfig | SyslogSinkConfig | WebhookSinkConfig


class AuditConfig(_C, frozen=True, kw_only=True):
    # JSON-lines file; default <state.dir>/audit.jsonl
    path: str | None = None
    fsync: bool = True
    rejections_per_uid: RejectionAuditLimit = RejectionAuditLimit()
    # Argument keys whose values are redacted in audit and in the approvals list, *added*
    # to the built-in ones (sidekey.audit.events.BUILTIN_REDACT_SUBSTRINGS / _WORDS:
    # password, passwd, pwd, secret, token, key, credential, auth, cookie, dsn, ...),
    # which a config cannot switch off. Matched as substrings of the key with case and
    # separators ignored ("api_key" matches "X-Api-Key" and "apiKey").
    redact_keys: Annotated[list[RedactNeedle], Meta(max_length=MAX_REDACT_NEEDLES)] = []
    # Per tool (by name, as limits.per_tool): more argument keys to redact for that
    # tool's calls only, e.g. {create_article: [body_markdown]}.
    redact_tool_fields: Annotated[
        dict[str, Annotated[list[RedactNeedle], Meta(min_length=1, max_length=MAX_REDACT_NEEDLES)]],
        Meta(max_length=1000),
    ] = {}
    # Tamper evidence (sidekey.audit.chain): every line carries seq / prev_hash / log_id;
    # with an audit key (`sidekey keygen audit`, from a file 0600 or a systemd
    # credential; at most one of the two) an Ed25519-signed audit.checkpoint event follows
    # every checkpoint_every_events events or checkpoint_every_s seconds, whichever first.
    checkpoint_key_file: str | None = None
    checkpoint_key_credential: str | None = None
    checkpoint_every_events: Annotated[int, Meta(ge=1, le=1_000_000)] = 1000
    checkpoint_every_s: Annotated[float, Meta(ge=0.01, le=3600)] = 1.0
    # Values under sensitive argument keys become "hmac-sha256:<hex>" under this per-host
    # key (sidekey.audit.hmackey): 64 hex digits on one line, from a file 0600 or a
    # systemd credential (at most one of the two); with neither, <state.dir>/audit-hmac.key,
    # created on the first start. Read at start (a reload keeps the running key).
    hmac_key_file: str | None = None
    hmac_key_credential: str | None = None
    # Where events go (sidekey.audit.forward has the delivery rule). The file is always
    # there (its entry is optional: it sets its rotation); at most one file entry.
    sinks: Annotated[list[AuditSinkConfig], Meta(max_length=16)] = []


class ConfigSigning(_C, frozen=True, kw_only=True):
    """Detached Ed25519 signatures over the main file and every include.

    With ``require_signed_config`` a missing, stale or forged signature refuses start
    and reload. On reload the *running* config's setting and keys decide, so a new
    config cannot switch its own check off.
    """

    require_signed_config: bool = False
    trusted_keys: list[IssuerKey] = []


class IssuerSource(_C, frozen=True, kw_only=True):
    """Where this host gets an OAuth2 issuer's keys, overriding discovery: a JWKS URL,
    or a JWKS file for air-gapped hosts. Keyed by the issuer URL the policy files use."""

    jwks_uri: str | None = None
    jwks_file: str | None = None
    algorithms: list[Literal["RS256", "ES256", "EdDSA"]] | None = None


class PolicyOptions(_C, frozen=True, kw_only=True):
    # Deny authorize calls that do not send server_version (when the registry pins one).
    require_server_version: bool = False
    # Poll url + health_check of registry entries (shown in /v1/status, never blocks a call).
    registry_health_checks: bool = True
    # Which department a user belongs to (for limits.per_department monthly quotas):
    # the named claim of the user's verified OAuth2 token, else this map.
    department_claim: str | None = None
    user_departments: dict[str, str] = {}
    # Bind the agent to the user's token: the first of these claims the verified token
    # carries (e.g. ["azp", "client_id"]) must equal the agent_id the MCP server sends
    # (403 agent_mismatch; a token with none of them: 403 agent_unbound). Empty: the
    # agent_id is taken as sent (calls without a user token are never bound).
    agent_claims: Annotated[list[Annotated[str, Meta(min_length=1, max_length=64)]],
                            Meta(max_length=8)] = []
    # Calls in flight on this host above which authorize sheds load: departments with
    # priority "standard" from 90 % of the cap, "high" only at the cap (503 overloaded).
    max_in_flight: Annotated[int, Meta(gt=0, le=100_000)] = 1024
    # An MCP session (session_id) counts against per_user.concurrent_sessions until it
    # has been idle (no authorize) this long.
    session_idle_seconds: Annotated[float, Meta(ge=1, le=7 * 24 * 3600)] = 1800.0


# approvals.approver_identities bounds: approvers, ids per approver, characters.
MAX_APPROVER_IDENTITIES = 1000
MAX_APPROVER_IDS = 64
MAX_APPROVER_NAME_LEN = 64  # a user name (Linux caps them at 32) or "uid:N"
MAX_USER_ID_LEN = 256


class ApprovalsConfig(_C, frozen=True, kw_only=True):
    # A held call's approval expires this long after the request (pending or approved).
    ttl_seconds: Annotated[float, Meta(ge=1, le=24 * 3600)] = 900.0
    # requires_approval_above: N counts a user's calls of the tool in windows this long.
    window_seconds: Annotated[float, Meta(ge=1, le=31 * 24 * 3600)] = 3600.0
    # GET /v1/approvals/{id}/wait?timeout=S waits at most this long.
    max_wait_seconds: Annotated[float, Meta(gt=0, le=3600)] = 300.0
    # POSTed a JSON notice for every new request (id, server, tool, user, agent, why,
    # expiry; never argument values). https, or http to a loopback address.
    webhook_url: str | None = None
    webhook_timeout_s: Annotated[float, Meta(gt=0, le=60)] = 5.0
    # Pending approvals one user may have at once (a flood of held calls is refused
    # with 429 rate_limited instead of burying the approvers).
    max_pending_per_user: Annotated[int, Meta(ge=1, le=10_000)] = 20
    # Four eyes by person: an approver's local identity (unix user name, or "uid:N")
    # -> the user ids (OAuth2 subjects, e-mails...) that person is known as. An approver
    # may not approve a call made for one of them (403 approval_self_approval); its own
    # user name counts without being listed. Checked in _cross_check.
    approver_identities: Annotated[
        dict[str, Annotated[list[str], Meta(max_length=MAX_APPROVER_IDS)]],
        Meta(max_length=MAX_APPROVER_IDENTITIES),
    ] = {}


# --------------------------------------------------------------------------- seed policy shapes


class OAuth2Config(_C, frozen=True, kw_only=True):
    issuer: str
    audience: str
    scopes: list[str] = []
    jwks_uri: str | None = None
    jwks_file: str | None = None
    algorithms: list[Literal["RS256", "ES256", "EdDSA"]] = msgspec.field(
        default_factory=lambda: ["RS256", "ES256", "EdDSA"]
    )


class ToolScopes(_C, frozen=True, kw_only=True):
    required: list[str] = []


class ServerDef(_C, frozen=True, kw_only=True):
    url: str | None = None
    oauth2: OAuth2Config | Literal["none"] = "none"
    tool_scopes: dict[str, ToolScopes] = {}


class RegistryEntry(_C, frozen=True, kw_only=True):
    url: str | None = None
    version: str | None = None
    health_check: str | None = None
    health_interval_seconds: PosInt | None = None
    status: Literal["active", "deprecated", "retired"] = "active"
    deprecation_date: datetime.date | None = None
    replacement: str | None = None
    owner: str | None = None
    last_audit: datetime.date | None = None


class Registry(_C, frozen=True, kw_only=True):
    version: str | None = None
    servers: dict[str, RegistryEntry] = {}


class ServerGrant(_C, frozen=True, kw_only=True):
    server: str
    tools: list[str] = []


class AgentDef(_C, frozen=True, kw_only=True):
    description: str | None = None
    allowed_servers: list[ServerGrant] = []
    denied_servers: list[str] = []


class PerUserLimits(_C, frozen=True, kw_only=True):
    requests_per_minute: PosInt | None = None
    requests_per_hour: PosInt | None = None
    concurrent_sessions: PosInt | None = None


class PerToolLimits(_C, frozen=True, kw_only=True):
    requests_per_minute: PosInt | None = None
    max_result_size_kb: PosInt | None = None
    requires_approval_above: Annotated[int, Meta(ge=0)] | None = None
    requires_human_approval: bool = False


class DepartmentLimits(_C, frozen=True, kw_only=True):
    monthly_tool_calls: PosInt | None = None
    priority: Literal["high", "standard"] = "standard"


class Limits(_C, frozen=True, kw_only=True):
    per_user: PerUserLimits = PerUserLimits()
    per_tool: dict[str, PerToolLimits] = {}
    per_department: dict[str, DepartmentLimits] = {}


# --------------------------------------------------------------------------- the whole


class Config(_C, frozen=True, kw_only=True):
    include: list[str] = []
    listen: ListenConfig = ListenConfig()
    log: LogConfig = LogConfig()
    state: StateConfig = StateConfig()
    tokens: TokensConfig = TokensConfig()
    leases: LeasesConfig = LeasesConfig()
    backends: dict[str, BackendConfig] = {}
    secrets: dict[str, dict[str, dict[str, SecretRef]]] = {}
    peers: dict[str, list[PeerSelector]] = {}
    attestation: AttestationConfig = AttestationConfig()
    rbac: RbacConfig = RbacConfig()
    audit: AuditConfig = AuditConfig()
    config_signing: ConfigSigning = ConfigSigning()
    oauth2_issuers: dict[str, IssuerSource] = {}
    policy: PolicyOptions = PolicyOptions()
    approvals: ApprovalsConfig = ApprovalsConfig()
    metrics: MetricsConfig = MetricsConfig()
    # policy (from includes, seed shapes)
    servers: dict[str, ServerDef] = {}
    registry: Registry = Registry()
    agents: dict[str, AgentDef] = {}
    limits: Limits = Limits()


class LoadedConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A validated config with paths resolved, plus where it came from."""

    config: Config
    path: Path
    files: tuple[Path, ...]
    base_dir: Path
    socket_path: Path
    state_dir: Path
    keyset_path: Path
    audit_path: Path
    token_issuer: str
    # References that do not break enforcement but deserve a look (check-config, start log).
    warnings: tuple[str, ...] = ()
    # The bytes each file had when parsed: a signature is checked against these, not
    # against a second read that could see a different file.
    contents: dict[Path, bytes] = {}

    def resolve(self, p: str) -> Path:
        return resolve_path(self.base_dir, p)

    def oauth2_for(self, server: str) -> OAuth2Config | None:
        """The server's OAuth2 settings with this host's issuer key source applied
        (None for ``oauth2: none``)."""
        spec = self.config.servers[server].oauth2
        if spec == "none":
            return None
        source = self.config.oauth2_issuers.get(spec.issuer)
        if source is None:
            return spec
        return msgspec.structs.replace(
            spec,
            jwks_uri=source.jwks_uri,
            jwks_file=str(self.resolve(source.jwks_file)) if source.jwks_file else None,
            algorithms=source.algorithms if source.algorithms is not None else spec.algorithms,
        )

    def secrets_for(self, server: str, tool: str) -> dict[str, SecretRef]:
        return self.config.secrets.get(server, {}).get(tool, {})


MAX_CONFIG_BYTES = 4 * 1024 * 1024


def resolve_path(base: Path, p: str) -> Path:
    path = Path(os.path.expandvars(p)).expanduser()
    return path if path.is_absolute() else (base / path)


def _read_yaml(path: Path, contents: dict[Path, bytes] | None = None) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if contents is not None:
            contents[path] = raw  # the exact bytes parsed, for signature checks
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path.name}:{where}: invalid YAML: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: $: expected a mapping at the top level")
    return data


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return '"' + (value if len(value) <= 40 else value[:37] + "...") + '"'
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _lookup(obj: Any, path: list[str]) -> tuple[bool, Any]:
    for seg in path:
        if isinstance(obj, dict) and seg in obj:
            obj = obj[seg]
        elif isinstance(obj, list) and seg.isdigit() and int(seg) < len(obj):
            obj = obj[int(seg)]
        else:
            return False, None
    return True, obj


def _strip_annotated(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _tagged_members(tp: Any) -> tuple[str, dict[str, type[msgspec.Struct]]] | None:
    """For a union of tagged Structs (``LocalBackendConfig | VaultBackendConfig | ...``):
    the tag field and each member by its tag; None for any other type."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    members = [_strip_annotated(m) for m in typing.get_args(tp)]
    structs = [m for m in members if isinstance(m, type) and issubclass(m, msgspec.Struct)
               and isinstance(m.__struct_config__.tag, str) and m.__struct_config__.tag_field]
    if not structs:
        return None
    tag_field = structs[0].__struct_config__.tag_field or "type"
    return tag_field, {str(m.__struct_config__.tag): m for m in structs}


class _Located(Exception):
    def __init__(self, path: list[str], message: str) -> None:
        self.path = path
        self.message = message


def _locate(obj: Any, tp: Any, path: list[str]) -> None:
    """Find the deepest path at which ``obj`` fails to convert to ``tp``.

    msgspec reports dict keys as ``[...]``; operators need the key names.
    """
    try:
        msgspec.convert(obj, tp, strict=False)
        return
    except msgspec.ValidationError as exc:
        err = str(exc)
    base = _strip_annotated(tp)
    origin = typing.get_origin(base)
    tagged = _tagged_members(base)
    if tagged and isinstance(obj, dict):
        # A tagged union (backends, audit sinks): pick the member its tag names and
        # locate inside it, so an unknown key reads like any other section's.
        tag_field, by_tag = tagged
        tag = obj.get(tag_field)
        member = by_tag.get(tag) if isinstance(tag, str) else None
        if member is None:
            kinds = ", ".join(by_tag)
            raise _Located([*path, tag_field],
                           f"expected one of {kinds}, got {_describe(obj[tag_field])}"
                           if tag_field in obj else f"missing: set it to one of {kinds}")
        _locate(obj, member, path)  # raises for any problem inside the member
    if origin is dict and isinstance(obj, dict):
        vt = typing.get_args(base)[1]
        for k, v in obj.items():
            _locate(v, vt, [*path, str(k)])
    elif origin is list and isinstance(obj, list):
        (et,) = typing.get_args(base)
        for i, v in enumerate(obj):
            _locate(v, et, [*path, str(i)])
    elif isinstance(base, type) and issubclass(base, msgspec.Struct) and isinstance(obj, dict):
        hints = typing.get_type_hints(base, include_extras=True)
        for field in base.__struct_fields__:
            if field in obj:
                _locate(obj[field], hints[field], [*path, field])
        own_tag = base.__struct_config__.tag_field
        unknown = [k for k in obj if k not in base.__struct_fields__ and k != own_tag]
        if unknown:
            known = ", ".join(([own_tag] if own_tag else []) + list(base.__struct_fields__))
            raise _Located([*path, str(unknown[0])], f"unknown key (known keys: {known})")
    message, _, where = err.partition(" - at `")
    suffix = where.rstrip("`").removeprefix("$")
    extra = [s for s in suffix.replace("[", ".").replace("]", "").split(".") if s]
    raise _Located([*path, *extra], message)


def _format_error(origin_file: str, data: dict[str, Any], located: _Located) -> str:
    found, value = _lookup(data, located.path)
    msg = located.message.replace("`", "")
    if msg.startswith("Expected"):
        msg = "e" + msg[1:]
        if found:
            msg = msg.rsplit(", got", 1)[0] + f", got {_describe(value)}"
            if value is not None:
                msg = msg.replace(" | null,", ",")  # "may be left out" is not the point here
    path = "$" + "".join(f".{seg}" for seg in located.path)
    return f"{origin_file}: {path}: {msg}"


def load_config(path: str | os.PathLike[str]) -> LoadedConfig:
    """Load, merge and validate the main config and its includes.

    Raises :class:`ConfigError` with ``file: $.path: problem`` on any error.
    """
    main = Path(path).absolute()
    base = main.parent
    contents: dict[Path, bytes] = {}
    data = _read_yaml(main, contents)
    origins: dict[str, str] = {k: main.name for k in data}
    files = [main]
    includes = data.get("include", [])
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{main.name}: $.include: expected a list of file names")
    for inc in includes:
        inc_path = resolve_path(base, inc)
        part = _read_yaml(inc_path, contents)
        if "include" in part:
            raise ConfigError(f"{inc_path.name}: $.include: nested includes are not supported")
        for key, value in part.items():
            if key in data:
                raise ConfigError(
                    f"{inc_path.name}: $.{key}: already defined in {origins[key]}"
                )
            data[key] = value
            origins[key] = inc_path.name
        files.append(inc_path)
    try:
        _locate(data, Config, [])
    except _Located as located:
        origin = origins.get(located.path[0], main.name) if located.path else main.name
        raise ConfigError(_format_error(origin, data, located)) from None
    cfg = msgspec.convert(data, Config, strict=False)
    warnings = _cross_check(cfg, origins, main.name)
    state_dir = resolve_path(base, cfg.state.dir)
    return LoadedConfig(
        config=cfg,
        path=main,
        files=tuple(files),
        base_dir=base,
        socket_path=resolve_path(base, cfg.listen.socket),
        state_dir=state_dir,
        keyset_path=resolve_path(base, cfg.tokens.keyset) if cfg.tokens.keyset else state_dir / "token-keys.json",
        audit_path=resolve_path(base, cfg.audit.path) if cfg.audit.path else state_dir / "audit.jsonl",
        token_issuer=cfg.tokens.issuer or f"sidekey:{socket.gethostname()}",
        warnings=tuple(warnings),
        contents=contents,
    )


def _ref_problems(ref: SecretRef, backend: BackendConfig) -> list[str]:
    """What is wrong with a secret reference for its backend's type."""
    given = {f for f in ("name", "mount", "path", "key", "version", "secret_id", "version_stage",
                         "version_id", "json_key") if getattr(ref, f) is not None}
    oauth_given = {f for f in _OAUTH_FIELDS if getattr(ref, f) is not None}
    if ref.scopes:
        oauth_given.add("scopes")
    if isinstance(backend, OAuthBackendConfig):
        return _oauth_ref_problems(ref, given | ({"pool_size"} if ref.pool_size else set()),
                                   oauth_given)
    if ref.kind in OAUTH_KINDS:
        return [f"kind: {ref.kind} needs a backend of type oauth"]
    if ref.kind == "dynamic" or ref.pool_size:
        given.add("kind")
    if isinstance(backend, LocalBackendConfig):
        allowed, required = {"name"}, {"name"}
    elif isinstance(backend, VaultBackendConfig):
        allowed, required = {"mount", "path", "key", "version", "kind"}, {"mount", "path"}
    else:
        allowed, required = {"secret_id", "version_stage", "version_id", "json_key"}, {"secret_id"}
    kind = type(backend).__struct_config__.tag
    problems = [f"{k}: not used by a {kind} backend" for k in sorted(given - allowed)]
    problems += [f"{k}: required for a {kind} backend" for k in sorted(required - given)]
    if ref.version_stage is not None and ref.version_id is not None:
        problems.append("set version_stage or version_id, not both")
    if ref.kind == "dynamic" and ref.version is not None:
        problems.append("version: dynamic secrets have no versions")
    if ref.pool_size and ref.kind != "dynamic":
        problems.append("pool_size: only for kind: dynamic")
    problems += [f"{k}: only for a secret of an oauth backend" for k in sorted(oauth_given)]
    return problems


_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 section 3.3


def _oauth_ref_problems(ref: SecretRef, other: set[str], oauth_given: set[str]) -> list[str]:
    """What is wrong with a secret reference of an oauth backend."""
    from urllib.parse import urlsplit

    if ref.kind not in OAUTH_KINDS:
        return [f"kind: an oauth backend's secret needs kind {' or '.join(OAUTH_KINDS)}"]
    problems = [f"{k}: not used by an oauth backend" for k in sorted(other)]
    if ref.cache_ttl_s is not None:
        problems.append("cache_ttl_s: an issued token is cached until its expires_in "
                        "(less the backend's refresh_margin_s)")
    if ref.kind == "oauth_client_credentials":
        problems += [f"{k}: only for kind oauth_token_exchange" for k in
                     ("requested_token_type", "subject_token_type") if k in oauth_given]
    elif ref.audience is None and ref.resource is None:
        problems.append("audience: a token exchange names the audience and/or resource "
                        "the downstream token is for")
    if ref.resource is not None:
        parts = urlsplit(ref.resource)
        if not parts.scheme or parts.fragment:
            problems.append("resource: an absolute URI without a fragment (RFC 8707)")
    for i, scope in enumerate(ref.scopes):
        if not _SCOPE_TOKEN.fullmatch(scope):
            problems.append(f"scopes.{i}: a scope is printable ASCII without spaces, "
                            "double quotes or backslashes (RFC 6749 section 3.3)")
    for k in ("requested_token_type", "subject_token_type"):
        value = getattr(ref, k)
        if value is not None and not _SCOPE_TOKEN.fullmatch(value):
            problems.append(f"{k}: a token type URI (RFC 8693 section 3)")
    return problems


def parse_metrics_listen(value: str) -> tuple[str, int]:
    """``metrics.listen`` as (host, port): ``IP:PORT`` with a loopback IP literal
    (``127.0.0.0/8`` or ``[::1]``). Raises ValueError saying why not. A host name is
    refused too: what it resolves to can change, a loopback literal cannot."""
    import ipaddress

    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{_describe(value)}: expected IP:PORT, e.g. 127.0.0.1:9464")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{_describe(value)}: write an IPv6 address in brackets, e.g. [::1]:9464")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{_describe(value)}: the port must be 1-65535")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{_describe(value)}: the host must be a loopback IP address (127.0.0.1 or [::1]), "
            "not a name") from None
    if not address.is_loopback:
        raise ValueError(
            f"{_describe(value)}: {host} is not a loopback address; the metrics listener has "
            "no authentication, so it listens on loopback only (127.0.0.1 or [::1]); scrape "
            "from elsewhere through a local agent or proxy") from None
    return str(address), int(port_text)


def _webhook_problem(url: str) -> str | None:
    """Why ``url`` cannot be an approvals webhook (https, or http to loopback only)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return "not a valid URL"
    if not host:
        return "the URL has no host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials in the URL"
    if parts.scheme == "https" or (
        parts.scheme == "http" and host in ("127.0.0.1", "::1", "localhost")
    ):
        return None
    return "must use https (plain http only to 127.0.0.1, ::1 or localhost)"


def _oauth_backend_problems(backend: OAuthBackendConfig, cfg: Config) -> list[str]:
    """What is wrong with one oauth backend (``<field>: problem`` each)."""
    from urllib.parse import urlsplit

    problems: list[str] = []
    url_problem = _webhook_problem(backend.token_endpoint)
    if url_problem:
        problems.append(f"token_endpoint: {url_problem}")
    elif urlsplit(backend.token_endpoint).fragment:
        problems.append("token_endpoint: must not have a fragment")
    elif backend.ca_file and not backend.token_endpoint.startswith("https:"):
        problems.append("ca_file: only for an https token_endpoint")
    ref = backend.client_secret
    secret_backend = cfg.backends.get(ref.backend)
    if secret_backend is None:
        problems.append(f"client_secret.backend: no backend {ref.backend!r}")
    elif isinstance(secret_backend, OAuthBackendConfig):
        problems.append("client_secret.backend: the client secret comes from a backend of "
                        "another type (local, vault, aws)")
    else:
        problems.extend(f"client_secret.{p}" for p in _ref_problems(ref, secret_backend))
        if ref.kind != "static":
            problems.append("client_secret.kind: must be static")
    return problems


# Headers a webhook sink sets itself, or that HTTP framing owns.
_RESERVED_HEADERS = frozenset(("host", "content-length", "content-type", "transfer-encoding",
                               "connection", "te", "upgrade", "user-agent"))


def _webhook_sink_problems(sink: WebhookSinkConfig, cfg: Config) -> list[str]:
    """What is wrong with one webhook sink (``<field>: problem`` each)."""
    from .audit.events import Redactor

    problems: list[str] = []
    url_problem = _webhook_problem(sink.url)
    sensitive = Redactor()
    if url_problem:
        problems.append(f"url: {url_problem}")
    else:
        from urllib.parse import parse_qsl, urlsplit

        for name, _ in parse_qsl(urlsplit(sink.url).query, keep_blank_values=True):
            if sensitive.sensitive(name):
                problems.append(f"url: query parameter {name} looks like a credential: use "
                                "auth (with a secret reference), never the config text")
        if sink.ca_file and not sink.url.startswith("https:"):
            problems.append("ca_file: only for an https url")
    for name in sink.headers:
        if name.lower() in _RESERVED_HEADERS:
            problems.append(f"headers.{name}: set by sidekey")
        elif sensitive.sensitive(name):
            problems.append(f"headers.{name}: looks like a credential: put it under auth "
                            "(with a secret reference), never in the config text")
    if sink.auth is not None:
        ref = sink.auth.secret
        backend_cfg = cfg.backends.get(ref.backend)
        if backend_cfg is None:
            problems.append(f"auth.secret.backend: no backend {ref.backend!r}")
        else:
            problems.extend(f"auth.secret.{p}" for p in _ref_problems(ref, backend_cfg))
            if ref.kind != "static":
                problems.append("auth.secret.kind: must be static")
            if ref.egress is not None:
                problems.append("auth.secret.egress: not used by an audit sink")
        if sink.auth.header.lower() in _RESERVED_HEADERS:
            problems.append(f"auth.header: {sink.auth.header} is set by sidekey")
    return problems


_APPROVER_NAME = re.compile(r"uid:[0-9]{1,10}|[A-Za-z0-9_][A-Za-z0-9_.@-]*\$?")


def _approver_identity_problems(name: str, ids: list[str]) -> list[str]:
    """What is wrong with one ``approvals.approver_identities`` entry (``: problem``,
    or ``.<i>: problem`` for one of its user ids)."""
    problems: list[str] = []
    if not 0 < len(name) <= MAX_APPROVER_NAME_LEN or not _APPROVER_NAME.fullmatch(name):
        problems.append(f": the key must be a unix user name or uid:<N> (at most "
                        f"{MAX_APPROVER_NAME_LEN} characters)")
    if not ids:
        problems.append(": list at least one user id")
    for i, user_id in enumerate(ids):
        if not user_id.strip() or len(user_id) > MAX_USER_ID_LEN:
            problems.append(f".{i}: a user id must be non-blank and at most "
                            f"{MAX_USER_ID_LEN} characters")
    return problems


OVERFLOW_ID = 65534  # /proc/sys/kernel/overflowuid and overflowgid, by default


def _uid_only_warnings(cfg: Config, at: str, peers_at: str) -> list[str]:
    """What check-config (and the start log) say while attestation.pid_namespace is
    uid_only: that it is on and what it gives up, and which selectors it cannot use."""
    out = [
        f"{at}: $.attestation.pid_namespace: uid_only: a peer whose pid the daemon cannot "
        "see (another PID namespace) is attested by uid/gid alone: no exe, unit or "
        "supplementary groups; its tokens are bound to its uid, not to a process; a "
        "process that holds its socket is not told apart. Prefer one PID namespace "
        "(shareProcessNamespace: true)"
    ]
    for server, selectors in cfg.peers.items():
        usable = False
        for i, sel in enumerate(selectors):
            extra = sorted(f for f in sel.__struct_fields__
                           if getattr(sel, f) is not None and f not in UID_ONLY_SELECTOR_KEYS)
            if extra:
                out.append(f"{peers_at}: $.peers.{server}.{i}: uses {', '.join(extra)}: this "
                           "selector never matches a peer attested by uid/gid only")
            elif any(getattr(sel, f) is not None for f in sel.__struct_fields__):
                usable = True
                if sel.uid == 0 or sel.user == "root":
                    out.append(f"{peers_at}: $.peers.{server}.{i}: uid 0 attested by uid alone "
                               "is any root process that reaches the socket")
                if sel.uid == OVERFLOW_ID or sel.gid == OVERFLOW_ID:
                    out.append(f"{peers_at}: $.peers.{server}.{i}: {OVERFLOW_ID} is the kernel's "
                               "overflow id: every peer whose uid/gid is not mapped into the "
                               "daemon's user namespace shows as it")
        if not usable:
            out.append(f"{peers_at}: $.peers.{server}: no selector of uid/user/gid/group keys "
                       "only: a peer in another PID namespace is never attested as this server")
    return out


def _cross_check(cfg: Config, origins: dict[str, str], main: str) -> list[str]:
    """Raise ConfigError for references that make a rule unenforceable; return warnings
    for references to things not declared on this host (the seed files name servers,
    like crm-v2, that a host may not run)."""

    def where(section: str) -> str:
        return origins.get(section, main)

    errors: list[str] = []
    warnings: list[str] = []
    declared_tools = {t for s in cfg.servers.values() for t in s.tool_scopes}
    for sname, sdef in cfg.servers.items():
        if sdef.oauth2 == "none":
            continue
        offered = set(sdef.oauth2.scopes)
        for tool, scopes in sdef.tool_scopes.items():
            for scope in scopes.required:
                if offered and scope not in offered:
                    errors.append(
                        f"{where('servers')}: $.servers.{sname}.tool_scopes.{tool}.required: "
                        f'scope "{scope}" is not in $.servers.{sname}.oauth2.scopes'
                    )
        if sdef.oauth2.jwks_uri is not None and sdef.oauth2.jwks_file is not None:
            errors.append(
                f"{where('servers')}: $.servers.{sname}.oauth2: set at most one of jwks_uri or jwks_file"
            )
    for iss_url, source in cfg.oauth2_issuers.items():
        if (source.jwks_uri is None) == (source.jwks_file is None):
            errors.append(f"{where('oauth2_issuers')}: $.oauth2_issuers.{iss_url}: "
                          "set exactly one of jwks_uri or jwks_file")
    for agent, spec in cfg.agents.items():
        for i, grant in enumerate(spec.allowed_servers):
            at = f"{where('agents')}: $.agents.{agent}.allowed_servers.{i}"
            server_def = cfg.servers.get(grant.server)
            if server_def is None:
                warnings.append(f'{at}.server: server "{grant.server}" is not declared under servers: '
                                "(the grant has no effect on this host)")
                continue
            for tool in grant.tools:
                if tool not in server_def.tool_scopes:
                    errors.append(f'{at}.tools: tool "{tool}" is not declared by server "{grant.server}"')
        for i, denied in enumerate(spec.denied_servers):
            if denied not in cfg.servers and denied not in cfg.registry.servers:
                warnings.append(f'{where("agents")}: $.agents.{agent}.denied_servers.{i}: '
                                f'server "{denied}" is not declared anywhere')
    for name, entry in cfg.registry.servers.items():
        at = f"{where('registry')}: $.registry.servers.{name}"
        if entry.replacement is not None and entry.replacement not in cfg.registry.servers \
                and entry.replacement not in cfg.servers:
            warnings.append(f'{at}.replacement: server "{entry.replacement}" does not exist in the '
                            "registry or under servers:")
        if entry.status == "deprecated" and entry.deprecation_date is None:
            errors.append(f"{at}.deprecation_date: a deprecated server needs a deprecation_date")
        if entry.health_check is not None and entry.url is None:
            errors.append(f"{at}.url: health_check needs the server's url")
    if cfg.registry.servers:
        for name in cfg.servers:
            if name not in cfg.registry.servers:
                warnings.append(f'{where("servers")}: $.servers.{name}: not in the central registry; '
                                "its calls are denied (server_not_registered)")
    for tool in cfg.limits.per_tool:
        if tool not in declared_tools:
            warnings.append(f'{where("limits")}: $.limits.per_tool.{tool}: no server declares this tool')
    for server, tools in cfg.secrets.items():
        if server not in cfg.servers:
            errors.append(f"{where('secrets')}: $.secrets.{server}: server is not declared under servers:")
            continue
        for tool, refs in tools.items():
            if tool not in cfg.servers[server].tool_scopes:
                errors.append(
                    f"{where('secrets')}: $.secrets.{server}.{tool}: tool is not declared in "
                    f"servers.{server}.tool_scopes"
                )
            for alias, ref in refs.items():
                if ref.backend not in cfg.backends:
                    errors.append(
                        f"{where('secrets')}: $.secrets.{server}.{tool}.{alias}.backend: "
                        f'no backend named "{ref.backend}"'
                    )
    if cfg.approvals.webhook_url is not None:
        problem = _webhook_problem(cfg.approvals.webhook_url)
        if problem:
            errors.append(f"{main}: $.approvals.webhook_url: {problem}")
    redact_lists = [("redact_keys", cfg.audit.redact_keys)] + [
        (f"redact_tool_fields.{tool}", fields) for tool, fields in cfg.audit.redact_tool_fields.items()]
    for at, needles in redact_lists:
        for i, needle in enumerate(needles):
            if not any(c.isalnum() for c in needle):
                errors.append(f"{where('audit')}: $.audit.{at}.{i}: needs a letter or digit (case and "
                              "separators are ignored when matching)")
    file_sinks = [i for i, s in enumerate(cfg.audit.sinks) if isinstance(s, FileSinkConfig)]
    for i in file_sinks[1:]:
        errors.append(f"{where('audit')}: $.audit.sinks.{i}: at most one sink of type file "
                      "(the audit file is audit.path)")
    for i, sink in enumerate(cfg.audit.sinks):
        if isinstance(sink, FileSinkConfig) and not sink.required:
            errors.append(f"{where('audit')}: $.audit.sinks.{i}.required: the file sink is "
                          "always required (it is the source of truth)")
        if isinstance(sink, SyslogSinkConfig):
            if sink.transport == "tcp" and not sink.host:
                errors.append(f"{where('audit')}: $.audit.sinks.{i}.host: transport tcp needs a host")
            if (sink.tls or sink.ca_file) and sink.transport != "tcp":
                errors.append(f"{where('audit')}: $.audit.sinks.{i}.tls: TLS needs transport tcp")
            if sink.ca_file and not sink.tls:
                errors.append(f"{where('audit')}: $.audit.sinks.{i}.ca_file: set tls: true too")
        if isinstance(sink, WebhookSinkConfig):
            errors.extend(f"{where('audit')}: $.audit.sinks.{i}.{problem}"
                          for problem in _webhook_sink_problems(sink, cfg))
    names = [s.name or s.__struct_config__.tag for s in cfg.audit.sinks
             if isinstance(s, SyslogSinkConfig | WebhookSinkConfig)]
    if len(set(names)) != len(names):
        errors.append(f"{where('audit')}: $.audit.sinks: two sinks with the same name "
                      "(set name:)")
    if cfg.audit.checkpoint_key_file is not None and cfg.audit.checkpoint_key_credential is not None:
        errors.append(f"{where('audit')}: $.audit.checkpoint_key_file: set at most one of "
                      "checkpoint_key_file or checkpoint_key_credential")
    if cfg.audit.hmac_key_file is not None and cfg.audit.hmac_key_credential is not None:
        errors.append(f"{where('audit')}: $.audit.hmac_key_file: set at most one of "
                      "hmac_key_file or hmac_key_credential")
    for tool in cfg.audit.redact_tool_fields:
        if tool not in declared_tools:
            warnings.append(f"{where('audit')}: $.audit.redact_tool_fields.{tool}: no server declares this tool")
    for name, ids in cfg.approvals.approver_identities.items():
        at = f"{where('approvals')}: $.approvals.approver_identities.{name[:MAX_APPROVER_NAME_LEN]}"
        errors.extend(at + problem for problem in _approver_identity_problems(name, ids))
    for server, selectors in cfg.peers.items():
        if server not in cfg.servers:
            errors.append(f"{where('peers')}: $.peers.{server}: server is not declared under servers:")
        for i, sel in enumerate(selectors):
            if not any(getattr(sel, f) is not None for f in sel.__struct_fields__):
                errors.append(f"{where('peers')}: $.peers.{server}.{i}: a selector needs at least one key")
            elif (sel.exe is not None or sel.exe_sha256 is not None) and not any(
                getattr(sel, f) is not None for f in BOUNDARY_SELECTOR_KEYS
            ):
                exe_key = "exe" if sel.exe is not None else "exe_sha256"
                warnings.append(
                    f"{where('peers')}: $.peers.{server}.{i}.{exe_key}: {exe_key} is no boundary "
                    "against a user who can run the same interpreter/binary; add uid or unit"
                )
    if cfg.attestation.pid_namespace == "uid_only":
        warnings.extend(_uid_only_warnings(cfg, where("attestation"), where("peers")))
    if cfg.metrics.listen is not None:
        try:
            parse_metrics_listen(cfg.metrics.listen)
        except ValueError as exc:
            errors.append(f"{where('metrics')}: $.metrics.listen: {exc}")
    if cfg.listen.max_anonymous_connections >= cfg.listen.max_connections:
        warnings.append(
            f"{where('listen')}: $.listen.max_anonymous_connections: "
            f"{cfg.listen.max_anonymous_connections} >= max_connections "
            f"({cfg.listen.max_connections}): processes not attested as a service can take "
            "every connection slot"
        )
    for name, backend in cfg.backends.items():
        at = f"{where('backends')}: $.backends.{name}"
        if isinstance(backend, LocalBackendConfig):
            if (backend.key_file is None) == (backend.key_credential is None):
                errors.append(f"{at}: set exactly one of key_file or key_credential")
        elif isinstance(backend, VaultBackendConfig):
            if backend.auth == "token" and (backend.token_file is None) == (backend.token_credential is None):
                errors.append(f"{at}: auth token needs exactly one of token_file or token_credential")
            if backend.auth == "approle":
                if not backend.role_id:
                    errors.append(f"{at}.role_id: auth approle needs role_id")
                if (backend.secret_id_file is None) == (backend.secret_id_credential is None):
                    errors.append(f"{at}: auth approle needs exactly one of secret_id_file or "
                                  "secret_id_credential")
            if (backend.client_cert is None) != (backend.client_key is None):
                errors.append(f"{at}: set both client_cert and client_key, or neither")
        elif isinstance(backend, OAuthBackendConfig):
            errors.extend(f"{at}.{problem}" for problem in _oauth_backend_problems(backend, cfg))
    for server, tools in cfg.secrets.items():
        for tool, refs in tools.items():
            for alias, ref in refs.items():
                backend_cfg = cfg.backends.get(ref.backend)
                if backend_cfg is None:
                    continue  # reported above
                at = f"{where('secrets')}: $.secrets.{server}.{tool}.{alias}"
                errors.extend(f"{at}: {problem}" for problem in _ref_problems(ref, backend_cfg))
                if ref.kind == "oauth_token_exchange" and server in cfg.servers \
                        and cfg.servers[server].oauth2 == "none":
                    errors.append(f"{at}.kind: oauth_token_exchange exchanges the user's "
                                  f"bearer token, and server {server} has oauth2: none "
                                  "(no user token); use oauth_client_credentials")
                if ref.egress is not None:
                    errors.extend(f"{at}.egress{problem}" for problem in egress_rule_problems(
                        alias, ref.egress, max_body_bytes=cfg.listen.max_body_bytes))
            errors.extend(f"{where('secrets')}: $.secrets.{server}.{tool}.{problem}"
                          for problem in egress_tool_problems(
                              {a: r.egress for a, r in refs.items() if r.egress is not None}))
    for issuer in cfg.tokens.trusted_issuers:
        for i, key in enumerate(issuer.keys):
            if (key.public_key is None) == (key.public_key_file is None):
                errors.append(
                    f"{where('tokens')}: $.tokens.trusted_issuers.{issuer.issuer}.keys.{i}: "
                    "set exactly one of public_key or public_key_file"
                )
    if errors:
        raise ConfigError("\n".join(errors))
    return warnings
