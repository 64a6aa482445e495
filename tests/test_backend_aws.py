"""The aws backend, through boto3 over HTTP against a real ``moto_server``.

Every test that talks to moto runs under ``trio.fail_after``. Two cases cannot be
produced by moto and use stand-ins, said where they are: error codes moto does not send
in AWS's JSON shape (botocore's ``Stubber`` on the backend's own client), and a
promotion that fails or whose answer is lost (the client's ``update_secret_version_stage``
wrapped, with the real call still going to moto where it should).
"""

from __future__ import annotations

import json
import logging
import math
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import boto3
import msgspec
import pytest
import trio
import trio.testing
from botocore.exceptions import ClientError, ReadTimeoutError
from botocore.stub import Stubber

from moto_server import (
    REGION,
    closed_port_url,
    moto_api_post,
    run_moto_server,
    use_aws_test_env,
)
from sidekey.backends import BackendError, SecretNotFound
from sidekey.backends import aws as aws_mod
from sidekey.backends.aws import AwsBackend
from sidekey.config import AwsBackendConfig, SecretRef
from sidekey.protocol import BadRequest, TooLarge

VALUE = "s3cr3t-Value-xyzzy"
VALUE2 = "n3w-Value-plugh"
LIMIT_S = 30  # every test that waits on moto or a socket is bounded by this


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with run_moto_server() as url:
        yield url


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    use_aws_test_env(monkeypatch)


@pytest.fixture
def sm(moto_url: str, aws_env: None) -> Any:
    """A plain boto3 client on moto, for setting up and inspecting secrets."""
    return boto3.client("secretsmanager", endpoint_url=moto_url, region_name=REGION)


@pytest.fixture
def sid() -> str:
    """A secret name no other test uses (the moto server is shared by the module)."""
    return f"sk-test/{uuid.uuid4().hex[:12]}"


def make_cfg(url: str | None, **overrides: Any) -> AwsBackendConfig:
    doc: dict[str, Any] = {"type": "aws", "region": REGION, "timeout_s": 10.0, **overrides}
    if url is not None:
        doc["endpoint_url"] = url
    return msgspec.convert(doc, AwsBackendConfig)


def make_ref(secret_id: str, **fields: Any) -> SecretRef:
    return msgspec.convert({"backend": "aws", "secret_id": secret_id, **fields}, SecretRef)


@pytest.fixture
async def backend(moto_url: str, aws_env: None) -> AsyncIterator[AwsBackend]:
    b = AwsBackend("aws-test", make_cfg(moto_url))
    try:
        yield b
    finally:
        await b.aclose()


def stages(sm: Any, secret_id: str) -> dict[str, list[str]]:
    return dict(sm.describe_secret(SecretId=secret_id)["VersionIdsToStages"])


def current(sm: Any, secret_id: str) -> Any:
    # VersionStage explicitly: moto's GetSecretValue without one returns the version
    # PutSecretValue last made current and ignores UpdateSecretVersionStage (real AWS
    # defaults to AWSCURRENT). The backend always names the stage for the same reason.
    return sm.get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")


# --------------------------------------------------------------------------- reading


async def test_fetch_current_previous_and_by_version_id(
    backend: AwsBackend, sm: Any, sid: str
) -> None:
    first = sm.create_secret(Name=sid, SecretString=VALUE)["VersionId"]
    with trio.fail_after(LIMIT_S):
        got = await backend.fetch(make_ref(sid))
        assert (got.value, got.version) == (VALUE, first)
        assert VALUE not in repr(got)

        second = await backend.rotate(make_ref(sid), VALUE2)
        assert second != first
        assert (await backend.fetch(make_ref(sid))).value == VALUE2
        assert (await backend.fetch(make_ref(sid, version_stage="AWSCURRENT"))).version == second
        prev = await backend.fetch(make_ref(sid, version_stage="AWSPREVIOUS"))
        assert (prev.value, prev.version) == (VALUE, first)
        pinned = await backend.fetch(make_ref(sid, version_id=first))
        assert (pinned.value, pinned.version) == (VALUE, first)


async def test_json_key_selection(backend: AwsBackend, sm: Any, sid: str) -> None:
    doc = {"username": "appuser", "password": VALUE, "port": 5432, "opts": {"ssl": True}, "n": None}
    sm.create_secret(Name=sid, SecretString=json.dumps(doc))
    with trio.fail_after(LIMIT_S):
        assert (await backend.fetch(make_ref(sid, json_key="password"))).value == VALUE
        assert (await backend.fetch(make_ref(sid, json_key="username"))).value == "appuser"
        # Non-string members are handed out as JSON text.
        assert (await backend.fetch(make_ref(sid, json_key="port"))).value == "5432"
        assert json.loads((await backend.fetch(make_ref(sid, json_key="opts"))).value) == {
            "ssl": True
        }
        for key in ("missing", "n"):
            with pytest.raises(SecretNotFound) as nf:
                await backend.fetch(make_ref(sid, json_key=key))
            assert f'"{key}"' in nf.value.message and sid in nf.value.message
            assert VALUE not in nf.value.message and "appuser" not in nf.value.message


async def test_json_key_on_a_value_that_is_not_a_json_object(
    backend: AwsBackend, sm: Any, sid: str
) -> None:
    sm.create_secret(Name=sid, SecretString=VALUE)
    sm.create_secret(Name=sid + "-list", SecretString=json.dumps([VALUE]))
    with trio.fail_after(LIMIT_S):
        for secret_id in (sid, sid + "-list"):
            with pytest.raises(SecretNotFound) as nf:
                await backend.fetch(make_ref(secret_id, json_key="password"))
            assert "not a JSON object" in nf.value.message and '"password"' in nf.value.message
            assert VALUE not in str(nf.value)
            # Raised outside the handler: no decode error (holding the text) is attached.
            assert nf.value.__context__ is None and nf.value.__cause__ is None


async def test_secret_binary(backend: AwsBackend, sm: Any, sid: str) -> None:
    sm.create_secret(Name=sid, SecretBinary=VALUE.encode())
    sm.create_secret(Name=sid + "-raw", SecretBinary=b"\xff\xfe" + VALUE.encode())
    with trio.fail_after(LIMIT_S):
        assert (await backend.fetch(make_ref(sid))).value == VALUE
        with pytest.raises(SecretNotFound) as nf:
            await backend.fetch(make_ref(sid + "-raw"))
        assert "not UTF-8" in nf.value.message and VALUE not in nf.value.message
        assert nf.value.__context__ is None


async def test_missing_secret_version_and_stage(backend: AwsBackend, sm: Any, sid: str) -> None:
    sm.create_secret(Name=sid, SecretString=VALUE)
    with trio.fail_after(LIMIT_S):
        with pytest.raises(SecretNotFound) as nf:
            await backend.fetch(make_ref(sid + "-nope"))
        assert nf.value.code == "secret_not_found" and nf.value.status == 503
        assert sid + "-nope" in nf.value.message
        with pytest.raises(SecretNotFound) as nv:
            await backend.fetch(make_ref(sid, version_id=str(uuid.uuid4())))
        assert "version_id" in nv.value.message
        # A fresh secret has no AWSPREVIOUS yet.
        with pytest.raises(SecretNotFound) as ns:
            await backend.fetch(make_ref(sid, version_stage="AWSPREVIOUS"))
        assert "AWSPREVIOUS" in ns.value.message


async def test_concurrent_fetches_share_the_limited_client(
    moto_url: str, sm: Any, sid: str
) -> None:
    sm.create_secret(Name=sid, SecretString=VALUE)
    b = AwsBackend("aws-test", make_cfg(moto_url, max_concurrency=2))
    results: list[str] = []

    async def one() -> None:
        results.append((await b.fetch(make_ref(sid))).value)

    try:
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                for _ in range(12):
                    nursery.start_soon(one)
    finally:
        await b.aclose()
    assert results == [VALUE] * 12


# --------------------------------------------------------------------------- rotation


async def test_rotate_moves_the_stages(backend: AwsBackend, sm: Any, sid: str) -> None:
    first = sm.create_secret(Name=sid, SecretString=VALUE)["VersionId"]
    with trio.fail_after(LIMIT_S):
        second = await backend.rotate(make_ref(sid), VALUE2)
        assert stages(sm, sid) == {first: ["AWSPREVIOUS"], second: ["AWSCURRENT"]}
        third = await backend.rotate(make_ref(sid), "third ünïcode")
        got = await backend.fetch(make_ref(sid))
    assert (got.value, got.version) == ("third ünïcode", third)
    labels = stages(sm, sid)
    assert labels[third] == ["AWSCURRENT"] and labels[second] == ["AWSPREVIOUS"]
    assert not labels.get(first)  # no label left: AWS may delete it
    assert all("AWSPENDING" not in s for s in labels.values())


async def test_rotate_json_key_keeps_the_other_keys(
    backend: AwsBackend, sm: Any, sid: str
) -> None:
    doc = {"username": "app", "password": VALUE, "port": 5432}
    first = sm.create_secret(Name=sid, SecretString=json.dumps(doc))["VersionId"]
    with trio.fail_after(LIMIT_S):
        version = await backend.rotate(make_ref(sid, json_key="password"), VALUE2)
        got = await backend.fetch(make_ref(sid, json_key="password"))
    assert (got.value, got.version) == (VALUE2, version)
    assert json.loads(current(sm, sid)["SecretString"]) == {
        "username": "app",
        "password": VALUE2,
        "port": 5432,
    }
    assert stages(sm, sid)[first] == ["AWSPREVIOUS"]


async def test_rotate_a_secret_without_a_value(backend: AwsBackend, sm: Any, sid: str) -> None:
    sm.create_secret(Name=sid)
    with trio.fail_after(LIMIT_S):
        version = await backend.rotate(make_ref(sid), VALUE)
        got = await backend.fetch(make_ref(sid))
    assert (got.value, got.version) == (VALUE, version)
    assert stages(sm, sid) == {version: ["AWSCURRENT"]}


async def test_rotate_refusals(backend: AwsBackend, sm: Any, sid: str) -> None:
    first = sm.create_secret(Name=sid, SecretString=VALUE)["VersionId"]
    with trio.fail_after(LIMIT_S):
        with pytest.raises(SecretNotFound):
            await backend.rotate(make_ref(sid + "-nope"), VALUE2)
        with pytest.raises(BadRequest, match="pinned"):
            await backend.rotate(make_ref(sid, version_id=first), VALUE2)
        with pytest.raises(BadRequest, match="pinned"):
            await backend.rotate(make_ref(sid, version_stage="AWSPREVIOUS"), VALUE2)
        with pytest.raises(BadRequest) as empty:
            await backend.rotate(make_ref(sid), "")
        assert empty.value.code == "secret_empty"
        with pytest.raises(BadRequest) as bad:
            await backend.rotate(make_ref(sid), "bad \udc80 surrogate")
        assert bad.value.code == "secret_not_utf8" and bad.value.__context__ is None
        with pytest.raises(TooLarge):
            await backend.rotate(make_ref(sid), "x" * (aws_mod.MAX_VALUE_BYTES + 1))
        # with json_key the limit applies to the whole object that would be written
        sm.put_secret_value(SecretId=sid, SecretString=json.dumps({"a": "x" * 40000}))
        with pytest.raises(TooLarge):
            await backend.rotate(make_ref(sid, json_key="b"), "y" * 30000)
    assert stages(sm, sid)[current(sm, sid)["VersionId"]] == ["AWSCURRENT"]
    assert len(stages(sm, sid)) == 2  # nothing was written by the refused rotations


def _wrap_promotion(
    backend: AwsBackend, monkeypatch: pytest.MonkeyPatch, before: Any = None, after: Any = None
) -> list[dict[str, Any]]:
    """Wrap the backend client's UpdateSecretVersionStage: ``before(kwargs)`` runs
    instead of / ahead of the real call for the AWSCURRENT promotion, ``after(kwargs)``
    after it. Other stage updates (the AWSPENDING cleanup) go to moto untouched."""
    client = backend._client
    assert client is not None
    real = client.update_secret_version_stage
    calls: list[dict[str, Any]] = []

    def wrapped(**kwargs: Any) -> Any:
        calls.append(kwargs)
        if kwargs["VersionStage"] == "AWSCURRENT" and before is not None:
            before(kwargs)
        result = real(**kwargs)
        if kwargs["VersionStage"] == "AWSCURRENT" and after is not None:
            after(kwargs)
        return result

    monkeypatch.setattr(client, "update_secret_version_stage", wrapped)
    return calls


async def test_failed_promotion_leaves_the_old_version_current(
    backend: AwsBackend, sm: Any, sid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = sm.create_secret(Name=sid, SecretString=VALUE)["VersionId"]

    def fail(kwargs: dict[str, Any]) -> None:
        raise ClientError(
            {"Error": {"Code": "InternalServiceError", "Message": "stand-in failure"}},
            "UpdateSecretVersionStage",
        )

    with trio.fail_after(LIMIT_S):
        await backend.fetch(make_ref(sid))  # creates the client to wrap
        calls = _wrap_promotion(backend, monkeypatch, before=fail)
        with pytest.raises(BackendError) as err:
            await backend.rotate(make_ref(sid), VALUE2)
        got = await backend.fetch(make_ref(sid))
    assert err.value.code == "backend_unavailable" and err.value.status == 503
    assert f"version {first} stays AWSCURRENT" in err.value.message
    assert "InternalServiceError" in err.value.message and VALUE2 not in err.value.message
    assert (got.value, got.version) == (VALUE, first)
    # The orphan lost its AWSPENDING label again.
    assert [c["VersionStage"] for c in calls] == ["AWSCURRENT", "AWSPENDING"]
    labels = stages(sm, sid)
    assert labels[first] == ["AWSCURRENT"]
    assert all("AWSPENDING" not in s for s in labels.values())


async def test_lost_promotion_answer_is_checked_not_assumed(
    backend: AwsBackend, sm: Any, sid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sm.create_secret(Name=sid, SecretString=VALUE)

    def lose_answer(kwargs: dict[str, Any]) -> None:
        raise ReadTimeoutError(endpoint_url="http://stand-in")

    with trio.fail_after(LIMIT_S):
        await backend.fetch(make_ref(sid))
        _wrap_promotion(backend, monkeypatch, after=lose_answer)
        version = await backend.rotate(make_ref(sid), VALUE2)  # applied: a success
        got = await backend.fetch(make_ref(sid))
    assert (got.value, got.version) == (VALUE2, version)
    assert stages(sm, sid)[version] == ["AWSCURRENT"]


async def test_concurrent_rotation_is_not_overwritten(
    backend: AwsBackend, sm: Any, sid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sm.create_secret(Name=sid, SecretString=json.dumps({"user": "u", "password": VALUE}))
    other = {}

    def someone_else_rotates(kwargs: dict[str, Any]) -> None:
        # Between our read and our promotion another writer makes its own version current.
        other["id"] = sm.put_secret_value(
            SecretId=sid, SecretString=json.dumps({"user": "u2", "password": "theirs"})
        )["VersionId"]

    with trio.fail_after(LIMIT_S):
        await backend.fetch(make_ref(sid))
        _wrap_promotion(backend, monkeypatch, before=someone_else_rotates)
        with pytest.raises(BackendError) as err:
            await backend.rotate(make_ref(sid, json_key="password"), VALUE2)
        monkeypatch.undo()
    assert f"version {other['id']} became AWSCURRENT meanwhile" in err.value.message
    # Their write (with user u2) stands; ours did not silently undo it.
    assert json.loads(current(sm, sid)["SecretString"])["user"] == "u2"
    assert all("AWSPENDING" not in s for s in stages(sm, sid).values())


# --------------------------------------------------------------------------- errors


async def test_access_denied_against_moto_with_iam_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto enforces IAM once ``/moto-api/reset-auth`` sets INITIAL_NO_AUTH_ACTION_COUNT;
    a dedicated server, since that is server-wide state."""
    with run_moto_server() as url:
        admin = boto3.client("secretsmanager", endpoint_url=url, region_name=REGION)
        iam = boto3.client("iam", endpoint_url=url, region_name=REGION)
        admin.create_secret(Name="db/password", SecretString=VALUE)
        iam.create_user(UserName="mcp")  # no policy at all: everything is denied
        key = iam.create_access_key(UserName="mcp")["AccessKey"]
        moto_api_post(url, "/moto-api/reset-auth", b"0")  # authenticate from now on

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        b = AwsBackend("aws-test", make_cfg(url), health_interval_s=0)
        try:
            with trio.fail_after(LIMIT_S):
                with pytest.raises(BackendError) as denied:
                    await b.fetch(make_ref("db/password"))
                health = await b.health()
        finally:
            await b.aclose()
    assert denied.value.code == "backend_unavailable" and denied.value.status == 503
    assert 'AWS denied access to secret "db/password"' in denied.value.message
    assert "instance role" in denied.value.message
    assert denied.value.details["reason"] == "access_denied"
    assert VALUE not in str(denied.value)
    # Denied ListSecrets: reachable, credentials valid; a least-privilege role is fine.
    assert health["ok"] is True and health["reachable"] is True and "note" in health


@pytest.mark.parametrize(
    ("aws_code", "reason", "words"),
    [
        ("UnrecognizedClientException", "credentials", "rejected the credentials"),
        ("ExpiredTokenException", "credentials", "rejected the credentials"),
        ("AccessDeniedException", "access_denied", "denied access"),
        ("DecryptionFailure", "decryption", "KMS"),
        ("InternalServiceError", "aws_error", "InternalServiceError"),
    ],
)
async def test_aws_error_codes_are_mapped(
    moto_url: str, aws_code: str, reason: str, words: str
) -> None:
    """moto answers IAM failures as XML with a bare 403 (covered above), so AWS's JSON
    error codes are produced with botocore's Stubber on the backend's own client."""
    b = AwsBackend("aws-test", make_cfg(moto_url))
    try:
        with trio.fail_after(LIMIT_S):
            client = await b._ready_client()
            with Stubber(client) as stub:
                stub.add_client_error(
                    "get_secret_value", service_error_code=aws_code, http_status_code=400
                )
                with pytest.raises(BackendError) as err:
                    await b.fetch(make_ref("db/password"))
                stub.assert_no_pending_responses()
    finally:
        await b.aclose()
    assert err.value.details == {"reason": reason, "aws_error": aws_code}
    assert words in err.value.message and 'secret "db/password"' in err.value.message
    assert err.value.code == "backend_unavailable"


async def test_no_credentials(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    b = AwsBackend("aws-test", make_cfg(moto_url))
    try:
        with trio.fail_after(LIMIT_S), pytest.raises(BackendError) as err:
            await b.fetch(make_ref("db/password"))
    finally:
        await b.aclose()
    assert "no AWS credentials found" in err.value.message


async def test_unknown_profile(moto_url: str) -> None:
    b = AwsBackend("aws-test", make_cfg(moto_url, profile="nope"))
    try:
        with trio.fail_after(LIMIT_S):
            with pytest.raises(BackendError, match="profile 'nope'"):
                await b.fetch(make_ref("db/password"))
            health = await b.health()
    finally:
        await b.aclose()
    assert health["ok"] is False and health["reachable"] is False


async def test_endpoint_down_fails_fast_as_unreachable() -> None:
    # timeout_s is far above what a refused connect takes, so "unreachable" (not "timeout")
    # is the observable proof that the call failed on the refusal instead of waiting it out.
    b = AwsBackend("aws-test", make_cfg(closed_port_url(), timeout_s=20.0), health_interval_s=0)
    try:
        with trio.fail_after(LIMIT_S):
            with pytest.raises(BackendError) as err:
                await b.fetch(make_ref("db/password"))
            health = await b.health()
    finally:
        await b.aclose()
    assert err.value.code == "backend_unavailable" and err.value.details["reason"] == "unreachable"
    assert "127.0.0.1" in err.value.message
    assert health["ok"] is False and health["reachable"] is False and "error" in health


async def test_silent_endpoint_times_out_at_timeout_s_and_the_loop_keeps_running(
    mock_clock: trio.testing.MockClock,
) -> None:
    # A listener that never accepts: the TCP handshake completes, no answer ever comes.
    # The clock is virtual (it jumps as soon as every task waits), so the elapsed time is
    # exactly the configured timeout_s, however loaded the machine is.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        b = AwsBackend("aws-test", make_cfg(f"http://127.0.0.1:{port}", timeout_s=1.0))
        fetch_returned = False
        ran_while_in_flight: list[bool] = []

        async def other_task() -> None:
            # If fetch blocked the event loop, this task could only wake after it returned.
            await trio.sleep(0.01)
            ran_while_in_flight.append(not fetch_returned)

        try:
            with trio.fail_after(LIMIT_S):
                await b._ready_client()  # client setup (real time: the clock does not move yet)
                mock_clock.autojump_threshold = 0
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(other_task)
                    start = trio.current_time()
                    with pytest.raises(BackendError) as err:
                        await b.fetch(make_ref("db/password"))
                    elapsed = trio.current_time() - start
                    fetch_returned = True
        finally:
            mock_clock.autojump_threshold = math.inf
            await b.aclose()
    assert elapsed == pytest.approx(1.0)
    assert err.value.details["reason"] == "timeout"
    assert "within 1s" in err.value.message or "timed out" in err.value.message
    assert ran_while_in_flight == [True]


# --------------------------------------------------------------------------- values, health


async def test_no_value_in_logs_or_errors(
    backend: AwsBackend, sm: Any, sid: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    sm.create_secret(Name=sid, SecretString=json.dumps({"password": VALUE}))
    errors: list[str] = []
    with trio.fail_after(LIMIT_S):
        await backend.fetch(make_ref(sid, json_key="password"))
        await backend.rotate(make_ref(sid, json_key="password"), VALUE2)
        await backend.fetch(make_ref(sid))
        with pytest.raises(SecretNotFound) as e1:
            await backend.fetch(make_ref(sid, json_key="nope"))
        errors.append(str(e1.value))

        def fail(kwargs: dict[str, Any]) -> None:
            raise ClientError(
                {"Error": {"Code": "InternalServiceError", "Message": "stand-in"}},
                "UpdateSecretVersionStage",
            )

        _wrap_promotion(backend, monkeypatch, before=fail)
        with pytest.raises(BackendError) as e2:
            await backend.rotate(make_ref(sid, json_key="password"), VALUE + "-3")
        errors.append(str(e2.value))

        # The one call that carries a value: even an error text that echoed the request
        # (no AWS error does; a proxy in between might) is neither logged nor passed on.
        def echoing_put(**kwargs: Any) -> Any:
            raise ClientError(
                {"Error": {"Code": "InvalidRequestException", "Message": kwargs["SecretString"]}},
                "PutSecretValue",
            )

        assert backend._client is not None
        monkeypatch.setattr(backend._client, "put_secret_value", echoing_put)
        with pytest.raises(BackendError) as e3:
            await backend.rotate(make_ref(sid, json_key="password"), VALUE + "-3")
        assert e3.value.details["aws_error"] == "InvalidRequestException"
        errors.append(str(e3.value))
        errors.append(json.dumps(await backend.health()))
    assert caplog.records, "DEBUG capture is on: the backend's own records are there"
    for secret in (VALUE, VALUE2, VALUE + "-3"):
        assert secret not in caplog.text
        assert all(secret not in e for e in errors)
    # botocore's body-dumping DEBUG loggers are held at INFO.
    assert not logging.getLogger("botocore.endpoint").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("botocore.parsers").isEnabledFor(logging.DEBUG)


async def test_health_is_paced_and_close_is_idempotent(moto_url: str) -> None:
    now = [1000.0]
    b = AwsBackend("aws-test", make_cfg(moto_url), clock=lambda: now[0])
    with trio.fail_after(LIMIT_S):
        first = await b.health()
        assert first == {
            "type": "aws",
            "region": REGION,
            "endpoint": moto_url,
            "checked_at": 1000.0,
            "ok": True,
            "reachable": True,
        }
        await b.aclose()
        await b.aclose()
        now[0] += 1
        assert await b.health() == first  # within the interval: the last answer
        now[0] += aws_mod.HEALTH_INTERVAL_S
        closed = await b.health()
        assert closed["ok"] is False and "closed" in str(closed["error"])
        with pytest.raises(BackendError, match="closed"):
            await b.fetch(make_ref("db/password"))
        await b.release("anything")  # static secrets: a no-op
