"""Mutation testing of sidekey's security core, with cosmic-ray.

Breaks the security decisions one at a time (``==`` becomes ``!=``, ``<`` becomes
``<=``, a ``not`` appears or disappears, ``and`` becomes ``or``, an ``except`` stops
catching, a loop over checks runs zero times ...), runs the tests that guard that
module against each broken copy, and prints every mutant no test killed.

Slow on purpose (minutes to hours), so it is not part of CI: run it before a
release or after changing a security decision::

    pip install -e '.[test,mutation]'
    python tools/mutation.py                 # every target in tools/mutation.toml
    python tools/mutation.py tokens policy   # some targets
    python tools/mutation.py --list          # targets and how many mutants each has
    python tools/mutation.py --jobs 2        # two targets at a time

The working tree is never touched: each target runs in its own copy of the
checkout (tracked and untracked-but-not-ignored files) under ``--workdir``. The
scope (which functions of which module), the operators, the tests that guard a
module and the accepted survivors (each with its reason) live in
``tools/mutation.toml``. Exit status: 0 when every survivor is accepted, 1 when an
unaccepted mutant survived or a target's tests fail on the unmutated copy, 2 on a
usage error.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import ctypes
import dataclasses
import difflib
import fcntl
import json
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tools" / "mutation.toml"
DECORATOR = "<decorator>"  # mutants on decorator lines are never run


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    module: str
    tests: tuple[str, ...]
    functions: tuple[str, ...]  # qualified names or prefixes ending in "*"; empty = whole module
    exclude: tuple[str, ...]  # qualified names or prefixes ending in "*"
    timeout: float
    covering: bool = False  # run only the tests that execute the mutated line (see run_covering)


@dataclasses.dataclass(frozen=True)
class Accepted:
    module: str
    function: str
    operator: str
    line: str  # the unmutated source line, stripped: stable across edits elsewhere
    reason: str


@dataclasses.dataclass
class Mutant:
    target: str
    module: str
    line_no: int
    line: str
    function: str
    operator: str
    outcome: str  # killed | survived | incompetent | timeout | error
    diff: str
    accepted: Accepted | None = None


@dataclasses.dataclass
class Result:
    target: str
    generated: int  # every mutant cosmic-ray can make in the module
    in_scope: int  # the ones run: chosen operators in chosen functions
    mutants: list[Mutant]
    not_run: str | None  # why the target was not run, if it was not
    seconds: float


def load(path: Path) -> tuple[list[str], list[Target], list[Accepted]]:
    data = tomllib.loads(path.read_text())
    operators = [str(op) for op in data["operators"]]
    default_timeout = float(data.get("timeout_s", 300))
    targets = [
        Target(
            name=str(t["name"]),
            module=str(t["module"]),
            tests=tuple(str(x) for x in t["tests"]),
            functions=tuple(str(x) for x in t.get("functions", ())),
            exclude=tuple(str(x) for x in t.get("exclude", ())),
            timeout=float(t.get("timeout_s", default_timeout)),
            covering=bool(t.get("covering", False)),
        )
        for t in data["target"]
    ]
    accepted = [
        Accepted(
            module=str(a["module"]),
            function=str(a["function"]),
            operator=str(a["operator"]),
            line=str(a["line"]).strip(),
            reason=str(a["reason"]),
        )
        for a in data.get("accepted", ())
    ]
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise SystemExit("tools/mutation.toml: duplicate target names")
    return operators, targets, accepted


def function_at(tree: ast.Module) -> dict[int, str]:
    """Line number -> qualified name of the innermost enclosing def (Class.method, outer.inner)."""
    owner: dict[int, str] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}" if prefix else child.name
                for line in range(child.lineno, (child.end_lineno or child.lineno) + 1):
                    owner[line] = name
                for deco in child.decorator_list:  # @dataclass(frozen=True) is structure, not a decision
                    for line in range(deco.lineno, (deco.end_lineno or deco.lineno) + 1):
                        owner[line] = DECORATOR
                visit(child, name)
            else:
                visit(child, prefix)

    visit(tree, "")
    return owner


def in_scope(target: Target, operators: list[str], operator: str, function: str) -> bool:
    return (
        operator in operators
        and function != DECORATOR
        and (not target.functions or matches(function, target.functions))
        and not matches(function, target.exclude)
    )


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if pattern.endswith("*"):
            if name.startswith(pattern[:-1]):
                return True
        elif name == pattern:
            return True
    return False


def copy_checkout(dest: Path, only: str | None = None) -> None:
    """Copy the checkout as it is now (edits included), without .git, venvs and caches;
    with ``only``, just the files under that directory."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = Path(os.fsdecode(raw))
        if only is not None and rel.parts[0] != only:
            continue
        src = ROOT / rel
        if not src.is_file():
            continue  # deleted in the working tree
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)
    shared = ROOT.parent / "shared"
    if only is None and shared.is_dir():  # the tests read ../shared/seed-configs, as in CI
        (dest.parent / "shared").symlink_to(shared)


def _patch_exception_replacer() -> None:
    """Make cosmic-ray 8.7's ExceptionReplacer handle dotted names in a tuple.

    Its ``mutate`` sets ``.value`` on the chosen name node, which a dotted name
    (``except (ValueError, binascii.Error)``: a ``power`` node) does not have: the worker
    raises AttributeError and that handler is never tested. Replaced: the chosen class
    expression, plain or dotted, becomes the Name ``CosmicRayTestingException`` (which
    nothing raises, so the clause stops catching). The positions (and so every
    occurrence number in a session) are the same as before: one per element of the
    tuple, one for a lone class. (A lone dotted class was already handled, by accident:
    its ``.`` became the name, which fails the same way.)
    """
    from cosmic_ray.exceptions import CosmicRayTestingException
    from cosmic_ray.operators.exception_replacer import ExceptionReplacer
    from parso.python.tree import Name

    original_name_nodes = ExceptionReplacer._name_nodes

    def mutate(self: Any, node: Any, index: int) -> Any:
        chosen = original_name_nodes(node)[index]
        if isinstance(chosen, Name) or chosen.type == "operator":
            chosen.value = CosmicRayTestingException.__name__  # what cosmic-ray does
            return node
        replacement = Name(CosmicRayTestingException.__name__, chosen.start_pos, chosen.get_first_leaf().prefix)
        parent = chosen.parent
        parent.children[parent.children.index(chosen)] = replacement
        replacement.parent = parent
        return node

    ExceptionReplacer.mutate = mutate


def _die_with_parent() -> None:
    """Pool worker initializer: the kernel sends SIGTERM to this worker when the run's
    main process dies. Without it, killing a run left its worker mutating the target's
    copy alongside the next run (each restoring the other's mutants: false kills and
    false survivors alike)."""
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def run_target(
    target: Target, operators: list[str], accepted: list[Accepted], workdir: Path, resume: bool = False
) -> Result:
    # One run per target copy at a time: a second run (or a leftover worker) mutating the
    # same files would make every result meaningless. The lock lives beside the copy (a
    # fresh run deletes the copy) and goes with this process, however it ends.
    lock = open(workdir / f".{target.name}.lock", "w")  # noqa: SIM115 (held until exit)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return Result(target.name, 0, 0, [], f"another run is using {workdir / target.name}", 0.0)
    try:
        return _run_target_locked(target, operators, accepted, workdir, resume)
    finally:
        lock.close()


def _run_target_locked(
    target: Target, operators: list[str], accepted: list[Accepted], workdir: Path, resume: bool
) -> Result:
    # Imported here so that --help and --list-operators work without cosmic-ray installed.
    from cosmic_ray.commands.execute import execute
    from cosmic_ray.commands.init import init
    from cosmic_ray.config import ConfigDict
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    _patch_exception_replacer()
    started = time.monotonic()
    home = workdir / target.name
    tree_dir = home / "sidekey"
    session = home / "session.sqlite"
    resuming = resume and session.exists() and tree_dir.is_dir()
    if resuming and (home / "original.py").read_bytes() != (ROOT / target.module).read_bytes():
        # The session's mutants are positions in the module as it was: they mean nothing
        # in a changed module.
        print(f"  {target.name}: {target.module} changed since the session began: running afresh",
              flush=True)
        resuming = False
    if not resuming:
        if home.exists():
            shutil.rmtree(home)
        tree_dir.mkdir(parents=True)
        copy_checkout(tree_dir)
    else:
        copy_checkout(tree_dir, only="tests")  # tests written since, e.g. to kill survivors
    module_path = tree_dir / target.module
    # A killed run leaves its last mutant applied: put the module back from the checkout's
    # copy before anything runs (cosmic-ray restores on a normal exit only).
    if resuming:
        shutil.copy2(home / "original.py", module_path)
    else:
        shutil.copy2(module_path, home / "original.py")
    source = module_path.read_text()
    lines = source.splitlines()
    owner = function_at(ast.parse(source))

    # The daemon the integration tests start is `sys.executable -m sidekey`: PYTHONPATH makes
    # it (and pytest) import the mutated copy. No bytecode is written or read, so a mutant that
    # keeps the file's size and mtime second (== -> !=) can never be served from a stale .pyc.
    for cache in tree_dir.rglob("__pycache__"):
        shutil.rmtree(cache)
    env = {
        **os.environ,
        "PYTHONPATH": str(tree_dir / "src"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    pytest_cmd = [
        sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
        "-o", "addopts=", "--timeout", str(int(target.timeout)), *target.tests,
    ]  # fmt: skip

    baseline_cmd = pytest_cmd
    if target.covering:
        # The baseline also records which test executes which line of the module.
        baseline_cmd = [*pytest_cmd[: -len(target.tests)], f"--cov={module_path.parent}",
                        "--cov-context=test", "--cov-report=", *target.tests]
        env["COVERAGE_FILE"] = str(home / "coverage.db")
    baseline_started = time.monotonic()
    baseline = subprocess.run(
        baseline_cmd, cwd=tree_dir, env=env, capture_output=True, text=True, timeout=target.timeout * 4
    )
    env.pop("COVERAGE_FILE", None)
    if baseline.returncode != 0:
        tail = "\n".join((baseline.stdout + baseline.stderr).splitlines()[-15:])
        return Result(target.name, 0, 0, [], f"tests fail on the UNMUTATED copy:\n{tail}",
                      time.monotonic() - started)

    config = ConfigDict()
    config["module-path"] = target.module
    # A mutant whose tests run three times as long as the unmutated copy's (plus slack for a
    # noisy machine) hangs: cosmic-ray kills it and it counts as killed. target.timeout is
    # pytest-timeout's bound on any single test.
    config["timeout"] = 3 * (time.monotonic() - baseline_started) + 60
    config["excluded-modules"] = []
    test_cmd = pytest_cmd
    if target.covering:
        _write_covering_map(home, module_path, target, pytest_cmd)
        test_cmd = [sys.executable, str(Path(__file__).resolve()), "--run-covering", str(home)]
    config["test-command"] = shlex.join(test_cmd)
    distributor = ConfigDict()
    distributor["name"] = "local"
    config["distributor"] = distributor

    if resuming:
        # Run again: the survivors (tests written since may kill them: that is what a
        # resume is for), the mutants the tool failed to apply, and those killed by a timeout (the bound is set by this
        # run's baseline, and a killed run may have timed out on a machine busier than now).
        with sqlite3.connect(session) as conn:
            conn.execute(
                "DELETE FROM work_results WHERE output = 'timeout' OR test_outcome = 'SURVIVED'"
                " OR worker_outcome = 'EXCEPTION'"
            )
    old_cwd = Path.cwd()
    old_env = dict(os.environ)
    os.chdir(tree_dir)  # cosmic-ray mutates module-path relative to the working directory
    os.environ.update(env)
    try:
        with use_db(str(session), WorkDB.Mode.create) as db:
            if not resuming:
                init([Path(target.module)], db, {})
            generated = db.num_work_items
            n_in_scope = sum(
                1 for _job, r in db.results if r.worker_outcome != WorkerOutcome.SKIPPED
            )  # resumed: the ones already run
            for item in list(db.pending_work_items):
                (mutation,) = item.mutations
                line_no = mutation.start_pos[0]
                function = owner.get(line_no, "<module>")
                if in_scope(target, operators, mutation.operator_name, function):
                    n_in_scope += 1
                else:
                    db.set_result(
                        item.job_id,
                        WorkResult(output="out of scope", worker_outcome=WorkerOutcome.SKIPPED),
                    )
            execute(db, config)
            mutants = collect(db, target, lines, owner, accepted)
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    return Result(target.name, generated, n_in_scope, mutants, None, time.monotonic() - started)


def _write_covering_map(home: Path, module_path: Path, target: Target, pytest_cmd: list[str]) -> None:
    """From the baseline's coverage (one context per test), write ``covering.json``: for
    each line of the module, the tests that executed it, in the target's test order."""
    import coverage

    data = coverage.CoverageData(basename=str(home / "coverage.db"))
    data.read()
    order = {name: i for i, name in enumerate(target.tests)}
    lines: dict[str, list[str]] = {}
    for lineno, contexts in (data.contexts_by_lineno(str(module_path)) or {}).items():
        # pytest-cov names a context "<nodeid>|setup", "|run" or "|teardown"; import-time
        # execution has the empty context (no test).
        nodeids = {c.rsplit("|", 1)[0] for c in contexts if c}
        lines[str(lineno)] = sorted(nodeids, key=lambda n: (order.get(n.split("::")[0], len(order)), n))
    covering = {
        "module": str(module_path),
        "original": str(home / "original.py"),
        "pytest": pytest_cmd[: -len(target.tests)],
        "tests": list(target.tests),
        "lines": lines,
    }
    (home / "covering.json").write_text(json.dumps(covering))


def run_covering(home: Path) -> int:
    """The test command of a ``covering`` target, run by cosmic-ray for each mutant.

    Finds the lines the mutant changed (the module against ``original.py``) and runs
    only the tests that executed them in the baseline. A changed line no test executed
    in process (run only by a daemon subprocess, or at import time) runs every test of
    the target instead: selection may only save time, never decide an outcome that a
    full run would decide otherwise for lack of a measurement.
    """
    covering = json.loads((home / "covering.json").read_text())
    before = Path(covering["original"]).read_text().splitlines()
    after = Path(covering["module"]).read_text().splitlines()
    changed: set[int] = set()
    for tag, i1, i2, _j1, _j2 in difflib.SequenceMatcher(None, before, after, autojunk=False).get_opcodes():
        if tag != "equal":
            changed.update(range(i1 + 1, max(i2, i1 + 1) + 1))
    selected: list[str] = []
    for line in sorted(changed):
        nodeids = covering["lines"].get(str(line))
        if not nodeids:
            selected = list(covering["tests"])  # not measured: run everything
            break
        selected += [n for n in nodeids if n not in selected]
    if not selected:
        selected = list(covering["tests"])
    return subprocess.run([*covering["pytest"], *selected]).returncode


def collect(db: Any, target: Target, lines: list[str], owner: dict[int, str], accepted: list[Accepted]) -> list[Mutant]:
    """The run mutants of one session, each with its outcome and, if it survived, its acceptance."""
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    mutants: list[Mutant] = []
    results = dict(db.results)
    for item in db.work_items:
        result = results.get(item.job_id)
        if result is None or result.worker_outcome == WorkerOutcome.SKIPPED:
            continue
        (mutation,) = item.mutations
        line_no = mutation.start_pos[0]
        text = lines[line_no - 1].strip() if line_no <= len(lines) else ""
        function = owner.get(line_no, "<module>")
        if result.worker_outcome == WorkerOutcome.NO_TEST:
            continue  # the operator found nothing to change at this occurrence
        if result.worker_outcome != WorkerOutcome.NORMAL:
            outcome = "error"
        elif result.test_outcome == TestOutcome.SURVIVED:
            outcome = "survived"
        elif result.output == "timeout":
            outcome = "timeout"  # cosmic-ray's own timeout: a hang kills the mutant too
        elif result.test_outcome == TestOutcome.INCOMPETENT:
            outcome = "incompetent"  # the mutant does not import: killed
        else:
            outcome = "killed"
        mutant = Mutant(
            target=target.name,
            module=target.module,
            line_no=line_no,
            line=text,
            function=function,
            operator=mutation.operator_name.removeprefix("core/"),
            outcome=outcome,
            diff=result.diff or "",
        )
        for acc in accepted:
            if (
                acc.module == mutant.module
                and acc.function == mutant.function
                and acc.operator.removeprefix("core/") == mutant.operator
                and acc.line == mutant.line
            ):
                mutant.accepted = acc
        mutants.append(mutant)
    return mutants


def reread(target: Target, accepted: list[Accepted], workdir: Path) -> Result:
    """The result of an earlier run from its session file (--report), without running anything."""
    from cosmic_ray.work_db import WorkDB, use_db

    home = workdir / target.name
    session = home / "session.sqlite"
    if not session.exists():
        return Result(target.name, 0, 0, [], f"no session in {home}", 0.0)
    source = (home / "sidekey" / target.module).read_text()
    owner = function_at(ast.parse(source))
    with use_db(str(session), WorkDB.Mode.open) as db:
        mutants = collect(db, target, source.splitlines(), owner, accepted)
        generated = db.num_work_items
    return Result(target.name, generated, len(mutants), mutants, None, 0.0)


def count_target(target: Target, operators: list[str]) -> tuple[int, int]:
    """(mutants in the module, mutants in scope) without running anything."""
    from cosmic_ray.ast import ast_nodes, get_ast_from_path
    from cosmic_ray.commands.init import _operators

    path = ROOT / target.module
    owner = function_at(ast.parse(path.read_text()))
    module_ast = get_ast_from_path(path)
    generated = n_in_scope = 0
    for name, _args, operator in _operators({}):
        for node in ast_nodes(module_ast):
            for start, _end in operator.mutation_positions(node):
                generated += 1
                function = owner.get(start[0], "<module>")
                if in_scope(target, operators, name, function):
                    n_in_scope += 1
    return generated, n_in_scope


def report(results: list[Result], accepted: list[Accepted], verbose: bool) -> int:
    status = 0
    total = {"generated": 0, "run": 0, "killed": 0, "survived": 0, "accepted": 0}
    used: set[Accepted] = set()
    print()
    print(f"{'target':<14}{'generated':>10}{'run':>7}{'killed':>8}{'survived':>10}{'accepted':>10}{'time':>9}")
    for r in results:
        if r.not_run is not None:
            print(f"{r.target:<14} not run: {r.not_run}")
            status = 1
            continue
        survived = [m for m in r.mutants if m.outcome == "survived"]
        ok = [m for m in survived if m.accepted is not None]
        used.update(m.accepted for m in ok if m.accepted is not None)
        errors = sum(1 for m in r.mutants if m.outcome == "error")
        killed = len(r.mutants) - len(survived) - errors
        print(
            f"{r.target:<14}{r.generated:>10}{len(r.mutants):>7}{killed:>8}{len(survived) - len(ok):>10}"
            f"{len(ok):>10}{r.seconds:>8.0f}s"
        )
        total["generated"] += r.generated
        total["run"] += len(r.mutants)
        total["killed"] += killed
        total["survived"] += len(survived) - len(ok)
        total["accepted"] += len(ok)
    print(
        f"{'TOTAL':<14}{total['generated']:>10}{total['run']:>7}{total['killed']:>8}"
        f"{total['survived']:>10}{total['accepted']:>10}"
    )
    for r in results:
        for m in r.mutants:
            if m.outcome == "survived" and m.accepted is None:
                status = 1
                print(f"\nSURVIVED {m.module}:{m.line_no} in {m.function} [{m.operator}]\n    {m.line}")
                if verbose:
                    print("\n".join("    " + x for x in m.diff.splitlines()))
            elif m.outcome == "error":
                status = 1  # never tested: no claim about it either way
                print(f"\nNOT TESTED (the tool failed to apply it) {m.module}:{m.line_no} in {m.function} "
                      f"[{m.operator}]\n    {m.line}")
    if verbose:
        for r in results:
            for m in r.mutants:
                if m.accepted is not None and m.outcome == "survived":
                    print(f"\naccepted {m.module}:{m.line_no} in {m.function} [{m.operator}]: {m.accepted.reason}")
    ran = {r.target for r in results if r.not_run is None}
    stale = [a for a in accepted if a not in used and any(a.module == r.module for r in _targets_ran(ran))]
    for a in stale:
        print(f"\nnote: accepted survivor no longer survives (remove it): {a.module} {a.function} {a.line!r}")
    return status


_ALL_TARGETS: list[Target] = []


def _targets_ran(names: set[str]) -> list[Target]:
    return [t for t in _ALL_TARGETS if t.name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help="target names from tools/mutation.toml (default: all)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="scope file (default: %(default)s)")
    parser.add_argument("--list", action="store_true", help="print targets and mutant counts, run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="targets run at once (default: 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the copies go (default: a temp dir)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the runs in --workdir where they stopped (same copies, same scope, the "
        "tests as they are now): runs what was not run, and the survivors and timeouts again; "
        "a target whose module changed since runs afresh",
    )
    parser.add_argument(
        "--report", action="store_true", help="re-print the results of the last run in --workdir, run nothing"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print each survivor's diff")
    args = parser.parse_args(argv)

    operators, targets, accepted = load(args.config)
    _ALL_TARGETS[:] = targets
    by_name = {t.name: t for t in targets}
    unknown = [n for n in args.targets if n not in by_name]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    chosen = [by_name[n] for n in args.targets] if args.targets else targets
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")

    if args.list:
        for t in chosen:
            generated, n_in_scope = count_target(t, operators)
            print(f"{t.name:<14}{t.module:<40}{generated:>7} generated {n_in_scope:>6} in scope")
        return 0

    if (args.report or args.resume) and args.workdir is None:
        parser.error("--report and --resume need --workdir")
    if args.report:
        return report([reread(t, accepted, args.workdir) for t in chosen], accepted, args.verbose)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sidekey-mutation-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"copies in {workdir}; {len(chosen)} target(s), {args.jobs} at a time", flush=True)
    results: list[Result] = []
    # Processes, not threads: each target chdirs into its own copy.
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, initializer=_die_with_parent) as pool:
        futures = {
            pool.submit(run_target, t, operators, accepted, workdir, args.resume): t for t in chosen
        }
        for fut in concurrent.futures.as_completed(futures):
            r = fut.result()
            if r.not_run is not None:
                print(f"  {r.target}: not run: {r.not_run}", flush=True)
            survived = sum(1 for m in r.mutants if m.outcome == "survived" and m.accepted is None)
            print(f"  {r.target}: {len(r.mutants)} run, {survived} unaccepted survivors, {r.seconds:.0f}s", flush=True)
            results.append(r)
    order = {t.name: i for i, t in enumerate(chosen)}
    results.sort(key=lambda r: order[r.target])
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return report(results, accepted, args.verbose)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run-covering"]:  # internal: the test command of a covering target
        sys.exit(run_covering(Path(sys.argv[2])))
    sys.exit(main())
