"""Mutation testing of a lab's hidden tests: how many wrong solutions do they catch?

    python -m grader mutation-score [LAB ...] [--sample N] [--jobs 2] [--timeout S] [--out F]

A *mutant* is the lab's solution with one small change a student could have made: an operator
swapped (``+``/``-``, ``<``/``<=``, ``and``/``or``), a constant or a slice bound off by one, a
statement dropped, ``+=`` written as ``=``, two arguments swapped, a ``not`` or a minus lost, a
``True`` flipped (``operator_mutants``), and every curated bug of the lab (``tests/submissions``).
A mutant is *killed* when the lab's hidden tests take at least one point from it.

Grading each mutant through a kernel costs a minute; here no kernel is started at all. One process
runs the solution's code cells in an in-process IPython shell, as the grading kernel would, and
grades each question where its ``grader.check`` cell stands by calling the hidden test cases on
the notebook's namespace, exactly as otter calls them. Just before it runs the first cell a
mutant changes, it forks: the child inherits everything computed so far, runs the mutated cell
and the rest, and reports each question's score through a pipe, stopping at the first point lost.
The children run ``jobs`` at a time on one thread each, and one that runs past ``timeout`` is
killed, which counts as killed (the real grader's cell limit would cost it points too).

Survivors are listed per question. Each is a test to strengthen, or a mutant that computes the
same thing (an *equivalent* mutant): those are recorded, with the reason, in the lab's bug file as
``EQUIVALENT = {mutant_id: reason}`` and leave the score's denominator.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib
import io
import json
import os
import random
import re
import select
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from course_runtime.sandbox import OtterStandIn

from .grade_one import CHECK_CALL  # a `grader.check("qN")` cell, as the batch grader finds it
from .labs import REPO, Lab

SOLUTION = re.compile(r"^\s*# BEGIN SOLUTION\s*$(.*?)^\s*# END SOLUTION\s*$",
                      re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Mutant:
    """The solution with some cells replaced: ``cells`` maps a code cell's index to its source."""

    id: str
    origin: str  # "operator" or "curated"
    where: str  # the function or class the change is in
    description: str
    cells: dict[int, str] = field(hash=False, compare=False)

    @property
    def first_cell(self) -> int:
        return min(self.cells)


# --------------------------------------------------------------------------------------------
# Operator mutations
# --------------------------------------------------------------------------------------------

_BINOPS = {ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.Mult: [ast.Div], ast.Div: [ast.Mult],
           ast.FloorDiv: [ast.Div], ast.Mod: [ast.FloorDiv], ast.Pow: [ast.Mult]}
_CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
           ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn,
           ast.NotIn: ast.In}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//",
           ast.Mod: "%", ast.Pow: "**", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
           ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is", ast.IsNot: "is not", ast.In: "in",
           ast.NotIn: "not in", ast.And: "and", ast.Or: "or"}


def _solution_lines(source: str) -> set[int]:
    """The 1-based line numbers inside ``# BEGIN SOLUTION`` ... ``# END SOLUTION`` regions."""
    lines: set[int] = set()
    for match in SOLUTION.finditer(source):
        first = source.count("\n", 0, match.start(1)) + 1
        last = source.count("\n", 0, match.end(1))
        lines.update(range(first, last + 1))
    return lines


def _offsets(source: str) -> list[int]:
    starts, total = [], 0
    for line in source.splitlines(keepends=True):
        starts.append(total)
        total += len(line)
    return starts + [total]


def _replace(source: str, node: ast.AST, text: str, starts: list[int]) -> str:
    start = starts[node.lineno - 1] + node.col_offset
    end = starts[node.end_lineno - 1] + node.end_col_offset
    return source[:start] + text + source[end:]


def _expression_mutations(node: ast.AST) -> Iterator[tuple[str, ast.AST]]:
    """(operator name, replacement node) for one expression node."""
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        for op in _BINOPS[type(node.op)]:
            yield (f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[op]}",
                   ast.BinOp(node.left, op(), node.right))
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in _CMPOPS:
                ops = list(node.ops)
                ops[i] = _CMPOPS[type(op)]()
                yield (f"{_SYMBOL[type(op)]} -> {_SYMBOL[type(ops[i])]}",
                       ast.Compare(node.left, ops, node.comparators))
    elif isinstance(node, ast.BoolOp):
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[type(other)]}", ast.BoolOp(other, node.values)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        yield ("drop not" if isinstance(node.op, ast.Not) else "drop minus"), node.operand
    elif isinstance(node, ast.Constant) and type(node.value) is bool:
        yield f"{node.value} -> {not node.value}", ast.Constant(not node.value)
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        yield f"{node.value} -> {node.value + 1}", ast.Constant(node.value + 1)
        yield f"{node.value} -> {node.value - 1}", ast.Constant(node.value - 1)
    elif isinstance(node, ast.Slice):
        for name in ("lower", "upper"):
            bound = getattr(node, name)
            if bound is not None and not isinstance(bound, ast.Constant):
                for sign, op in (("+", ast.Add()), ("-", ast.Sub())):
                    changed = copy.copy(node)
                    setattr(changed, name, ast.BinOp(bound, op, ast.Constant(1)))
                    yield f"slice {name} {sign} 1", changed
    elif isinstance(node, ast.Call) and len(node.args) >= 2 and not any(
            isinstance(a, ast.Starred) for a in node.args[:2]):
        args = [node.args[1], node.args[0], *node.args[2:]]
        yield "swap arguments", ast.Call(node.func, args, node.keywords)


def _statement_mutations(node: ast.stmt) -> Iterator[tuple[str, str]]:
    """(operator name, replacement text) for one statement."""
    if isinstance(node, ast.AugAssign):
        yield (f"{_SYMBOL.get(type(node.op), '?')}= -> =",
               ast.unparse(ast.Assign([node.target], node.value, lineno=0)))
    if isinstance(node, (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return,
                         ast.If, ast.For, ast.While, ast.With, ast.Raise)):
        yield "drop statement", "pass"


def _where(stack: list[ast.AST]) -> str:
    names = [n.name for n in stack if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    return ".".join(names) or "<cell>"


def operator_mutants(cells: dict[int, str]) -> list[Mutant]:
    """Every operator mutation of the code inside solution regions of functions and classes.

    Code outside a ``def`` or ``class`` (training loops, plots) is left alone: it is the
    student's experiment, not the code the questions grade. A mutant's id names the function,
    the operator and the text it changes, so it survives edits elsewhere in the notebook.
    """
    mutants: list[Mutant] = []
    seen: dict[str, int] = {}
    for index, source in sorted(cells.items()):
        lines = _solution_lines(source)
        if not lines:
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        starts = _offsets(source)

        def visit(node: ast.AST, stack: list[ast.AST]) -> None:
            inside = any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in stack)
            here = getattr(node, "lineno", None)
            if inside and here in lines and getattr(node, "end_lineno", None) in lines:
                if isinstance(node, ast.stmt) and not isinstance(
                        node, (ast.FunctionDef, ast.ClassDef)):
                    for name, text in _statement_mutations(node):
                        add(node, name, text, stack, whole_lines=True)
                elif isinstance(node, ast.expr) and not isinstance(
                        node, ast.JoinedStr):
                    for name, replacement in _expression_mutations(node):
                        text = ast.unparse(replacement)
                        if not isinstance(node, ast.Slice):
                            text = f"({text})"
                        add(node, name, text, stack)
            if isinstance(node, ast.JoinedStr):
                return  # f-strings: messages, not behaviour
            for child in ast.iter_child_nodes(node):
                visit(child, stack + [node])

        def add(node: ast.AST, name: str, text: str, stack: list[ast.AST],
                whole_lines: bool = False) -> None:
            if whole_lines and "\n" not in ast.get_source_segment(source, node):
                mutated = _replace(source, node, text, starts)
            elif whole_lines:
                indent = " " * node.col_offset
                first, last = starts[node.lineno - 1], starts[node.end_lineno]
                mutated = source[:first] + indent + text + "\n" + source[last:]
            else:
                mutated = _replace(source, node, text, starts)
            try:
                ast.parse(mutated)
            except SyntaxError:
                return
            if mutated == source:
                return
            original = " ".join(ast.get_source_segment(source, node).split())
            where = _where(stack)
            key = f"{where}: {name}: {original[:60]}"
            seen[key] = seen.get(key, 0) + 1
            mutant_id = key if seen[key] == 1 else f"{key} #{seen[key]}"
            mutants.append(Mutant(mutant_id, "operator", where, f"{name} in `{original[:80]}`",
                                  {index: mutated}))

        visit(tree, [])
    return mutants


# --------------------------------------------------------------------------------------------
# The lab's notebook, its tests and its curated bugs
# --------------------------------------------------------------------------------------------

@dataclass
class LabUnderTest:
    lab: Lab
    folder: Path  # otter assign's output: autograder/ (solution notebook, tests) and student/
    cells: list[tuple[str, str]]  # (cell type, source) of the solution notebook

    @property
    def last_check(self) -> int:
        """The index of the last cell that checks a question: nothing after it is graded."""
        return max(i for i, (kind, source) in enumerate(self.cells)
                   if kind == "code" and CHECK_CALL.search(source))

    @property
    def code_cells(self) -> dict[int, str]:
        return {i: s for i, (kind, s) in enumerate(self.cells) if kind == "code"}

    def curated_mutants(self) -> list[Mutant]:
        """The lab's curated bugs (``MUTATIONS``), and its curated rewrites (``REWRITES``: the
        same computation written otherwise, which must keep every point)."""
        bugs = _bug_module(self.lab)
        from tests.submissions.mutations import edited_cells
        return [Mutant(f"{origin}: {m.name}", origin, ", ".join(sorted(m.breaks)), m.why,
                       edited_cells(m, self.code_cells))
                for origin, group in (("curated", "MUTATIONS"), ("rewrite", "REWRITES"))
                for m in getattr(bugs, group, [])]

    def equivalent(self) -> dict[str, str]:
        return dict(getattr(_bug_module(self.lab), "EQUIVALENT", {}))


def _bug_module(lab: Lab) -> Any:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    module = ".".join(lab.path("bugs").relative_to(REPO).with_suffix("").parts)
    return importlib.import_module(module)


def prepare(lab: Lab, folder: Path) -> LabUnderTest:
    """Assign ``lab`` into ``folder`` (as `course assign` does, without grading it)."""
    import nbformat

    from .assign import build
    build(lab, folder)
    nb = nbformat.read(folder / "autograder" / f"{lab.name}.ipynb", as_version=4)
    return LabUnderTest(lab, folder, [(c.cell_type, c.source) for c in nb.cells])


def _hidden_cases(tests_dir: Path) -> dict[str, list[Any]]:
    """Each question's test cases that carry points (the public ones are worth none)."""
    from .otter_adapter import load_test_file
    cases = {}
    for path in sorted(tests_dir.glob("*.py")):
        test_file = load_test_file(str(path))
        cases[test_file.name] = [c for c in test_file.test_cases if c.points]
    return cases


def _grade(cases: list[Any], namespace: dict[str, Any],
           stop_early: bool = False) -> tuple[float, float, str]:
    """Call each test case on ``namespace`` as otter does; the points earned, the points
    possible and the first failure. With ``stop_early``, the cases after a failure are not run
    (they could only take more points)."""
    earned, possible, first_failure = 0.0, sum(c.points for c in cases), ""
    for case in cases:
        if stop_early and first_failure:
            break
        try:
            case.body.call_func(namespace)
        except BaseException as error:  # noqa: BLE001 - a mutant may raise anything
            first_failure = first_failure or f"{case.name}: {type(error).__name__}: {error}"[:300]
        else:
            earned += case.points
    return earned, possible, first_failure


# --------------------------------------------------------------------------------------------
# Running mutants
# --------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    mutant: Mutant
    scores: dict[str, tuple[float, float]]  # per question graded: (earned, possible)
    by: str  # the first question that took points, "timeout", "crash", or "" if none did
    message: str
    seconds: float

    @property
    def killed(self) -> bool:
        return bool(self.by)

    @property
    def lost(self) -> set[str]:
        """The questions that took points (the one that timed out or crashed, too)."""
        return {q for q, (earned, possible) in self.scores.items() if earned < possible}


def _shell(workdir: Path) -> Any:
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=config)
    shell.user_ns["grader"] = OtterStandIn()
    os.chdir(workdir)
    return shell


CELL_LIMIT = 120.0  # seconds: a cell still running then is interrupted, as in the grader


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"the cell ran past {CELL_LIMIT:g} s")


def _run_cell(shell: Any, source: str) -> None:
    """Run one cell as the grading kernel would: output discarded, an exception or an
    interruption shown (here: dropped) and execution going on with the next cell."""
    if "otter.Notebook(" in source:
        return  # the otter cell: `grader` is the harness's stand-in
    previous = signal.signal(signal.SIGALRM, _interrupt)
    signal.setitimer(signal.ITIMER_REAL, CELL_LIMIT)
    try:
        with contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            shell.run_cell(source, store_history=False, silent=True)
    except KeyboardInterrupt:
        pass  # arrived between statements IPython guards
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _child(shell: Any, under: LabUnderTest, cases: dict[str, list[Any]], mutant: Mutant,
           start: int, pipe: int, stop_early: bool) -> None:
    """In the forked child: run the mutated notebook from cell ``start``, sending each question's
    score down ``pipe`` (and stopping at the first point lost if ``stop_early``); then exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)

    def send(**message: Any) -> None:
        os.write(pipe, (json.dumps(message) + "\n").encode())

    try:
        for index in range(start, under.last_check + 1):
            kind, source = under.cells[index]
            if kind != "code":
                continue
            _run_cell(shell, mutant.cells.get(index, source))
            for question in CHECK_CALL.findall(source):
                earned, possible, failure = _grade(cases.get(question, []), shell.user_ns,
                                                   stop_early)
                send(question=question, earned=earned, possible=possible, message=failure)
                if stop_early and earned < possible:
                    return
        send(done=True)
    finally:
        os._exit(0)


def run_mutants(under: LabUnderTest, mutants: list[Mutant], *, jobs: int = 2,
                timeout: float = 300, progress: bool = True) -> tuple[list[Outcome], dict]:
    """Grade every mutant; returns the outcomes and the solution's own scores per question."""
    from tqdm.auto import tqdm

    os.environ.update({v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                        "MKL_NUM_THREADS")})
    os.environ.setdefault("MPLBACKEND", "Agg")
    import torch
    torch.set_num_threads(1)

    late = [m.id for m in mutants if m.first_cell > under.last_check]
    if late:
        raise ValueError(f"{under.lab.name}: no question is graded after the cells these "
                         f"mutants change: {late}")
    workdir = Path(tempfile.mkdtemp(prefix="mutants-"))
    shutil.copytree(under.folder / "student", workdir, dirs_exist_ok=True)
    home = Path.cwd()
    cases = _hidden_cases(under.folder / "autograder" / "tests")
    shell = _shell(workdir)
    by_start: dict[int, list[Mutant]] = {}
    for mutant in mutants:
        by_start.setdefault(mutant.first_cell, []).append(mutant)
    outcomes: list[Outcome] = []
    baseline: dict[str, tuple[float, float, str]] = {}
    bar = tqdm(total=len(mutants), desc=under.lab.name, unit="mutant", disable=not progress)
    try:
        for index, (kind, source) in enumerate(under.cells[:under.last_check + 1]):
            if index in by_start:
                outcomes += _fork_all(shell, under, cases, by_start[index], index, jobs,
                                      timeout, bar)
            if kind != "code":
                continue
            _run_cell(shell, source)
            for question in CHECK_CALL.findall(source):
                baseline[question] = _grade(cases.get(question, []), shell.user_ns)
    finally:
        bar.close()
        os.chdir(home)
        shutil.rmtree(workdir, ignore_errors=True)
    return outcomes, baseline


def _fork_all(shell: Any, under: LabUnderTest, cases: dict[str, list[Any]],
              mutants: list[Mutant], start: int, jobs: int, timeout: float,
              bar: Any) -> list[Outcome]:
    """Grade ``mutants`` (which all start at cell ``start``) in forked children."""
    sys.stdout.flush()
    sys.stderr.flush()
    waiting, running, done = list(mutants), {}, []
    while waiting or running:
        while waiting and len(running) < jobs:
            mutant = waiting.pop(0)
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                _child(shell, under, cases, mutant, start, write,
                       stop_early=mutant.origin == "operator")
            os.close(write)
            running[read] = (pid, mutant, time.monotonic(), b"")
        ready, _, _ = select.select(list(running), [], [], 1.0)
        for fd in list(running):
            pid, mutant, began, data = running[fd]
            finished = False
            if fd in ready:
                chunk = os.read(fd, 65536)
                data += chunk
                finished = not chunk
            elapsed = time.monotonic() - began
            timed_out = not finished and elapsed > timeout
            if timed_out:
                os.kill(pid, signal.SIGKILL)
                finished = True
            running[fd] = (pid, mutant, began, data)
            if finished:
                os.close(fd)
                os.waitpid(pid, 0)
                del running[fd]
                done.append(_outcome(under, mutant, start, data, elapsed, timed_out, timeout))
                bar.update(1)
    return done


def _outcome(under: LabUnderTest, mutant: Mutant, start: int, data: bytes, elapsed: float,
             timed_out: bool, timeout: float) -> Outcome:
    """Read a child's reports; a child that stopped before the end lost the question it was on."""
    scores, by, message, complete = {}, "", "", False
    for line in data.decode(errors="replace").splitlines():
        report = json.loads(line)
        if report.get("done"):
            complete = True
            continue
        scores[report["question"]] = (report["earned"], report["possible"])
        if report["earned"] < report["possible"] and not by:
            by, message = report["question"], report["message"]
    if not complete and not by:
        pending = [q for kind, source in under.cells[start:] if kind == "code"
                   for q in CHECK_CALL.findall(source) if q not in scores]
        by = "timeout" if timed_out else "crash"
        message = (f"ran past {timeout:g} s (an infinite loop?)" if timed_out else
                   "the grading process died (a crash?)")
        if pending:
            scores[pending[0]] = (0.0, 1.0)
            message = f"{pending[0]}: {message}"
    return Outcome(mutant, scores, by, message, elapsed)


# --------------------------------------------------------------------------------------------
# The score
# --------------------------------------------------------------------------------------------

def question_of(under: LabUnderTest, mutant: Mutant) -> str:
    """The question a mutant belongs to: the first check after the cell it changes."""
    for kind, source in under.cells[mutant.first_cell:]:
        found = CHECK_CALL.findall(source) if kind == "code" else []
        if found:
            return found[0]
    return "-"


def sample(mutants: list[Mutant], n: int | None, seed: int = 0) -> list[Mutant]:
    """``n`` of ``mutants`` chosen at random (seeded), in their order; all of them if ``n`` is
    None. A smaller sample is part of a larger one (the first ``n`` of one seeded shuffle)."""
    if n is None or n >= len(mutants):
        return mutants
    order = list(range(len(mutants)))
    random.Random(seed).shuffle(order)
    keep = set(order[:n])
    return [m for i, m in enumerate(mutants) if i in keep]


def summarise(under: LabUnderTest, outcomes: list[Outcome]) -> dict[str, Any]:
    """The score: killed over graded mutants (operator and curated), equivalent ones aside;
    curated rewrites do not count, and any of them that loses points is listed."""
    equivalent = under.equivalent()
    questions: dict[str, dict[str, Any]] = {}
    for outcome in outcomes:
        if outcome.mutant.origin == "rewrite":
            continue
        q = questions.setdefault(question_of(under, outcome.mutant), dict(
            mutants=0, killed=0, equivalent=0, survivors=[]))
        q["mutants"] += 1
        if outcome.killed:
            q["killed"] += 1
        elif outcome.mutant.id in equivalent:
            q["equivalent"] += 1
        else:
            q["survivors"].append(dict(id=outcome.mutant.id, origin=outcome.mutant.origin,
                                       description=outcome.mutant.description))
    mutants = sum(q["mutants"] for q in questions.values())
    counted = sum(q["mutants"] - q["equivalent"] for q in questions.values())
    killed = sum(q["killed"] for q in questions.values())
    curated_alive = [o.mutant.id for o in outcomes if o.mutant.origin == "curated" and
                     not o.killed]
    rewrites_losing = [o.mutant.id for o in outcomes if o.mutant.origin == "rewrite" and
                       o.killed]
    graded = [dict(id=o.mutant.id, origin=o.mutant.origin, lost=sorted(o.lost), by=o.by,
                   message=o.message, seconds=round(o.seconds, 1)) for o in outcomes]
    return dict(lab=under.lab.name, mutants=mutants, killed=killed, outcomes=graded,
                rewrites_losing_points=rewrites_losing,
                equivalent=sum(q["equivalent"] for q in questions.values()),
                score=killed / counted if counted else 1.0, curated_alive=curated_alive,
                questions=dict(sorted(questions.items())))


def report(summary: dict[str, Any]) -> str:
    lines = [f"{summary['lab']}: {summary['killed']} of {summary['mutants']} mutants killed, "
             f"{summary['equivalent']} equivalent: score {summary['score']:.1%}"]
    for rewrite in summary.get("rewrites_losing_points", []):
        lines.append(f"  a rewrite loses points: {rewrite}")
    for name, q in summary["questions"].items():
        lines.append(f"  {name:6s} {q['killed']:4d}/{q['mutants']:<4d} killed, "
                     f"{q['equivalent']} equivalent, {len(q['survivors'])} surviving")
        for survivor in q["survivors"]:
            lines.append(f"      survives: {survivor['id']}")
    return "\n".join(lines)


def score_lab(lab: Lab, *, sample_size: int | None = None, jobs: int = 2, timeout: float = 300,
              progress: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        under = prepare(lab, Path(tmp) / lab.name)
        operators = [m for m in operator_mutants(under.code_cells)
                     if m.first_cell <= under.last_check]  # code no question reaches: ungraded
        mutants = sample(operators, sample_size) + under.curated_mutants()
        outcomes, baseline = run_mutants(under, mutants, jobs=jobs, timeout=timeout,
                                         progress=progress)
    lost = {q: s for q, s in baseline.items() if s[0] < s[1]}
    if lost:
        raise RuntimeError(f"{lab.name}: the solution itself loses points in the harness: {lost}")
    summary = summarise(under, outcomes)
    summary["operator_mutants"] = len(operators)
    summary["sampled"] = sample_size is not None and sample_size < len(operators)
    return summary


RESULTS = REPO / "grader" / "mutation_scores.json"


def load_scores(path: Path = RESULTS) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def scores_table(scores: dict[str, Any]) -> Any:
    """Per lab and question: mutants, killed, equivalent, surviving and the score (a pandas
    DataFrame). Counts only: a survivor's id quotes the solution, which students must not see."""
    import pandas as pd
    rows = []
    for lab, summary in sorted(scores.items()):
        for question, q in summary["questions"].items():
            counted = q["mutants"] - q["equivalent"]
            rows.append(dict(lab=lab, question=question, mutants=q["mutants"],
                             killed=q["killed"], equivalent=q["equivalent"],
                             surviving=len(q["survivors"]),
                             score=q["killed"] / counted if counted else 1.0))
        rows.append(dict(lab=lab, question="all", mutants=summary["mutants"],
                         killed=summary["killed"], equivalent=summary["equivalent"],
                         surviving=summary["mutants"] - summary["killed"] -
                         summary["equivalent"], score=summary["score"]))
    return pd.DataFrame(rows).set_index(["lab", "question"])


def record(summary: dict[str, Any], path: Path = RESULTS) -> None:
    """Put one lab's summary into ``path`` (the book's grading page shows its counts), keeping
    the other labs' entries; written to a temporary file and renamed, so never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = load_scores(path)
    data[summary["lab"]] = summary
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    """Score one lab in this process (`course mutation-score` runs one process per lab)."""
    import argparse

    from .labs import find_lab
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lab")
    parser.add_argument("--sample", type=int, default=None,
                        help="grade this many operator mutants, chosen at random (seeded)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutant")
    parser.add_argument("--json", type=Path, required=True, help="where to write the summary")
    args = parser.parse_args(argv)
    summary = score_lab(find_lab(args.lab), sample_size=args.sample, jobs=args.jobs,
                        timeout=args.timeout)
    args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
