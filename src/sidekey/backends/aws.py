"""The ``aws`` backend: AWS Secrets Manager through boto3.

* Reads are ``GetSecretValue`` of the version a :class:`~sidekey.config.SecretRef` names:
  its ``version_id``, else its ``version_stage``, else ``AWSCURRENT``. ``json_key``
  selects one key of a secret that holds a JSON object (the shape the AWS console
  writes for database credentials); the version reported is AWS's ``VersionId``.
* Rotation follows the staging-label protocol of AWS's own rotation functions: the new
  value is written as a version labelled ``AWSPENDING``, then one
  ``UpdateSecretVersionStage`` moves ``AWSCURRENT`` to it (AWS moves ``AWSPREVIOUS`` to
  the old version). Naming the old version in ``RemoveFromVersionId`` makes the
  promotion a compare-and-swap: if another writer rotated meanwhile, it fails and
  nothing is lost, which matters with ``json_key`` (a read-modify-write of the object).
  A failed promotion leaves the old version current and the ``AWSPENDING`` label is
  taken off the orphan again.
* boto3 is blocking: every call runs in a worker thread behind a
  :class:`trio.CapacityLimiter` (``max_concurrency``), under ``trio.fail_after(timeout_s)``
  and abandoned on cancel, so a slow or unreachable AWS costs a caller at most
  ``timeout_s`` and never stalls the event loop. botocore's own connect/read timeouts
  are ``timeout_s`` too, so an abandoned thread ends soon after and frees its slot.
* Credentials come from boto3's default chain (environment, ``profile``, container or
  instance role); nothing here stores or logs them.
* Values never appear in messages or logs: errors name the secret, the AWS error code
  and the operation; AWS's own error text is logged only for calls that carry no value;
  botocore's DEBUG loggers (which print request and response bodies) are held at INFO.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import msgspec
import trio
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from ..protocol import BadRequest, SidekeyError, TooLarge
from . import BackendError, SecretNotFound, SecretValue

if TYPE_CHECKING:
    from mypy_boto3_secretsmanager import SecretsManagerClient
    from mypy_boto3_secretsmanager.type_defs import (
        GetSecretValueRequestTypeDef,
        GetSecretValueResponseTypeDef,
    )

    from ..config import AwsBackendConfig, SecretRef

log = logging.getLogger(__name__)

T = TypeVar("T")

CURRENT = "AWSCURRENT"
PENDING = "AWSPENDING"
PREVIOUS = "AWSPREVIOUS"
# botocore "standard" retries: transient errors (throttling, 5xx, dropped connections)
# are retried with jittered backoff; max_attempts counts the retries after the first try.
MAX_RETRY_ATTEMPTS = 2
# Secrets Manager's limit for SecretString.
MAX_VALUE_BYTES = 65536
# Building the client can resolve credentials (an instance-metadata round trip, an SSO
# cache read): the first call gets this much on top of timeout_s for that.
CLIENT_SETUP_GRACE_S = 10.0
# health() asks AWS at most this often; in between it repeats the last answer, so a
# readiness probe polled every second does not turn into a stream of API calls.
HEALTH_INTERVAL_S = 5.0
_AWS_TEXT_MAX = 300

# Errors about *who* is calling: the credentials are missing, wrong or expired.
_CREDENTIAL_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredTokenException",
        "ExpiredToken",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
    }
)
# Errors about *what* the caller may do: valid credentials, not allowed.
_ACCESS_CODES = frozenset({"AccessDeniedException", "AccessDenied"})
_NOT_FOUND_CODES = frozenset({"ResourceNotFoundException"})
# Error reasons (``details["reason"]``) that mean AWS received the request and answered.
_ANSWERED = frozenset({"credentials", "access_denied", "decryption", "aws_error"})

_json_decoder = msgspec.json.Decoder()
_json_encoder = msgspec.json.Encoder()
_SPACE_RE = re.compile(r"\s+")

_LOUD_LOGGERS = ("botocore", "boto3")


def _quiet_boto_loggers() -> None:
    # botocore logs whole request parameters (PutSecretValue's SecretString) and response
    # bodies (GetSecretValue's) at DEBUG. A daemon started with --log-level debug must
    # not print secret values, so these loggers never inherit DEBUG from the root: their
    # own level is raised to INFO (a stricter level someone set is kept).
    for name in _LOUD_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.INFO:  # NOTSET (inherit) or DEBUG
            logger.setLevel(logging.INFO)


class AwsBackend:
    """:class:`~sidekey.backends.Backend` over AWS Secrets Manager.

    ``clock`` (wall-clock seconds) stamps and paces :meth:`health`. No network I/O
    happens here: the boto3 client is created on first use, in a worker thread.
    """

    def __init__(
        self,
        name: str,
        cfg: AwsBackendConfig,
        *,
        clock: Callable[[], float] = time.time,
        health_interval_s: float = HEALTH_INTERVAL_S,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self._clock = clock
        self._health_interval_s = health_interval_s
        self._limiter = trio.CapacityLimiter(cfg.max_concurrency)
        self._client: SecretsManagerClient | None = None
        # Guards client creation only (threads may race to create it); never taken on
        # the event loop.
        self._client_lock = threading.Lock()
        self._closed = False
        self._endpoint = cfg.endpoint_url or f"https://secretsmanager.{cfg.region}.amazonaws.com"
        self._health: dict[str, object] | None = None
        self._health_at = 0.0
        _quiet_boto_loggers()

    # ----------------------------------------------------------------- reading

    async def fetch(self, ref: SecretRef) -> SecretValue:
        """Return the version of ``ref.secret_id`` that ``ref`` selects (AWSCURRENT by
        default), or one key of it with ``json_key``. ``version`` is AWS's VersionId.

        Raises :class:`SecretNotFound` (no such secret, version or JSON key; a value
        that is not text) or :class:`BackendError` (denied, unreachable, timed out).
        """
        secret_id = _secret_id(ref)
        what = _describe(ref)
        request: GetSecretValueRequestTypeDef = {"SecretId": secret_id}
        if ref.version_id is not None:
            request["VersionId"] = ref.version_id
        else:
            request["VersionStage"] = ref.version_stage or CURRENT
        resp = await self._call(
            "GetSecretValue", what, lambda c: c.get_secret_value(**request)
        )
        text = _secret_text(resp, what)
        if ref.json_key is not None:
            text = _json_field(text, ref.json_key, what)
        return SecretValue(value=text, version=resp["VersionId"])

    async def release(self, lease_id: str) -> None:
        """AWS secrets are static: there is no backend lease to end."""

    # ----------------------------------------------------------------- rotation

    async def rotate(self, ref: SecretRef, value: str) -> str:
        """Make ``value`` the AWSCURRENT version of ``ref.secret_id``; return its VersionId.

        With ``json_key`` only that key of the current JSON object changes; the other
        keys are written back as they were. The old version becomes AWSPREVIOUS. If the
        promotion fails the old version stays AWSCURRENT. Raises :class:`BadRequest`
        (pinned reference, empty value), :class:`TooLarge`, :class:`SecretNotFound`,
        :class:`BackendError`.
        """
        secret_id = _secret_id(ref)
        if ref.version_id is not None or ref.version_stage not in (None, CURRENT):
            raise BadRequest(
                f'secret "{ref.label}" is pinned to a version; rotating writes a new '
                f"{CURRENT} version that this reference would not read"
            )
        _check_value(value)
        what = f'secret "{ref.label}"'
        if ref.json_key is None:
            current_id = await self._current_version_id(secret_id, what)
            new_string = value
        else:
            resp = await self._call(
                "GetSecretValue",
                what,
                lambda c: c.get_secret_value(SecretId=secret_id, VersionStage=CURRENT),
            )
            current_id = resp["VersionId"]
            new_string = _with_json_field(_secret_text(resp, what), ref.json_key, value, what)
        if len(new_string.encode("utf-8")) > MAX_VALUE_BYTES:
            raise TooLarge(
                f"{what}: the new value would exceed Secrets Manager's {MAX_VALUE_BYTES} bytes",
                code="secret_too_large",
            )
        # The request token becomes the VersionId; botocore's retries resend the same
        # token, so a retried write cannot create a second version.
        token = str(uuid.uuid4())
        if current_id is None:
            # A secret created without a value: its first version is current at once.
            version = await self._put(secret_id, token, new_string, [CURRENT], what)
        else:
            version = await self._put(secret_id, token, new_string, [PENDING], what)
            await self._promote(secret_id, version, current_id, what)
            # AWSPENDING has done its job; AWS's own rotation removes it at the end too.
            await self._drop_pending(secret_id, version, what)
        log.info("rotated AWS %s in backend %r to version %s", what, self.name, version)
        return version

    async def _put(
        self, secret_id: str, token: str, secret_string: str, stages: list[str], what: str
    ) -> str:
        resp = await self._call(
            "PutSecretValue",
            what,
            lambda c: c.put_secret_value(
                SecretId=secret_id,
                ClientRequestToken=token,
                SecretString=secret_string,
                VersionStages=stages,
            ),
            carries_value=True,
        )
        return resp["VersionId"]

    async def _promote(self, secret_id: str, new_id: str, old_id: str, what: str) -> None:
        failure: SidekeyError
        try:
            await self._call(
                "UpdateSecretVersionStage",
                what,
                lambda c: c.update_secret_version_stage(
                    SecretId=secret_id,
                    VersionStage=CURRENT,
                    MoveToVersionId=new_id,
                    RemoveFromVersionId=old_id,
                ),
            )
            return
        except SidekeyError as exc:
            failure = exc
        except BaseException:
            # Cancelled between write and promotion: the old version is still current;
            # take the AWSPENDING label off the orphan before going.
            with trio.CancelScope(shield=True):
                await self._drop_pending(secret_id, new_id, what)
            raise
        # A timeout or a dropped connection does not say whether AWS applied the
        # promotion: ask which version is current now. (A promotion still in flight in
        # an abandoned thread can land after this check; the caller then sees a failure
        # for a rotation that took effect, and the old value stays valid as AWSPREVIOUS.)
        current = await self._current_version_id_or_none(secret_id, what)
        if current == new_id:
            return
        await self._drop_pending(secret_id, new_id, what)
        if current == old_id:
            outcome = f"version {old_id} stays {CURRENT}"
        elif current is None:
            outcome = f"could not confirm which version is {CURRENT}"
        else:
            outcome = f"version {current} became {CURRENT} meanwhile (a concurrent rotation?)"
        message = f"rotation of {what} failed: {failure.message}; {outcome}"
        log.warning("AWS backend %r: %s", self.name, message)
        if isinstance(failure, SecretNotFound):
            raise SecretNotFound(message, **failure.details)
        raise BackendError(message, **failure.details)

    async def _drop_pending(self, secret_id: str, version_id: str, what: str) -> None:
        try:
            await self._call(
                "UpdateSecretVersionStage",
                what,
                lambda c: c.update_secret_version_stage(
                    SecretId=secret_id, VersionStage=PENDING, RemoveFromVersionId=version_id
                ),
            )
        except SidekeyError as exc:
            # Harmless leftover: AWS moves the label to the next version written with it.
            log.warning(
                "AWS backend %r: could not remove %s from version %s of %s: %s",
                self.name, PENDING, version_id, what, exc.message,
            )

    async def _current_version_id(self, secret_id: str, what: str) -> str | None:
        resp = await self._call(
            "DescribeSecret", what, lambda c: c.describe_secret(SecretId=secret_id)
        )
        for version_id, stages in resp.get("VersionIdsToStages", {}).items():
            if CURRENT in stages:
                return version_id
        return None

    async def _current_version_id_or_none(self, secret_id: str, what: str) -> str | None:
        try:
            return await self._current_version_id(secret_id, what)
        except SidekeyError:
            return None

    # ----------------------------------------------------------------- health, close

    async def health(self) -> dict[str, object]:
        """``{"type": "aws", "ok", "reachable", "region", "endpoint", "checked_at"}`` plus
        ``error`` when not ok. Probes with ``ListSecrets`` (one result, names only, never
        values) at most every ``health_interval_s``.

        A ``ListSecrets`` that AWS *denies* still proves the endpoint is reachable and the
        credentials valid: least-privilege roles need only GetSecretValue, so that is
        reported ok with a ``note``.
        """
        now = self._clock()
        if self._health is not None and 0 <= now - self._health_at < self._health_interval_s:
            return dict(self._health)
        info: dict[str, object] = {
            "type": "aws",
            "region": self.cfg.region,
            "endpoint": self._endpoint,
            "checked_at": now,
        }
        try:
            await self._call(
                "ListSecrets",
                "the secret list",
                lambda c: c.list_secrets(MaxResults=1),
                quiet=True,
            )
            info.update(ok=True, reachable=True)
        except SidekeyError as exc:
            reason = exc.details.get("reason")
            if reason == "access_denied":
                info.update(
                    ok=True,
                    reachable=True,
                    note="ListSecrets is not allowed for these credentials (fetches do not need it)",
                )
            else:
                info.update(
                    ok=False,
                    # Did AWS answer at all? Only then are the credentials known to matter.
                    reachable=reason in _ANSWERED,
                    error=exc.message,
                )
        self._health, self._health_at = dict(info), now
        return info

    async def aclose(self) -> None:
        """Close the client's connection pool. Later calls raise :class:`BackendError`.
        Idempotent. Threads abandoned by a timeout finish on their own."""
        if self._closed:
            return
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            client.close()  # clears urllib3's pools: closes sockets, no network I/O

    # ----------------------------------------------------------------- plumbing

    async def _call(
        self,
        op: str,
        what: str,
        fn: Callable[[SecretsManagerClient], T],
        *,
        carries_value: bool = False,
        quiet: bool = False,
    ) -> T:
        """Run ``fn(client)`` in a worker thread; translate every failure once, here.

        ``carries_value``: the request holds a secret value, so AWS's error text is not
        logged. ``quiet``: failures are logged at DEBUG (the periodic health probe).
        """
        client = await self._ready_client()
        timeout = self.cfg.timeout_s
        try:
            with trio.fail_after(timeout):
                return await trio.to_thread.run_sync(
                    self._in_thread,
                    fn,
                    client,
                    op,
                    what,
                    carries_value,
                    quiet,
                    limiter=self._limiter,
                    abandon_on_cancel=True,
                )
        except trio.TooSlowError:
            pass
        log.log(
            logging.DEBUG if quiet else logging.WARNING,
            "AWS backend %r: %s for %s timed out after %ss", self.name, op, what, timeout,
        )
        raise BackendError(
            f"AWS Secrets Manager ({self._endpoint}) did not answer {op} for {what} "
            f"within {timeout:g}s",
            reason="timeout",
        )

    def _in_thread(
        self,
        fn: Callable[[SecretsManagerClient], T],
        client: SecretsManagerClient,
        op: str,
        what: str,
        carries_value: bool,
        quiet: bool,
    ) -> T:
        # Runs in the worker thread. The translated error is raised *outside* the
        # except block, so it carries no __context__: botocore's frames (whose locals
        # hold request parameters and response bodies) do not travel with it.
        error: SidekeyError
        try:
            return fn(client)
        except ClientError as exc:
            error = self._client_error(exc, op, what, carries_value, quiet)
        except BotoCoreError as exc:
            error = self._botocore_error(exc, op, what, quiet)
        raise error

    async def _ready_client(self) -> SecretsManagerClient:
        if self._closed:
            raise BackendError(f"AWS backend {self.name!r} is closed", reason="closed")
        client = self._client
        if client is not None:
            return client
        limit = self.cfg.timeout_s + CLIENT_SETUP_GRACE_S
        try:
            with trio.fail_after(limit):
                return await trio.to_thread.run_sync(
                    self._setup_client, limiter=self._limiter, abandon_on_cancel=True
                )
        except trio.TooSlowError:
            pass
        raise BackendError(
            f"AWS backend {self.name!r}: creating the Secrets Manager client (loading "
            f"credentials) took longer than {limit:g}s",
            reason="setup",
        )

    def _setup_client(self) -> SecretsManagerClient:
        error: SidekeyError
        with self._client_lock:
            if self._client is not None:
                return self._client
            if self._closed:
                raise BackendError(f"AWS backend {self.name!r} is closed", reason="closed")
            try:
                session = boto3.session.Session(
                    profile_name=self.cfg.profile, region_name=self.cfg.region
                )
                client = session.client(
                    "secretsmanager",
                    endpoint_url=self.cfg.endpoint_url,
                    config=Config(
                        connect_timeout=self.cfg.timeout_s,
                        read_timeout=self.cfg.timeout_s,
                        retries={"max_attempts": MAX_RETRY_ATTEMPTS, "mode": "standard"},
                        max_pool_connections=self.cfg.max_concurrency,
                        user_agent_extra="sidekey",
                    ),
                )
            except ProfileNotFound:
                error = BackendError(
                    f"AWS backend {self.name!r}: profile {self.cfg.profile!r} is not in the "
                    "AWS config or credentials file",
                    reason="setup",
                )
            except (BotoCoreError, ValueError) as exc:
                error = BackendError(
                    f"AWS backend {self.name!r}: cannot create the Secrets Manager client: "
                    f"{type(exc).__name__}: {_one_line(str(exc))}",
                    reason="setup",
                )
            else:
                self._client = client
                self._endpoint = client.meta.endpoint_url
                log.debug("AWS backend %r: client for %s ready", self.name, self._endpoint)
                return client
        raise error

    def _client_error(
        self, exc: ClientError, op: str, what: str, carries_value: bool, quiet: bool
    ) -> SidekeyError:
        err: Any = exc.response.get("Error", {})
        code = str(err.get("Code") or "Unknown")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if not carries_value:
            # AWS's text names the principal and the missing permission, which is what
            # an operator needs; it goes to the log only, not to the (less trusted)
            # caller. PutSecretValue's is never logged: it is the one call with a value.
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "AWS backend %r: %s for %s failed: %s: %s",
                self.name, op, what, code, _one_line(str(err.get("Message", "")))[:_AWS_TEXT_MAX],
            )
        if code in _NOT_FOUND_CODES:
            return SecretNotFound(
                f"AWS {what} was not found in {self.cfg.region}", aws_error=code
            )
        if code in _CREDENTIAL_CODES:
            return BackendError(
                f"AWS rejected the credentials ({code}) for {what}: check the instance "
                "role / AWS credentials of the daemon",
                reason="credentials",
                aws_error=code,
            )
        # Some AWS-compatible endpoints answer a denial with a bare HTTP 403 and no
        # JSON error code; that is still a denial.
        if code in _ACCESS_CODES or status == 403:
            return BackendError(
                f"AWS denied access to {what} ({op}): check the instance role / "
                "credentials and their IAM policy",
                reason="access_denied",
                aws_error=code,
            )
        if code == "DecryptionFailure":
            return BackendError(
                f"AWS could not decrypt {what} with its KMS key: check kms:Decrypt "
                "for the instance role / credentials",
                reason="decryption",
                aws_error=code,
            )
        return BackendError(
            f"AWS Secrets Manager failed {op} for {what} ({code})",
            reason="aws_error",
            aws_error=code,
        )

    def _botocore_error(
        self, exc: BotoCoreError, op: str, what: str, quiet: bool
    ) -> SidekeyError:
        kind = type(exc).__name__
        log.log(
            logging.DEBUG if quiet else logging.WARNING,
            "AWS backend %r: %s for %s failed: %s", self.name, op, what, kind,
        )
        if isinstance(exc, NoCredentialsError):
            return BackendError(
                f"no AWS credentials found for {what} (environment, profile, container "
                "or instance role)",
                reason="no_credentials",
            )
        if isinstance(exc, PartialCredentialsError | CredentialRetrievalError):
            return BackendError(
                f"cannot load AWS credentials for {what} ({kind})", reason="no_credentials"
            )
        if isinstance(exc, ConnectTimeoutError | ReadTimeoutError):
            return BackendError(
                f"AWS Secrets Manager ({self._endpoint}) timed out on {op} for {what}",
                reason="timeout",
            )
        # Connection refused, DNS, TLS, a connection reset or closed mid-answer.
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            return BackendError(
                f"cannot reach AWS Secrets Manager at {self._endpoint} ({kind}) for {what}",
                reason="unreachable",
            )
        return BackendError(f"AWS client error on {op} for {what} ({kind})", reason="client")


# --------------------------------------------------------------------------- helpers


def _secret_id(ref: SecretRef) -> str:
    if ref.secret_id is None:
        raise SecretNotFound(f'secret "{ref.label}": an aws secret reference needs a secret_id')
    return ref.secret_id


def _describe(ref: SecretRef) -> str:
    if ref.version_id is not None:
        return f'secret "{ref.label}" (version_id {ref.version_id})'
    if ref.version_stage not in (None, CURRENT):
        return f'secret "{ref.label}" (version_stage {ref.version_stage})'
    return f'secret "{ref.label}"'


def _secret_text(resp: GetSecretValueResponseTypeDef, what: str) -> str:
    string = resp.get("SecretString")
    if string is not None:
        return string
    binary = resp.get("SecretBinary")
    if binary is None:
        raise SecretNotFound(f"AWS {what} has no value")
    text: str | None
    try:
        # botocore has already undone the wire's base64: these are the stored bytes.
        text = bytes(binary).decode("utf-8")
    except UnicodeDecodeError:
        text = None  # raised below, outside the handler: the error holds the bytes
    if text is None:
        raise SecretNotFound(f"AWS {what} holds binary data that is not UTF-8 text")
    return text


def _json_object(text: str, json_key: str, what: str) -> dict[str, Any]:
    doc: Any
    try:
        doc = _json_decoder.decode(text)
    except msgspec.DecodeError:
        doc = None
    if not isinstance(doc, dict):
        raise SecretNotFound(f'AWS {what} is not a JSON object (json_key "{json_key}")')
    return doc


def _json_field(text: str, json_key: str, what: str) -> str:
    doc = _json_object(text, json_key, what)
    if json_key not in doc or doc[json_key] is None:
        raise SecretNotFound(f'AWS {what} has no JSON key "{json_key}"')
    field = doc[json_key]
    # Non-string members (a port number, a nested object) are handed out as JSON text.
    return field if isinstance(field, str) else _json_encoder.encode(field).decode()


def _with_json_field(text: str, json_key: str, value: str, what: str) -> str:
    doc = _json_object(text, json_key, what)
    doc[json_key] = value
    return _json_encoder.encode(doc).decode()


def _check_value(value: str) -> None:
    if not value:
        raise BadRequest("secret value is empty", code="secret_empty")
    size: int | None
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        size = None  # raised below, outside the handler: the error holds the value
    if size is None:
        raise BadRequest("secret value is not valid UTF-8", code="secret_not_utf8")
    if size > MAX_VALUE_BYTES:
        raise TooLarge(
            f"secret value is larger than {MAX_VALUE_BYTES} bytes", code="secret_too_large"
        )


def _one_line(text: str) -> str:
    return _SPACE_RE.sub(" ", text).strip()
