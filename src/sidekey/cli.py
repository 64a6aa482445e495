"""The ``sidekey`` command line. Every error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import buildinfo, logs
from .protocol import ConfigError, SidekeyError

DEFAULT_CONFIG = "/etc/sidekey/sidekey.yaml"
DEFAULT_SOCKET = "/run/sidekey/sidekey.sock"

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_PENDING = 3  # `sidekey call`: the call is held for human approval


class CliError(Exception):
    """A user-facing error: printed as one line, exit 1."""


def _fail(message: str) -> NoReturn:
    raise CliError(message)


def _config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get("SIDEKEY_CONFIG") or DEFAULT_CONFIG)


def _load(args: argparse.Namespace) -> Any:
    from .config import load_config

    if (not getattr(args, "config", None) and not os.environ.get("SIDEKEY_CONFIG")
            and not Path(DEFAULT_CONFIG).exists()):
        # A new operator's first `sidekey serve`: say where a config comes from, not
        # only that the default file is missing.
        _fail(f"no config: none given with --config FILE or $SIDEKEY_CONFIG, and the default "
              f"{DEFAULT_CONFIG} does not exist. Pass --config FILE; to try sidekey first, "
              "run the quickstart from the source tree: examples/quickstart/run.sh (its config "
              "is examples/quickstart/sidekey.yaml; it is the README's first command)")
    return load_config(_config_path(args))


def _socket_path(args: argparse.Namespace) -> str:
    """--socket, else $SIDEKEY_SOCKET, else the socket of --config, else the default."""
    return _socket_source(args)[0]


def _socket_source(args: argparse.Namespace) -> tuple[str, str]:
    """The socket a client command uses, and where that choice came from (for errors)."""
    if getattr(args, "socket", None):
        return str(args.socket), "from --socket"
    if os.environ.get("SIDEKEY_SOCKET"):
        return os.environ["SIDEKEY_SOCKET"], "from $SIDEKEY_SOCKET"
    if getattr(args, "config", None) or os.environ.get("SIDEKEY_CONFIG"):
        loaded = _load(args)
        via = "--config" if getattr(args, "config", None) else "$SIDEKEY_CONFIG"
        return str(loaded.socket_path), f"listen.socket of {via} {loaded.path}"
    return DEFAULT_SOCKET, "the default: no --socket, $SIDEKEY_SOCKET or --config given"


def _unreachable_hint(args: argparse.Namespace) -> str:
    """What to do when the daemon cannot be reached: the socket tried, where it came
    from, and the three ways to point a command at another daemon."""
    try:
        path, source = _socket_source(args)
    except (ConfigError, CliError, OSError):  # the config was the problem: reported as such
        path, source = "?", "the config named could not be read"
    return (f"tried socket {path} ({source}). Is the daemon running there (`sidekey serve "
            "--config FILE`, or `systemctl status sidekey`)? To reach another daemon pass "
            "--socket PATH, set $SIDEKEY_SOCKET=PATH, or pass --config FILE (its listen.socket)"
            + ("; or add --offline to read the config files instead (no health state)"
               if getattr(args, "command", None) == "registry" else ""))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def _parse_arguments(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"--arguments is not valid JSON: {exc.msg} at position {exc.pos}")
    if not isinstance(value, dict):
        _fail("--arguments must be a JSON object")
    return value


# --------------------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from . import daemon
    from .server import ServerError

    loaded = _load(args)
    # The config's log: (format, level) from here on; the start's own lines were text.
    logs.configure(loaded.config.log.format, _log_level(args, loaded.config.log.level))
    try:
        return trio.run(
            lambda: daemon.run(loaded, socket_path=Path(args.socket).absolute() if args.socket else None,
                               init=args.init)
        )
    except ServerError as exc:
        _fail(str(exc))
    except BaseExceptionGroup as group:
        # Startup failures inside the daemon's nursery arrive wrapped; report the first
        # one as the single line it would have been.
        first = _first_leaf(group)
        if isinstance(first, ServerError):
            _fail(str(first))
        raise first from group


def _log_level(args: argparse.Namespace, configured: str | None) -> str:
    """--log-level, else $SIDEKEY_LOG_LEVEL (if a known level), else the config's
    log.level, else info."""
    env = os.environ.get("SIDEKEY_LOG_LEVEL", "").lower()
    level: str = args.log_level or (env if env in logs.LEVELS else None) or configured or "info"
    return level


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def cmd_check_config(args: argparse.Namespace) -> int:
    from .hardening import (
        UnsafePathError,
        check_daemon_files,
        check_key_files,
        daemon_files,
        key_files,
    )

    loaded = _load(args)
    cfg = loaded.config
    # The files the daemon writes: what it would fix (or refuse) at start. Checked as
    # the current user, which may not be the daemon's.
    file_warnings: list[str] = []
    try:
        file_warnings += check_daemon_files(daemon_files(loaded), fix=False)
    except UnsafePathError as exc:
        file_warnings.append(f"the daemon refuses to start: {exc.code}: {exc}")
    try:
        check_key_files(key_files(loaded))
    except UnsafePathError as exc:
        file_warnings.append(f"the daemon refuses to start: {exc.code}: {exc}")
    tools = sum(len(s.tool_scopes) for s in cfg.servers.values())
    mapped = sum(len(refs) for tools_ in cfg.secrets.values() for refs in tools_.values())
    summary: dict[str, Any] = {
        "config": str(loaded.path),
        "files": [str(f) for f in loaded.files],
        "socket": str(loaded.socket_path),
        "state_dir": str(loaded.state_dir),
        "servers": {
            name: {
                "tools": sorted(s.tool_scopes),
                "tool_scopes": {t: list(ts.required) for t, ts in sorted(s.tool_scopes.items())},
                "oauth2": "none" if s.oauth2 == "none" else s.oauth2.audience,
                "issuer": None if s.oauth2 == "none" else s.oauth2.issuer,
                "peers": len(cfg.peers.get(name, [])),
                "registry_status": cfg.registry.servers[name].status
                if name in cfg.registry.servers
                else None,
            }
            for name, s in cfg.servers.items()
        },
        "agents": {
            name: {
                "allowed": {g.server: list(g.tools) for g in a.allowed_servers},
                "denied": list(a.denied_servers),
            }
            for name, a in sorted(cfg.agents.items())
        },
        "warnings": [*loaded.warnings, *file_warnings],
        "backends": {n: type(b).__struct_config__.tag for n, b in cfg.backends.items()},
        "secrets_mapped": mapped,
    }
    problems: list[str] = []
    if args.probe:
        from .probe import failures, run_probe

        probed = run_probe(loaded)
        summary["probe"] = probed["backends"]
        summary["probe_issuers"] = probed["issuers"]
        problems = failures(probed)
    if args.json:
        _print_json(summary)
    else:
        print(f"config ok: {loaded.path}")
        print(f"  files: {', '.join(f.name for f in loaded.files)}")
        print(f"  socket: {loaded.socket_path}")
        print(f"  servers: {len(cfg.servers)}, tools: {tools}, agents: {len(cfg.agents)}, "
              f"backends: {len(cfg.backends)}, secrets mapped: {mapped}")
        for name, info in summary["servers"].items():
            print(f"  - {name}: oauth2 {info['oauth2']}; peers {info['peers']}; "
                  f"registry {info['registry_status']}")
            for tool, scopes in info["tool_scopes"].items():
                print(f"      {tool}: {' '.join(scopes) if scopes else '(no scopes)'}")
        for name, agent in summary["agents"].items():
            grants = "; ".join(f"{srv}: {', '.join(tools)}" for srv, tools in agent["allowed"].items())
            denied = f"; denied {', '.join(agent['denied'])}" if agent["denied"] else ""
            print(f"  agent {name}: {grants or 'no grants'}{denied}")
        for warning in summary["warnings"]:
            print(f"  warning: {warning}")
        if args.probe:
            from .probe import report_lines

            for line in report_lines({"backends": summary["probe"],
                                      "issuers": summary["probe_issuers"]}):
                print(f"  {line}")
    if problems:
        # Each failure on its own line (stderr), so a typo'd secret name is found before
        # the first call needs it; the report above has the successes too.
        for problem in problems:
            print(f"sidekey: probe failed: {problem}", file=sys.stderr)
        print(f"sidekey: error: check-config --probe: {len(problems)} problem(s)", file=sys.stderr)
    return EXIT_FAIL if problems else EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    from . import tokens
    from .backends.local import generate_key_file

    if args.kind == "tokens":
        path = Path(args.out) if args.out else _load(args).keyset_path
        existed = path.exists()
        kid = tokens.rotate_keyset(path)
        print(f"{'rotated' if existed else 'created'} token key set {path}: active key id {kid}")
    elif args.kind == "local":
        if not args.out:
            _fail("keygen local needs --out FILE")
        generate_key_file(Path(args.out))
        print(f"created local store key {args.out} (mode 0600)")
    elif args.kind == "audit":
        from .audit.chain import generate_audit_key

        if not args.out:
            _fail("keygen audit needs --out FILE")
        pub, kid, public = generate_audit_key(Path(args.out))
        if args.json:
            _print_json({"private_key_file": args.out, "public_key_file": str(pub), "key_id": kid,
                         "public_key": public})
        else:
            print(f"created the audit checkpoint key {args.out} (mode 0600) and its public key "
                  f"{pub} (give it to auditors: sidekey audit verify --key {pub})")
            print(f"key_id: {kid}")
            print(f"public_key: {public}")
            print(f"config: audit: {{checkpoint_key_file: {args.out}}} (or "
                  "checkpoint_key_credential: NAME with systemd LoadCredential=NAME:FILE)")
    elif args.kind == "issuer":
        from .devissuer import create_issuer

        if not args.out or not args.jwks:
            _fail("keygen issuer needs --out PRIVATE_KEY and --jwks JWKS_FILE")
        kid = create_issuer(Path(args.out), Path(args.jwks))
        print(f"created a local OAuth2 issuer key {args.out} (mode 0600) and its JWKS {args.jwks} "
              f"(kid {kid}); point oauth2_issuers at the JWKS and mint tokens with "
              "`sidekey token user`")
    else:
        if not args.out:
            _fail("keygen ed25519 needs --out FILE")
        kid, public = tokens.generate_ed25519(Path(args.out))
        if args.json:
            _print_json({"private_key_file": args.out, "kid": kid, "public_key": public})
        else:
            print(f"private key: {args.out} (mode 0600)")
            print(f"kid: {kid}")
            print(f"public_key: {public}")
    return EXIT_OK


def _audit_files(args: argparse.Namespace) -> list[Path]:
    """FILES, else the audit file of --config / $SIDEKEY_CONFIG (or the default config),
    preceded by its rotated files (oldest first: one log)."""
    if args.files:
        return [Path(f) for f in args.files]
    from .audit.jsonl import rotated_files

    path = Path(_load(args).audit_path)
    try:
        return [*rotated_files(path), path]
    except OSError:
        return [path]


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from .audit.chain import load_public_key
    from .audit.verify import verify_files

    key = load_public_key(Path(args.key)) if args.key else None
    report = verify_files(_audit_files(args), key=key, live=args.live)
    if args.json:
        _print_json(report.as_json())
        return EXIT_OK if report.ok else EXIT_FAIL
    for problem in report.problems:
        print(problem.text())
    for note in report.notes:
        print(f"note: {note.text()}", file=sys.stderr)
    span = (f"seq {report.first_seq}..{report.last_seq}" if report.last_seq is not None
            else "no chained events")
    summary = (f"{report.lines} lines, {report.events} events ({span}), {report.checkpoints} "
               f"checkpoints, key {report.key_id or 'none'}, log {report.log_id or '-'}"
               f"{', closed' if report.closed else ''}")
    if report.ok:
        print(f"audit log ok: {summary}")
        return EXIT_OK
    print(f"audit log FAILED: {len(report.problems)} problem(s); {summary}", file=sys.stderr)
    return EXIT_FAIL


def _audit_filter(args: argparse.Namespace) -> Any:
    from .audit.export import Filter, parse_time

    since = None
    if args.since:
        try:
            since = parse_time(args.since)
        except ValueError:
            _fail(f"--since {args.since!r}: not an ISO-8601 time or a duration like 15m, 2h, 7d")
    return Filter(types=tuple(args.type or ()), server=args.server, user=args.user, since=since)


def cmd_audit_tail(args: argparse.Namespace) -> int:
    import collections
    import time

    from .audit.export import parse_lines, read_events, readable

    files = _audit_files(args)
    keep = _audit_filter(args)

    def show(event: dict[str, Any]) -> None:
        print(json.dumps(event, separators=(",", ":")) if args.json else readable(event), flush=True)

    last: collections.deque[dict[str, Any]] = collections.deque(maxlen=max(0, args.lines))
    for _, event in read_events(files):
        if keep(event):
            last.append(event)
    for event in last:
        show(event)
    if not args.follow:
        return EXIT_OK
    # Follow the last file: poll its size (a bounded sleep, so Ctrl-C ends it at once);
    # a file that shrank or was replaced (rotation) is read again from its start.
    path = files[-1]
    st = path.stat()
    offset, ino, pending = st.st_size, st.st_ino, b""
    try:
        while True:
            time.sleep(args.interval)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if st.st_ino != ino or st.st_size < offset:
                offset, ino, pending = 0, st.st_ino, b""
            if st.st_size == offset:
                continue
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read(st.st_size - offset)
            offset += len(chunk)
            pending += chunk
            cut = pending.rfind(b"\n")
            if cut < 0:
                continue
            for _, event in parse_lines(pending[:cut]):
                if keep(event):
                    show(event)
            pending = pending[cut + 1:]
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_audit_export(args: argparse.Namespace) -> int:
    from .audit.export import read_events, to_cef, to_ecs

    keep = _audit_filter(args)
    out = sys.stdout
    count = 0
    for raw, event in read_events(_audit_files(args)):
        if not keep(event):
            continue
        if args.format == "json":
            out.write(raw.decode("utf-8", "replace") + "\n")  # the line as written
        elif args.format == "cef":
            out.write(to_cef(event) + "\n")
        else:
            out.write(json.dumps(to_ecs(event, raw), separators=(",", ":")) + "\n")
        count += 1
    out.flush()
    print(f"exported {count} events as {args.format}", file=sys.stderr)
    return EXIT_OK


# `audit hmac` reads one value from stdin; an argument value is far smaller.
MAX_HMAC_INPUT_BYTES = 1024 * 1024


def cmd_audit_hmac(args: argparse.Namespace) -> int:
    """Print the ``hmac-sha256:<hex>`` an event would carry for a value read from stdin
    (never argv: /proc/PID/cmdline and shell history are readable)."""
    from .audit.hmackey import ValueHasher, load_key
    from .audit.hmackey import key_path as hmac_key_path

    if args.key_file:
        key = load_key(Path(args.key_file), None)
    else:
        loaded = _load(args)
        key = load_key(hmac_key_path(loaded), loaded.config.audit.hmac_key_credential)
    raw = sys.stdin.buffer.read(MAX_HMAC_INPUT_BYTES + 1)
    if len(raw) > MAX_HMAC_INPUT_BYTES:
        _fail(f"the value on stdin is larger than {MAX_HMAC_INPUT_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        _fail("the value on stdin is not UTF-8")
    if text.endswith("\n"):  # the newline of `echo` or of a typed line, not the value's
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    value: Any = text
    if args.json_value:
        try:
            value = json.loads(text)
        except ValueError:
            _fail("--json-value: stdin is not one JSON value")
    digest = ValueHasher(key).digest(value)
    if args.expect is None:
        print(digest)
        return EXIT_OK
    if hmac.compare_digest(digest, args.expect.strip()):
        print("match")
        return EXIT_OK
    print("no match", file=sys.stderr)
    return EXIT_FAIL


def cmd_config_sign(args: argparse.Namespace) -> int:
    from . import signing

    loaded = _load(args)
    key_path = Path(args.key)
    public = signing.load_private_key(key_path).public_key()
    trusted = signing.trusted_keys(loaded)
    kid = args.kid or signing.kid_for(loaded, public) or signing.fingerprint(public)
    listed = trusted.get(kid)
    public_text = signing.public_key_text(public)
    if listed is not None and signing.public_key_text(listed) != public_text:
        _fail(f"kid {kid} is listed in config_signing.trusted_keys of {loaded.path.name} "
              f"with a different public key than {key_path}")
    out = signing.sign_config(loaded, key_path, kid=kid)
    if listed is None:
        print(f"sidekey: warning: key {kid} is not in config_signing.trusted_keys of "
              f"{loaded.path.name} (a daemon checks against the trusted keys of the config it "
              f'runs); to trust it add {{kid: "{kid}", public_key: {public_text}}}', file=sys.stderr)
    print(f"signed {len(signing.signed_files(loaded))} files with key {kid}: {out}")
    return EXIT_OK


def cmd_config_verify(args: argparse.Namespace) -> int:
    from . import signing

    loaded = _load(args)
    if args.key:
        keys = [signing.load_public_key_file(Path(k)) for k in args.key]
        result = signing.verify_config_with_keys(loaded, keys)
    else:
        trusted = signing.trusted_keys(loaded)
        if not trusted:
            _fail(f"{loaded.path.name} lists no config_signing.trusted_keys; add them "
                  "or pass --key PUBLIC_KEY_PEM")
        result = signing.verify_config_details(loaded, trusted)
    print(f"signature ok (kid {result.kid}): {len(result.files)} files, signed at {result.signed_at}")
    return EXIT_OK


def _local_store(args: argparse.Namespace) -> Any:
    from .backends.local import LocalStore, load_key
    from .config import LocalBackendConfig

    loaded = _load(args)
    backends = loaded.config.backends
    name = args.backend
    if name is None:
        locals_ = [n for n, b in backends.items() if isinstance(b, LocalBackendConfig)]
        if len(locals_) != 1:
            _fail(f"choose a backend with --backend (local backends: {', '.join(locals_) or 'none'})")
        name = locals_[0]
    backend = backends.get(name)
    if not isinstance(backend, LocalBackendConfig):
        _fail(f'no local backend named "{name}" in {loaded.path}')
    key = load_key(
        loaded.resolve(backend.key_file) if backend.key_file else None, backend.key_credential
    )
    return LocalStore(loaded.resolve(backend.path), key)


def cmd_secrets(args: argparse.Namespace) -> int:
    from .backends.local import read_secret_input

    if args.action == "rotate" and not args.offline:
        return _rotate_via_daemon(args)
    store = _local_store(args)
    if args.action == "list":
        names = store.names()
        if args.json:
            _print_json(names)
        else:
            print("\n".join(names) if names else "(no secrets)")
        return EXIT_OK
    if args.from_file is None and sys.stdin.isatty():
        print(f"enter the value for {args.name}, then Ctrl-D:", file=sys.stderr)
    value = read_secret_input(args.from_file, sys.stdin.buffer)
    if args.action == "put":
        version = store.put(args.name, value)
    else:
        version = store.rotate(args.name, value)
    print(f"{args.name}: version {version} stored")
    return EXIT_OK


def _rotate_via_daemon(args: argparse.Namespace) -> int:
    from .backends.local import read_secret_input

    value: str | None = None
    if args.generate is None:
        if args.from_file is None and sys.stdin.isatty():
            print(f"enter the new value for {args.name}, then Ctrl-D:", file=sys.stderr)
        value = read_secret_input(args.from_file, sys.stdin.buffer)
    elif args.from_file is not None:
        _fail("use --from-file or --generate, not both")
    with _client(args) as client:
        out = client.rotate_secret(args.name, value=value, generate=args.generate,
                                   backend=args.backend, revoke_leases=args.revoke_leases)
    if args.json:
        _print_json(out)
    else:
        print(f"{out['secret']} ({out['backend']}): version {out['old_version']} -> "
              f"{out['new_version']}; leases revoked: {out['leases_revoked']}")
    return EXIT_OK


def _client(args: argparse.Namespace) -> Any:
    from .client import Client

    return Client(socket_path=_socket_path(args), timeout=args.timeout,
                  expected_uid=getattr(args, "daemon_uid", None))


def cmd_token_issue(args: argparse.Namespace) -> int:
    with _client(args) as client:
        out = client.issue_token(
            server=args.server,
            tool=args.tool,
            user=args.user,
            agent_id=args.agent,
            session_id=args.session,
            arguments=_parse_arguments(args.arguments),
            ttl_seconds=args.ttl,
        )
    if args.json:
        _print_json(out)
    else:
        print(out["resolution_token"])
    return EXIT_OK


def cmd_token_user(args: argparse.Namespace) -> int:
    from .devissuer import kid_of, mint_user_token

    loaded = _load(args)
    if args.server not in loaded.config.servers:
        _fail(f'no server "{args.server}" in {loaded.path}')
    oauth = loaded.config.servers[args.server].oauth2
    if oauth == "none":
        _fail(f'server "{args.server}" has oauth2: none; its calls need no user token')
    token = mint_user_token(
        Path(args.key), kid=kid_of(Path(args.jwks)), issuer=oauth.issuer, audience=oauth.audience,
        subject=args.user, scopes=args.scope if args.scope else oauth.scopes, ttl_s=args.ttl,
    )
    print(token)
    return EXIT_OK


def _user_token(args: argparse.Namespace) -> str | None:
    """From --user-token-file, else $SIDEKEY_USER_TOKEN (never argv: tokens are secrets)."""
    if args.user_token_file:
        try:
            text = Path(args.user_token_file).read_text().strip()
        except OSError as exc:
            _fail(f"--user-token-file: {exc.strerror}: {args.user_token_file}")
        return text or None
    return os.environ.get("SIDEKEY_USER_TOKEN") or None


def cmd_call(args: argparse.Namespace) -> int:
    import time

    from .client import ApprovalPending, _approval_outcome

    arguments = _parse_arguments(args.arguments)
    with _client(args) as client:
        started = time.monotonic()
        kw: dict[str, Any] = dict(
            server=args.server, tool=args.tool, user_token=_user_token(args),
            agent_id=args.agent, session_id=args.session, arguments=arguments,
        )
        try:
            auth = client.authorize(**kw, approval_id=args.approval_id)
        except ApprovalPending as pending:
            if args.wait_approval is None:
                _print_json({"decision": "pending_approval", "approval_id": pending.approval_id,
                             "expires_at": pending.expires_at})
                print(f"sidekey: call held for human approval: an approver runs `sidekey "
                      f"approvals approve {pending.approval_id}`; then repeat this command with "
                      f"--approval-id {pending.approval_id}", file=sys.stderr)
                return EXIT_PENDING
            approval = client.wait_for_approval(pending.approval_id, args.wait_approval)
            auth = client.authorize(**kw, approval_id=_approval_outcome(approval, pending))
        lease = client.redeem(auth.resolution_token, arguments=arguments)
        duration_ms = int((time.monotonic() - started) * 1000)
        released = client.release(lease.lease_id, status=args.status, duration_ms=duration_ms)
    summary: dict[str, Any] = {
        "decision": auth.decision,
        **({"approval_id": args.approval_id} if args.approval_id else {}),
        "user_id": auth.user_id,
        "rules_matched": auth.policy.get("rules_matched", []),
        "lease_id": lease.lease_id,
        "expires_at": lease.expires_at,
        "secrets": sorted(lease.secrets) if not args.show_secrets else dict(lease.secrets),
        "released": released.get("state"),
    }
    _print_json(summary)
    return EXIT_OK


def cmd_approvals(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "list":
            found = client.list_approvals(state=args.state, limit=args.limit)
            if args.json:
                _print_json(found)
            elif not found:
                print(f"(no {args.state} approvals)" if args.state != "all" else "(no approvals)")
            else:
                for a in found:
                    print(_approval_line(a))
            return EXIT_OK
        if args.action == "wait":
            approval = client.wait_for_approval(args.id, args.wait)
        elif args.action == "approve":
            approval = client.approve(args.id, reason=args.reason)
        else:
            if not args.reason or not args.reason.strip():
                _fail("deny needs --reason TEXT (it is recorded in the approval and in audit)")
            approval = client.deny(args.id, reason=args.reason)
    if args.json:
        _print_json(approval)
    else:
        print(_approval_line(approval))
    return EXIT_OK


def _approval_line(a: dict[str, Any]) -> str:
    """One human-readable line (and an indented detail line) per approval."""
    agent = f" agent {a['agent']}" if a.get("agent") else ""
    head = (f"{a['id']}  {a['state']:<8}  {a['server']}/{a['tool']}  user {a['user']}{agent}  "
            f"expires {a['expires_at']}")
    detail = f"    held: {a.get('held_for') or '-'}"
    if a.get("arguments") is not None:
        detail += f"\n    arguments: {json.dumps(a['arguments'], sort_keys=True)}"
    else:
        detail += f"\n    arguments: (not kept; sha256 {a.get('args_digest')})"
    if a.get("requested_by"):
        detail += f"\n    requested by {a['requested_by']} at {a.get('created_at') or '-'}"
    if a.get("decided_by"):
        # decided_by is the approver's verdict (approve or deny), whatever the state now
        # is: a redeemed or expired approval was approved by them, not redeemed by them.
        verdict = "denied" if a["state"] == "denied" else "approved"
        detail += f"\n    {verdict} by {a['decided_by']} at {a.get('decided_at') or '-'}"
        if a.get("reason"):
            detail += f": {a['reason']}"
    if a["state"] == "redeemed":
        detail += (f"\n    redeemed by {a.get('redeemed_by') or 'the server process (not recorded)'}"
                   f" at {a.get('redeemed_at') or '-'}")
    return head + "\n" + detail


def _registry_date(text: str) -> str:
    """argparse type of ``--as-of``: a date, YYYY-MM-DD (checked like the daemon does)."""
    from .registry import check_as_of

    try:
        return check_as_of(text).isoformat()
    except SidekeyError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _registry_days(text: str) -> int:
    from .registry import check_stale

    try:
        return check_stale(text)
    except SidekeyError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _registry_offline(args: argparse.Namespace) -> dict[str, Any]:
    """The body ``GET /v1/registry`` would answer, computed from the config files
    (--config): no daemon needed, no health state (``health`` is null)."""
    import datetime

    from . import registry

    loaded = _load(args)
    cfg = loaded.config
    today = (datetime.date.fromisoformat(args.as_of) if args.as_of
             else datetime.datetime.now(datetime.UTC).date())
    owner = registry.check_owner(args.owner) if args.owner is not None else None
    rows = registry.select(registry.listing(cfg, today=today), today=today,
                           stale_days=args.stale, owner=owner)
    return {
        "as_of": today.isoformat(),
        "registry_version": cfg.registry.version,
        "filters": {"stale": args.stale, "owner": owner},
        "servers": [registry.row_record(r, today=today, health=None) for r in rows],
        "source": str(loaded.path),
    }


REGISTRY_COLUMNS = ("SERVER", "OWNER", "VERSION", "STATUS", "DEPRECATION", "REPLACEMENT",
                    "LAST REVIEW", "HEALTH", "HOST", "CALLS")


def _registry_table(body: dict[str, Any]) -> list[str]:
    """``registry list``'s table: one line per server, aligned columns; ``-`` for none."""

    def review(row: dict[str, Any]) -> str:
        if row.get("last_review") is None:
            return "never"
        return f"{row['last_review']} ({row['review_age_days']}d)"

    rows = [
        (r["server"], r.get("owner") or "-", r.get("version") or "-", r.get("status") or "-",
         r.get("deprecation_date") or "-", r.get("replacement") or "-", review(r),
         (r.get("health") or {}).get("state") or "-",
         "declared" if r.get("declared") else "-", r.get("verdict") or "-")
        for r in body["servers"]
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c)
              for i, c in enumerate(REGISTRY_COLUMNS)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)).rstrip()

    return [line(REGISTRY_COLUMNS), *(line(row) for row in rows)]


def cmd_registry(args: argparse.Namespace) -> int:
    if args.offline:
        body = _registry_offline(args)
    else:
        with _client(args) as client:
            body = client.registry(stale_days=args.stale, owner=args.owner, as_of=args.as_of)
    if args.json:
        _print_json({k: v for k, v in body.items() if k != "request_id"})
        return EXIT_OK
    what = [f"as of {body['as_of']}"]
    if body.get("registry_version"):
        what.insert(0, f"registry {body['registry_version']}")
    if args.stale is not None:
        what.append(f"last review older than {args.stale} days (or never)")
    if args.owner is not None:
        what.append(f"owner {args.owner}")
    source = f"config files {body['source']}" if args.offline else "the running daemon"
    print(f"{len(body['servers'])} server(s); {'; '.join(what)}; from {source}")
    if body["servers"]:
        for text in _registry_table(body):
            print(text)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        _print_json(status)
    else:
        print(f"sidekey on {status['host']} pid {status['pid']}, up {status['uptime_s']} s")
        print(f"  socket {status['socket']}; config {status['config']}")
        print(f"  leases active: {status['leases']['active']}; connections: {status['connections']}")
        pending = status.get("approvals", {}).get("pending")
        if pending:
            print(f"  approvals pending: {pending} (sidekey approvals list)")
        print(f"  store: {'ok' if status['store'].get('ok') else 'FAILING'}; "
              f"audit: {'ok' if status['audit'].get('ok') else 'FAILING'}")
        for sink in status["audit"].get("sinks", ())[1:]:  # the forwarding sinks
            state = "ok" if sink.get("ok") else f"FAILING ({sink.get('last_error') or 'lost events'})"
            print(f"  audit sink {sink.get('name')} ({sink.get('sink')}"
                  f"{', required' if sink.get('required') else ''}): {state}; "
                  f"{sink.get('queued', 0)} behind, {sink.get('dropped', 0)} lost")
        for name, b in status["backends"].items():
            print(f"  backend {name}: {'ok' if b.get('ok') else 'FAILING'}")
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidekey",
        description="Credential-isolation sidecar for MCP servers: peer-attested, audited, "
        "single-call secret leases over a Unix socket.",
    )
    p.add_argument("--version", action="version", version=buildinfo.version_line(),
                   help="print the version, where this copy was installed from, and the Python")
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                   help="log verbosity (stderr); default $SIDEKEY_LOG_LEVEL, then (serve) the "
                   "config's log.level, then info")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        return sp

    def config_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", metavar="FILE",
                        help=f"main config file (default $SIDEKEY_CONFIG or {DEFAULT_CONFIG})")

    def socket_args(sp: argparse.ArgumentParser) -> None:
        config_arg(sp)
        sp.add_argument("--socket", "-s", metavar="PATH",
                        help="daemon socket (default $SIDEKEY_SOCKET, else the socket of --config, "
                        f"else {DEFAULT_SOCKET})")
        sp.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
        sp.add_argument("--daemon-uid", metavar="UID|USER",
                        help="the uid (or user) the daemon must run as; nothing is sent to a socket "
                        "served by another uid (default $SIDEKEY_DAEMON_UID, else root or your "
                        "own uid)")

    sp = add("serve", cmd_serve, "run the daemon in the foreground until SIGTERM/SIGINT")
    config_arg(sp)
    sp.add_argument("--socket", "-s", metavar="PATH", help="listen here instead of listen.socket")
    sp.add_argument("--init", action="store_true",
                    help="start a new state database in place of an empty (0-byte) state.db "
                    "(replay protection restarts from nothing; without --init that refuses)")

    sp = add("check-config", cmd_check_config, "validate the config and its includes; print a summary")
    config_arg(sp)
    sp.add_argument("--json", action="store_true", help="print the summary as JSON")
    sp.add_argument("--probe", action="store_true",
                    help="also reach every backend and OAuth2 issuer the config names: each "
                    "backend's health, Vault's capabilities (one sys/capabilities-self request, "
                    "naming each missing capability), every mapped static secret fetched "
                    "(values are never shown), each issuer's signing keys loaded; exit 1 "
                    "naming each failure")

    sp = add("keygen", cmd_keygen, "create keys: the token HMAC key set (create or rotate), "
             "a local-store key, or an Ed25519 key pair for an external issuer")
    sp.add_argument("kind", choices=["tokens", "local", "ed25519", "issuer", "audit"],
                    help="which key to create (issuer: a local OAuth2 issuer for demos and tests; "
                    "audit: the Ed25519 key that signs audit checkpoints, plus FILE.pub for auditors)")
    sp.add_argument("--out", "-o", metavar="FILE", help="where to write (tokens: default tokens.keyset "
                    "of --config); never overwrites a local, ed25519 or issuer key")
    sp.add_argument("--jwks", metavar="FILE", help="issuer: where to write the public JWKS")
    config_arg(sp)
    sp.add_argument("--json", action="store_true", help="print the result as JSON (ed25519, audit)")

    config = add("config", lambda a: EXIT_USAGE, "sign the config and its includes, or verify "
                 "their signature (config_signing in the main file)")
    csub = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    help_ = ("write a detached Ed25519 signature FILE.sig over the main config and every "
             "include (SHA-256 of each file, signed). With config_signing.require_signed_config "
             "the daemon refuses to start or reload a config whose signature is missing, "
             "stale or forged; re-sign after every reviewed change.")
    sp = csub.add_parser("sign", help="sign the main config and its includes (writes FILE.sig)",
                         description=help_)
    sp.set_defaults(func=cmd_config_sign)
    config_arg(sp)
    sp.add_argument("--key", "-k", required=True, metavar="PRIVATE_KEY_PEM",
                    help="Ed25519 private key (PEM, mode 0600), e.g. from `sidekey keygen ed25519`")
    sp.add_argument("--kid", metavar="KID",
                    help="key id to record (default: the kid under which "
                    "config_signing.trusted_keys lists this key, else its ed25519: fingerprint); "
                    "needed when the running daemon knows the key under a kid this config does "
                    "not list")
    help_ = ("check FILE.sig: the signature is by a trusted key and every file the config "
             "loads (main file and includes) is signed and unchanged. Prints one line per "
             "problem and exits 1 on failure.")
    sp = csub.add_parser("verify", help="verify the signature of the config and its includes",
                         description=help_)
    sp.set_defaults(func=cmd_config_verify)
    config_arg(sp)
    sp.add_argument("--key", "-k", action="append", metavar="PUBLIC_KEY_PEM",
                    help="Ed25519 public key (PEM) to verify with, whatever kid the signature "
                    "names; repeatable (default: config_signing.trusted_keys of the config)")

    secrets = add("secrets", lambda a: EXIT_USAGE, "manage secrets in the local encrypted store")
    ssub = secrets.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = ssub.add_parser("put", help="store a new secret in the local store; the value is read "
                         "from stdin or --from-file, never argv",
                         description="store a new secret in the local encrypted store (works "
                         "without the daemon); the value is read from stdin or --from-file")
    sp.set_defaults(func=cmd_secrets)
    sp.add_argument("name", help="secret name, e.g. content-api/write-key")
    sp.add_argument("--from-file", metavar="FILE", help="read the value from FILE instead of stdin")
    sp.add_argument("--backend", metavar="NAME", help="local backend to use (default: the only one)")
    config_arg(sp)
    sp = ssub.add_parser(
        "rotate", help="write a new version of a secret to its own backend (via the daemon)",
        description="write a new version of a mapped secret to its backend (local store, Vault "
        "KV v2, AWS Secrets Manager) through the running daemon (tier security): cached copies "
        "are dropped, a secret.rotated event records the versions. NAME is the secret's name "
        "as mapped: the local name, the Secrets Manager secret_id, or mount/path[#key] for "
        "Vault. The value comes from stdin, --from-file or --generate, never argv. A failed "
        "rotation leaves the old version current.")
    sp.set_defaults(func=cmd_secrets)
    sp.add_argument("name", help="secret name, e.g. content-api/write-key")
    sp.add_argument("--from-file", metavar="FILE", help="read the value from FILE instead of stdin")
    sp.add_argument("--generate", type=int, metavar="LEN",
                    help="generate a random URL-safe value of LEN characters (16..4096)")
    sp.add_argument("--backend", metavar="NAME", help="the backend, if the name is in several")
    sp.add_argument("--revoke-leases", action="store_true",
                    help="also revoke active leases of the tools that use this secret")
    sp.add_argument("--offline", action="store_true",
                    help="rotate in the local store file directly, without the daemon (the "
                    "daemon picks it up on its next fetch)")
    sp.add_argument("--json", action="store_true", help="print the result as JSON")
    socket_args(sp)
    sp = ssub.add_parser("list", help="list secret names (never values)",
                         description="list secret names (never values)")
    sp.set_defaults(func=cmd_secrets)
    sp.add_argument("--backend", metavar="NAME", help="local backend to use (default: the only one)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    config_arg(sp)

    token = add("token", lambda a: EXIT_USAGE, "resolution tokens")
    tsub = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = tsub.add_parser("issue", help="mint a resolution token via the daemon (admin tier)",
                         description="mint a resolution token via the daemon (tier admin)")
    sp.set_defaults(func=cmd_token_issue)
    sp.add_argument("--server", required=True)
    sp.add_argument("--tool", required=True)
    sp.add_argument("--user", required=True, help="user id the token is for (sub)")
    sp.add_argument("--agent", help="agent id")
    sp.add_argument("--session", help="MCP session id")
    sp.add_argument("--arguments", metavar="JSON", help="tool arguments (bound by digest)")
    sp.add_argument("--ttl", type=int, default=300, help="seconds, at most 300 (default 300)")
    sp.add_argument("--json", action="store_true", help="print token, jti and expiry as JSON")
    socket_args(sp)

    sp = tsub.add_parser(
        "user",
        help="mint a user's OAuth2 access token with a local issuer key (demos and tests)",
        description="mint an OAuth2 access token for a server's issuer and audience with a key "
        "from `sidekey keygen issuer`, as an identity provider would; prints the token "
        "(use it as SIDEKEY_USER_TOKEN for `sidekey call`)",
    )
    sp.set_defaults(func=cmd_token_user)
    sp.add_argument("--key", required=True, metavar="PEM", help="issuer private key (keygen issuer)")
    sp.add_argument("--jwks", required=True, metavar="FILE", help="the issuer's JWKS (for the kid)")
    sp.add_argument("--server", required=True, help="server whose oauth2 issuer and audience to use")
    sp.add_argument("--user", required=True, help="the user (sub claim)")
    sp.add_argument("--scope", action="append", metavar="SCOPE",
                    help="a scope to grant (repeatable; default: every scope the server offers)")
    sp.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    config_arg(sp)

    sp = add("call", cmd_call, "run one governed tool call (authorize, redeem, release) and print "
             "a JSON summary with secret names")
    sp.add_argument("--server", required=True)
    sp.add_argument("--tool", required=True)
    sp.add_argument("--agent", help="agent id")
    sp.add_argument("--session", help="MCP session id")
    sp.add_argument("--arguments", metavar="JSON", help="tool arguments as a JSON object")
    sp.add_argument("--status", default="success", choices=["success", "error", "cancelled"],
                    help="outcome reported at release (default success)")
    sp.add_argument("--show-secrets", action="store_true",
                    help="print secret values too (they end up in your terminal!)")
    sp.add_argument("--user-token-file", metavar="FILE",
                    help="the user's OAuth2 bearer token (default: $SIDEKEY_USER_TOKEN)")
    sp.add_argument("--approval-id", metavar="ID",
                    help="present this approved approval (for exactly the same call and arguments)")
    sp.add_argument("--wait-approval", type=float, metavar="SECONDS",
                    help="if the call is held, wait this long for an approver's verdict (default: "
                    f"print the approval id and exit {EXIT_PENDING})")
    socket_args(sp)

    approvals = add("approvals", lambda a: EXIT_USAGE,
                    "human approval of held tool calls (approver tier): list, approve, deny, wait")
    asub = approvals.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = asub.add_parser("list", help="list held calls (default: pending), oldest first",
                         description="list held calls with their arguments (sensitive values "
                         "redacted), who asked and why they are held")
    sp.add_argument("--state", default="pending",
                    choices=["pending", "approved", "denied", "expired", "redeemed", "all"],
                    help="which approvals (default pending)")
    sp.add_argument("--limit", type=int, help="at most this many (default 1000)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_approvals)
    socket_args(sp)
    sp = asub.add_parser("approve", help="approve a pending call: it may then run once, with "
                         "exactly the arguments shown, before the approval expires",
                         description="approve a pending call (recorded with your uid in audit)")
    sp.add_argument("id", help="approval id (apr_...)")
    sp.add_argument("--reason", help="why (recorded in the approval and in audit)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_approvals)
    socket_args(sp)
    sp = asub.add_parser("deny", help="deny a pending call (a reason is required)",
                         description="deny a pending call (recorded with your uid in audit)")
    sp.add_argument("id", help="approval id (apr_...)")
    sp.add_argument("--reason", required=True, help="why (recorded in the approval and in audit)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_approvals)
    socket_args(sp)
    sp = asub.add_parser("wait", help="wait until an approval is decided or expires",
                         description="long-poll one approval; prints it when it is no longer "
                         "pending or after --wait seconds")
    sp.add_argument("id", help="approval id (apr_...)")
    sp.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                    help="how long to wait (default 60)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_approvals)
    socket_args(sp)

    audit = add("audit", lambda a: EXIT_USAGE, "check, read and export audit files offline "
                "(works on a copied file, without the daemon)")
    ausub = audit.add_subparsers(dest="action", required=True, metavar="ACTION")

    def audit_files(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("files", nargs="*", metavar="FILE",
                        help="audit files of one log, oldest first (default: audit.path of --config)")
        config_arg(sp)

    def audit_filters(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--type", action="append", metavar="TYPE",
                        help="only this event type, or a prefix ending in '.' (mcp.); repeatable")
        sp.add_argument("--server", metavar="S", help="only events of this server")
        sp.add_argument("--user", metavar="U", help="only events of this user_id")
        sp.add_argument("--since", metavar="TIME",
                        help="only events at or after TIME (ISO-8601, or 15m / 2h / 7d ago)")

    help_ = ("check the hash chain, the sequence numbers and every checkpoint signature; print "
             "one line per problem (FILE:LINE: seq N: KIND: what) and exit 1 unless all holds. "
             "Kinds: deleted, altered, reordered, duplicated, spliced, unchained, bad_signature, "
             "untrusted_key, truncated_tail, unsigned_tail.")
    sp = ausub.add_parser("verify", help="verify the audit log's chain and signed checkpoints",
                          description=help_)
    sp.set_defaults(func=cmd_audit_verify)
    audit_files(sp)
    sp.add_argument("--key", "-k", metavar="PUBLIC_KEY",
                    help="the audit public key you trust (FILE.pub from `sidekey keygen audit`, "
                    "PEM or raw base64url); default: the key the checkpoints name (consistency only)")
    sp.add_argument("--live", action="store_true",
                    help="the file of a running daemon: an unsigned tail (up to "
                    "audit.checkpoint_every_s) and a missing closing checkpoint are notes, not problems")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    sp = ausub.add_parser("tail", help="print audit events readably, filtered; -f to follow",
                          description="print the last events (one readable line each) and with "
                          "-f keep polling for new ones until Ctrl-C")
    sp.set_defaults(func=cmd_audit_tail)
    audit_files(sp)
    audit_filters(sp)
    sp.add_argument("-n", "--lines", type=int, default=20, help="how many past events (default 20)")
    sp.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    sp.add_argument("--interval", type=float, default=0.5, help=argparse.SUPPRESS)
    sp.add_argument("--json", action="store_true", help="print each event as its JSON")
    sp = ausub.add_parser("export", help="write events as JSON lines, CEF or ECS (SIEM back-fill)",
                          description="write the (filtered) events to stdout: json (the lines as "
                          "written), cef (ArcSight CEF:0) or ecs (Elastic Common Schema); "
                          "mappings in the README")
    sp.set_defaults(func=cmd_audit_export)
    audit_files(sp)
    audit_filters(sp)
    sp.add_argument("--format", choices=["json", "cef", "ecs"], default="json")
    sp = ausub.add_parser(
        "hmac", help="the hmac-sha256 an event carries for a value (read from stdin)",
        description="read one value from stdin (never from the command line; one trailing "
        "newline is dropped) and print the hmac-sha256:<hex> that audit events show in place "
        "of that value under a sensitive key, so an auditor holding the host's audit HMAC key "
        "can tell whether a known value was used (grep the audit file for the output). "
        "Default key: audit.hmac_key_file / hmac_key_credential of --config, else "
        "<state.dir>/audit-hmac.key.")
    sp.set_defaults(func=cmd_audit_hmac)
    config_arg(sp)
    sp.add_argument("--key-file", metavar="FILE",
                    help="the audit HMAC key file (64 hex digits; mode 0600) instead of the config's")
    sp.add_argument("--json-value", action="store_true",
                    help="stdin is a JSON value (a number, object, list, or a quoted string), not text")
    sp.add_argument("--expect", metavar="HMAC",
                    help="compare with this hmac-sha256:<hex>: print 'match' and exit 0, else exit 1")

    reg = add("registry", lambda a: EXIT_USAGE, "the MCP server inventory: central registry "
              "and this host's servers")
    rsub = reg.add_subparsers(dest="action", required=True, metavar="ACTION")
    help_ = ("list every MCP server the central registry lists or this host declares: owner, "
             "version, status, deprecation date, replacement, last review (the registry's "
             "last_audit, with its age in days), the daemon's latest health check, whether this "
             "host declares it, and what the registry step answers a call today (allow, warn, "
             "or the denial's code). Asks the running daemon (tier security: its running "
             "config, with health); --offline reads the config files instead.")
    sp = rsub.add_parser("list", help="list servers, owners, status and last review",
                         description=help_)
    sp.set_defaults(func=cmd_registry)
    sp.add_argument("--stale", type=_registry_days, metavar="DAYS",
                    help="only servers whose last review is more than DAYS days old (servers "
                    "never reviewed are included)")
    sp.add_argument("--owner", metavar="OWNER", help="only servers of this owner (exact match)")
    sp.add_argument("--as-of", type=_registry_date, metavar="YYYY-MM-DD",
                    help="count review ages to this date instead of today (UTC)")
    sp.add_argument("--offline", action="store_true",
                    help="read the config files (--config) instead of asking the daemon; no "
                    "health state")
    sp.add_argument("--json", action="store_true", help="print JSON")
    socket_args(sp)

    sp = add("status", cmd_status, "show the daemon's leases, backends, store and audit health")
    sp.add_argument("--json", action="store_true", help="print JSON")
    socket_args(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Not echoed: a stray argument may be a secret typed where it does not belong.
        print(
            f"sidekey: error: {len(extra)} unexpected argument(s) not shown; secret values "
            "are read from stdin or --from-file, never from the command line "
            "(see sidekey --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    logs.configure("text", _log_level(args, None))
    if os.environ.get("SIDEKEY_LOG_LEVEL", "").lower() not in ("", *logs.LEVELS):
        logging.getLogger("sidekey").warning(
            "ignoring SIDEKEY_LOG_LEVEL: not one of %s", ", ".join(logs.LEVELS))
    from .client import ConnectionFailed, SidekeyClientError

    try:
        code: int = args.func(args)
        return code
    except CliError as exc:
        print(f"sidekey: error: {exc}", file=sys.stderr)
    except ConnectionFailed as exc:
        print(f"sidekey: error: {exc.code}: {exc.message}; {_unreachable_hint(args)}",
              file=sys.stderr)
    except ConfigError as exc:
        lines = str(exc).splitlines()
        print(f"sidekey: config error: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(f"sidekey: config error: {line}", file=sys.stderr)
    except SidekeyClientError as exc:
        print(f"sidekey: error: {exc.code}: {exc.message}", file=sys.stderr)
    except SidekeyError as exc:
        print(f"sidekey: error: {exc.code}: {exc}", file=sys.stderr)
    except ImportError as exc:
        # `pip install sidekey` is the client only: the commands that run or touch the
        # daemon's machinery (serve, keygen, secrets, audit, ...) need the daemon extra.
        from .launch import daemon_dependency_missing

        message = daemon_dependency_missing(exc)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"sidekey: error: {exc.strerror or exc}{where}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
