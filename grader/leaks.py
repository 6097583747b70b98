"""Checks on what students receive: labs/ in sync with solutions/, and nothing leaked into it."""

from __future__ import annotations

import ast
import html
import re
import textwrap
import zipfile
from pathlib import Path

import nbformat

from .labs import REPO, Lab, all_labs

MARKERS = re.compile(r"BEGIN SOLUTION|END SOLUTION|#\s*SOLUTION\b|BEGIN HIDDEN|hidden\s*=\s*True|"
                     r"hidden:\s*true", re.IGNORECASE)


def solution_lines(lab: Lab, min_length: int = 20) -> set[str]:
    """The distinctive lines of the master's solutions (between the markers, or tagged): those
    long enough to mean something and not also written elsewhere in the master (given code)."""
    nb = nbformat.read(lab.master, as_version=4)
    secret: set[str] = set()
    public: list[str] = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            public.append(cell.source)
            continue
        inside = False
        for line in cell.source.splitlines():
            stripped = line.strip()
            if stripped.startswith("# BEGIN SOLUTION"):
                inside = True
            elif stripped.startswith("# END SOLUTION"):
                inside = False
            elif inside or stripped.endswith("# SOLUTION"):
                if len(stripped) >= min_length and not stripped.startswith("#"):
                    secret.add(stripped.removesuffix("# SOLUTION").strip())
            else:
                public.append(line)
    given = "\n".join(public)
    return {line for line in secret if line not in given}


def hidden_test_names(autograder_zip: Path) -> set[str]:
    """Names of the hidden test functions, read from the autograder zip."""
    names: set[str] = set()
    with zipfile.ZipFile(autograder_zip) as archive:
        for name in archive.namelist():
            if name.startswith("tests/") and name.endswith(".py"):
                source = archive.read(name).decode()
                names.update(re.findall(r"hidden=True[^\n]*\n(?:[^\n]*\n)?def (\w+)", source))
    return names


def find_leaks(lab: Lab, student_dir: Path | None = None,
               autograder_zip: Path | None = None) -> list[str]:
    """Every place under labs/<lab>/ (or ``student_dir``) where a solution line, a marker or the
    name of a hidden test (read from ``autograder_zip``, by default the built one) shows."""
    student_dir = student_dir or lab.student_dir
    autograder_zip = autograder_zip or lab.autograder_zip
    problems = []
    secrets = solution_lines(lab)
    hidden = hidden_test_names(autograder_zip) if autograder_zip.exists() else set()
    for path in sorted(p for p in student_dir.rglob("*") if p.is_file()):
        text = _readable_text(path)
        rel = path.relative_to(student_dir.parent)
        if MARKERS.search(text):
            problems.append(f"{rel}: contains a solution or hidden-test marker")
        problems += [f"{rel}: contains the solution line {line!r}" for line in secrets
                     if line in text]
        problems += [f"{rel}: contains the hidden test {name}" for name in hidden if name in text]
    return problems


def _readable_text(path: Path) -> str:
    """A file's text; for a notebook, its cells' sources and outputs as written, not JSON-escaped
    (a solution line with quotes in it would not match the raw JSON)."""
    text = path.read_text(errors="replace")
    if path.suffix != ".ipynb":
        return text
    nb = nbformat.reads(text, as_version=4)
    parts = [cell.source for cell in nb.cells]
    parts += [str(output) for cell in nb.cells for output in cell.get("outputs", [])]
    return "\n".join(parts + [str(nb.metadata)])


# ----------------------------------------------------------------------------------------------
# The student release: no answer in any file, judged by content
# ----------------------------------------------------------------------------------------------

# Packages whose functions are answers (or checks): none of their bodies may appear in a release.
SECRET_PACKAGES = ("course_reference", "grader.checks")
# Systems of Part III that the book prints on purpose (`inspect.getsource`) to teach them; no lab
# grades them (tests/test_release.py checks that), so their code may appear in the book's pages.
BOOK_SHOWS = ("course_reference.systems.ring_allreduce.",
              "course_reference.systems.flash_attention.",
              "course_reference.systems.tensor_parallel.")
# Folders and files that only instructors have.
FORBIDDEN_PATHS = ("solutions", "course_reference", "grader", "tests")
MIN_BODY_NODES = 12  # smaller bodies (`return self._x`) are written the same way by anyone


def _body_key(function: ast.AST) -> tuple[str, int] | None:
    """The function's body without its docstring, as an AST dump, and its size in nodes."""
    body = list(function.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                             ast.Constant):
        body = body[1:]
    if not body:
        return None
    module = ast.Module(body=body, type_ignores=[])
    return ast.dump(module), sum(1 for _ in ast.walk(module))


def _functions(tree: ast.AST, prefix: str) -> list[tuple[str, ast.AST]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            found += [(f"{prefix}{node.name}.{item.name}", item) for item in node.body
                      if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append((f"{prefix}{node.name}", node))
    return found


def secret_functions() -> dict[str, str]:
    """``{body dump: qualified name}`` of every function of the secret packages."""
    import importlib.util

    secrets: dict[str, str] = {}
    for package in SECRET_PACKAGES:
        root = Path(importlib.util.find_spec(package).origin).parent
        for path in sorted(root.rglob("*.py")):
            module = ".".join((package, *path.relative_to(root).with_suffix("").parts))
            module = module.removesuffix(".__init__")
            for name, function in _functions(ast.parse(path.read_text()), f"{module}."):
                key = _body_key(function)
                if key and key[1] >= MIN_BODY_NODES:
                    secrets.setdefault(key[0], name)
    return secrets


def _code_blocks(path: Path) -> list[str]:
    """The code a file holds: a Python file, a notebook's code cells and outputs, an HTML page's
    preformatted blocks (the book's code cells and printed outputs)."""
    text = path.read_text(errors="replace")
    if path.suffix == ".py":
        return [text]
    if path.suffix == ".ipynb":
        nb = nbformat.reads(text, as_version=4)
        blocks = [c.source for c in nb.cells if c.cell_type == "code"]
        return blocks + [str(o.get("text", "")) for c in nb.cells if c.cell_type == "code"
                         for o in c.get("outputs", [])]
    if path.suffix in (".html", ".htm"):
        return [html.unescape(re.sub(r"<[^>]+>", "", block))
                for block in re.findall(r"<pre[^>]*>(.*?)</pre>", text, re.DOTALL)]
    if path.suffix == ".md":
        return re.findall(r"```[^\n]*\n(.*?)```", text, re.DOTALL)
    return []


def _parse(code: str) -> ast.AST | None:
    code = "\n".join(line for line in code.splitlines()
                     if not line.lstrip().startswith(("%", "!", ">>>")))
    for attempt in (code, textwrap.dedent(code)):
        try:
            return ast.parse(attempt)
        except (SyntaxError, ValueError):
            continue
    return None


def release_leaks(folder: Path) -> list[str]:
    """Everything in the release ``folder`` that gives an answer away: an instructor's folder,
    a solution marker, a master's solution line or hidden test name, a notebook or module that
    imports the reference or the checks, or the body of any of their functions."""
    problems = [f"{name}/ is an instructor's folder" for name in FORBIDDEN_PATHS
                if (folder / name).exists()]
    secrets = secret_functions()
    labs = [lab for lab in all_labs() if (folder / "labs" / lab.name).exists()]
    given = {lab.name: set(lab.entry.get("given", [])) for lab in labs}
    runtime = "\n".join(p.read_text() for p in (REPO / "course_runtime").rglob("*.py"))
    lines = {line: lab.name for lab in labs for line in solution_lines(lab)
             if line not in runtime}  # a line the runtime also has is given, not secret
    hidden = {name: lab.name for lab in labs for name in hidden_tests_of_master(lab)}
    imports = re.compile(r"^\s*(from|import)\s+(course_reference|grader)\b", re.MULTILINE)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and ".git" not in p.parts):
        rel = path.relative_to(folder).as_posix()
        if path.suffix not in (".py", ".ipynb", ".html", ".md", ".json", ".txt", ".toml", ".yml"):
            continue
        if path.name.endswith(("-autograder.zip", "-solution.ipynb")):
            problems.append(f"{rel}: an instructor's file")
        in_book = rel.startswith("book/")
        text = path.read_text(errors="replace")
        if not in_book:
            readable = _readable_text(path) if path.suffix == ".ipynb" else text
            if MARKERS.search(readable):
                problems.append(f"{rel}: contains a solution or hidden-test marker")
            problems += [f"{rel}: contains a solution line of {lab}: {line!r}"
                         for line, lab in lines.items() if line in readable]
            problems += [f"{rel}: names the hidden test {name} of {lab}"
                         for name, lab in hidden.items() if name in readable]
            problems += [f"{rel}: imports {m.group(2)}" for m in imports.finditer(
                "\n".join(_code_blocks(path)))]
        for block in _code_blocks(path):
            tree = _parse(block)
            for name, function in _functions(tree, "") if tree else []:
                key = _body_key(function)
                secret = secrets.get(key[0]) if key else None
                # A lab's notebook (in labs/, or the book's download of it) may hold what the
                # manifest says the handout gives.
                lab_of_file = rel.split("/")[1] if rel.startswith("labs/") else \
                    path.stem if path.suffix == ".ipynb" and path.stem in given else None
                if secret and not (in_book and secret.startswith(BOOK_SHOWS)) and \
                        secret not in given.get(lab_of_file, ()):
                    problems.append(f"{rel}: the function {name} is {secret} of the reference")
    return sorted(set(problems))


def hidden_tests_of_master(lab: Lab) -> set[str]:
    """The names of the master's hidden test functions."""
    names = set()
    for cell in nbformat.read(lab.master, as_version=4).cells:
        if cell.cell_type == "code" and re.search(r"^hidden:\s*true", cell.source, re.MULTILINE):
            names.update(re.findall(r"^def (\w+)", cell.source, re.MULTILINE))
    return names
