"""Offline check of audit files (``sidekey audit verify``): pure logic, no daemon needed.

The files are one log in order (an older file first, if it was rotated). Every problem
found is one :class:`Problem` naming the file, line, sequence number and its kind:

- ``deleted``: a gap in ``seq`` (events missing), or a log that does not start at seq 1;
- ``altered``: a line's bytes changed after it was written (its SHA-256 is not the next
  line's ``prev_hash``), a line that is not a JSON event, or a checkpoint that does not
  match its place in the chain (the chain was recomputed after an edit);
- ``reordered``: a line written after one with a higher ``seq``;
- ``duplicated``: a second line with a ``seq`` already seen;
- ``spliced``: lines of another log (another ``log_id``);
- ``unchained``: an event without the chain fields (written before schema_version 2);
- ``bad_signature`` / ``untrusted_key``: a checkpoint whose signature does not verify,
  or that verifies with another key than ``--key``;
- ``truncated_tail``: a last line cut short, or a log that ends at a checkpoint that is
  not the daemon's closing one (events after it may have been dropped);
- ``unsigned_tail``: events after the last checkpoint (nothing vouches for them).

The last two are expected on the file of a running daemon; ``live=True`` reports them as
notes. Memory: about 200 bytes per line (sequence numbers and hashes, not the events).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .chain import (
    CHECKPOINT_TYPE,
    REPAIRED_TYPE,
    b64url_decode,
    key_id,
    line_hash,
    verify_checkpoint,
)


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    seq: int | None
    kind: str
    detail: str

    def text(self) -> str:
        seq = "-" if self.seq is None else str(self.seq)
        return f"{self.file}:{self.line}: seq {seq}: {self.kind}: {self.detail}"


@dataclass
class Report:
    files: list[str]
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)
    lines: int = 0
    events: int = 0
    checkpoints: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    log_id: str | None = None
    key_id: str | None = None
    closed: bool = False  # the log ends with the daemon's closing checkpoint

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


@dataclass
class _Rec:
    file: str
    line: int
    size: int
    hash: str
    terminated: bool
    seq: int | None = None
    prev: str | None = None
    log_id: str | None = None
    event_type: str | None = None
    host: str | None = None
    parsed: bool = False
    # Kept only for the events verify reads further.
    checkpoint: dict[str, Any] | None = None
    repaired: list[tuple[int, str]] | None = None


def _read(path: Path) -> list[_Rec]:
    data = path.read_bytes()
    parts = data.split(b"\n")
    terminated_last = parts[-1] == b""
    if terminated_last:
        parts.pop()
    recs: list[_Rec] = []
    for i, raw in enumerate(parts):
        rec = _Rec(str(path), i + 1, len(raw), line_hash(raw),
                   terminated=not (i == len(parts) - 1 and not terminated_last))
        try:
            event = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            event = None
        if isinstance(event, dict):
            rec.parsed = True
            rec.event_type = event.get("event_type") if isinstance(event.get("event_type"), str) else None
            rec.host = event.get("host") if isinstance(event.get("host"), str) else None
            seq, prev, log = event.get("seq"), event.get("prev_hash"), event.get("log_id")
            if type(seq) is int and isinstance(prev, str) and isinstance(log, str):
                rec.seq, rec.prev, rec.log_id = seq, prev, log
            if rec.event_type == CHECKPOINT_TYPE and isinstance(event.get("checkpoint"), dict):
                rec.checkpoint = event["checkpoint"]
            if rec.event_type == REPAIRED_TYPE:
                info = event.get("repaired")
                listed = info.get("lines") if isinstance(info, dict) else None
                rec.repaired = [
                    (int(x["bytes"]), str(x["sha256"])) for x in listed or ()
                    if isinstance(x, dict) and isinstance(x.get("bytes"), int)
                ]
        recs.append(rec)
    return recs


def _span(recs: Sequence[_Rec]) -> str:
    first, last = recs[0], recs[-1]
    lines = f"line {first.line}" if first is last else f"lines {first.line}..{last.line}"
    seqs = [r.seq for r in recs if r.seq is not None]
    if not seqs:
        return lines
    return f"{lines} (seq {seqs[0]})" if len(seqs) == 1 else f"{lines} (seq {seqs[0]}..{seqs[-1]})"


def verify_files(paths: Sequence[Path], *, key: Ed25519PublicKey | None = None,
                 live: bool = False) -> Report:
    """Check ``paths`` (one log, oldest file first). Raises OSError if a file cannot be read."""
    report = Report(files=[str(p) for p in paths])
    recs: list[_Rec] = []
    for p in paths:
        recs.extend(_read(p))
    report.lines = len(recs)
    problems = report.problems

    def problem(rec: _Rec, kind: str, detail: str, seq: int | None = None) -> None:
        problems.append(Problem(rec.file, rec.line, rec.seq if seq is None else seq, kind, detail))

    # 1. Lines that are not chained events.
    # The first chained record after each line, in the same file (a backward pass, so
    # a file of garbage lines costs linear time).
    following: list[_Rec | None] = [None] * len(recs)
    upcoming: _Rec | None = None
    for i in range(len(recs) - 1, -1, -1):
        following[i] = upcoming if upcoming is not None and upcoming.file == recs[i].file else None
        if recs[i].seq is not None:
            upcoming = recs[i]
    chained: list[_Rec] = []
    unchained: list[_Rec] = []

    def flush_unchained() -> None:
        if unchained:
            problem(unchained[0], "unchained", f"{_span(unchained)}: events without "
                    "seq/prev_hash/log_id (written before schema_version 2, or inserted): not "
                    "covered by the chain")
            unchained.clear()

    for i, rec in enumerate(recs):
        if rec.seq is not None:
            flush_unchained()
            chained.append(rec)
            continue
        # A line without a readable seq is named by the seq it would have had.
        rec.seq = chained[-1].seq + 1 if chained and chained[-1].seq is not None else None
        nxt = following[i]
        if nxt is not None and nxt.repaired and (rec.size, rec.hash) in nxt.repaired:
            flush_unchained()
            report.notes.append(Problem(
                rec.file, rec.line, None, "repaired",
                f"a torn or garbled line ({rec.size} bytes) named by the audit.repaired "
                f"event at line {nxt.line}: the daemon found it at start and resumed the chain"))
            continue
        if rec.parsed:
            if unchained and unchained[-1].file != rec.file:
                flush_unchained()
            unchained.append(rec)
            continue
        flush_unchained()
        if not rec.terminated:
            problem(rec, "truncated_tail", f"the last line is cut short ({rec.size} bytes, "
                    "no newline, not a JSON event)")
        elif rec.size == 0:
            problem(rec, "altered", "an empty line (the daemon never writes one)")
        else:
            problem(rec, "altered", f"not a JSON event ({rec.size} bytes)")
    flush_unchained()
    if not chained:
        if recs:
            problems.append(Problem(recs[0].file, 1, None, "unsigned_tail",
                                    "no chained event in the log"))
        return report

    # 2. Lines of another log.
    log_id = Counter(r.log_id for r in chained).most_common(1)[0][0]
    report.log_id = log_id
    own: list[_Rec] = []
    run: list[_Rec] = []
    rec_or_end: _Rec | None
    for rec_or_end in [*chained, None]:
        if rec_or_end is not None and rec_or_end.log_id != log_id:
            run.append(rec_or_end)
            continue
        if run:
            problem(run[0], "spliced", f"{_span(run)}: from another log (log_id {run[0].log_id}, "
                    f"host {run[0].host}; this log is {log_id})")
            run = []
        if rec_or_end is not None:
            own.append(rec_or_end)

    # 3. File order: reordered and duplicated lines.
    seen: dict[int, _Rec] = {}
    top: _Rec | None = None
    unique: list[_Rec] = []
    for rec in own:
        if rec.seq is None:  # own holds chained records only
            continue
        first = seen.get(rec.seq)
        if first is not None:
            same = "an identical copy" if first.hash == rec.hash else "a different event"
            problem(rec, "duplicated", f"seq {rec.seq} again ({same} of line {first.line} of "
                    f"{first.file})")
            continue
        seen[rec.seq] = rec
        if top is not None and top.seq is not None and rec.seq < top.seq:
            problem(rec, "reordered", f"written after seq {top.seq} (line {top.line}): the "
                    "lines were moved")
        if top is None or (top.seq is not None and rec.seq > top.seq):
            top = rec
        unique.append(rec)

    # 4. The chain in seq order: gaps and broken links.
    ordered = sorted(unique, key=lambda r: r.seq or 0)
    first_rec = ordered[0]
    report.first_seq, report.last_seq = first_rec.seq, ordered[-1].seq
    if first_rec.seq != 1:
        problem(first_rec, "deleted", f"the log starts at seq {first_rec.seq}: seq 1.."
                f"{(first_rec.seq or 1) - 1} are missing (if the log was rotated, pass the "
                "earlier files first)", seq=1)
    for a, b in itertools.pairwise(ordered):
        if a.seq is None or b.seq is None:
            continue
        if b.seq > a.seq + 1:
            missing = b.seq - a.seq - 1
            span = f"seq {a.seq + 1}" if missing == 1 else f"seq {a.seq + 1}..{b.seq - 1}"
            problem(b, "deleted", f"{span} missing ({missing} event{'s' if missing > 1 else ''} "
                    f"between line {a.line} and line {b.line})", seq=a.seq + 1)
        elif b.prev != a.hash:
            problem(a, "altered", f"changed after it was written: its SHA-256 is not the "
                    f"prev_hash of seq {b.seq} (line {b.line} of {b.file})")

    # 5. Checkpoints.
    trusted_id = key_id(key) if key is not None else None
    log_key: str | None = None
    last_cp: _Rec | None = None
    for rec in ordered:
        report.events += 1
        if rec.event_type != CHECKPOINT_TYPE:
            continue
        cp = rec.checkpoint or {}
        report.checkpoints += 1
        if (cp.get("covers_seq") != (rec.seq or 0) - 1 or cp.get("covers_hash") != rec.prev
                or cp.get("log_id") != rec.log_id):
            problem(rec, "altered", f"the checkpoint covers seq {cp.get('covers_seq')} with "
                    "another hash than the chain holds: events before it were changed and the "
                    "chain recomputed")
            last_cp = rec
            continue
        try:
            named: Ed25519PublicKey | None = Ed25519PublicKey.from_public_bytes(
                b64url_decode(str(cp.get("public_key"))))
        except ValueError:
            named = None
        public = key or named
        if public is not None and verify_checkpoint(cp, public):
            if key is None and log_key is not None and key_id(public) != log_key:
                problem(rec, "untrusted_key", f"signed by {key_id(public)}, the log's earlier "
                        f"checkpoints by {log_key}")
            log_key = log_key or key_id(public)
        elif key is not None and named is not None and verify_checkpoint(cp, named):
            problem(rec, "untrusted_key", f"signed by {key_id(named)}, not by the trusted key "
                    f"{trusted_id}")
        else:
            problem(rec, "bad_signature", "the checkpoint signature does not verify")
        last_cp = rec
    report.key_id = trusted_id or log_key
    if key is None and report.checkpoints:
        report.notes.append(Problem(report.files[0], 0, None, "key", "signatures checked with the "
                                    "public key the log names; pass --key to check them "
                                    "against the audit key you trust"))

    # 6. The end of the log.
    tail_problems: list[Problem] = []
    after = [r for r in ordered if last_cp is None or (r.seq or 0) > (last_cp.seq or 0)]
    if after:
        what = "no checkpoint signs any of them (is audit.checkpoint_key_file set?)" \
            if last_cp is None else f"after the last checkpoint (line {last_cp.line})"
        tail_problems.append(Problem(after[0].file, after[0].line, after[0].seq, "unsigned_tail",
                                     f"{_span(after)}: {what}: nothing vouches for them"))
    elif last_cp is not None:
        report.closed = bool((last_cp.checkpoint or {}).get("final"))
        if not report.closed:
            tail_problems.append(Problem(
                last_cp.file, last_cp.line, last_cp.seq, "truncated_tail",
                "the log ends at a checkpoint that is not the daemon's closing one: events "
                "after it may have been dropped (or the daemon is running, or was killed)"))
    (report.notes if live else problems).extend(tail_problems)
    problems.sort(key=lambda p: (report.files.index(p.file) if p.file in report.files else 0,
                                 p.line))
    return report
