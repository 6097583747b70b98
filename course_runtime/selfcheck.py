"""Run a lab's public tests on a notebook, headless, without changing it.

    python -m course_runtime.selfcheck labs/lab01_autograd/lab01_autograd.ipynb [--json OUT]

The notebook runs in its own folder, cell by cell, as JupyterLab would run it (a cell that fails
or runs past ``--cell-timeout`` seconds does not stop the rest); then every public test of the
folder's ``tests/`` runs against the notebook's variables. One line per question; the exit status
is 0 only when every public test passes. The notebook file itself is never written.

Public tests tell you whether you are on track. Your grade comes from hidden tests your
instructor runs: more shapes, edge cases and sizes than these.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MARKER = "@@course-selfcheck@@"
RUN_TESTS = f"""
import glob as _glob, json as _json
from otter.test_files import create_test_file as _create_test_file
_results = {{}}
for _path in sorted(_glob.glob("tests/*.py")):
    _file = _create_test_file(_path, None)
    _file.run(globals())
    _results[_file.name] = [
        {{"test": _r.test_case.body.test_func.__name__, "passed": bool(_r.passed),
          "message": _r.message}} for _r in _file.test_case_results]
print({MARKER!r} + _json.dumps(_results))
"""


def run_public_tests(notebook: Path, cell_timeout: int = 600) -> dict[str, list[dict]]:
    """Execute ``notebook`` in its folder and return ``{question: [{test, passed, message}]}``."""
    import nbformat
    from nbclient import NotebookClient

    notebook = notebook.resolve()
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:  # the notebook's own export cell would write a zip beside it
        if cell.cell_type == "code" and "grader.export(" in cell.source:
            cell.source = "# (export skipped by the self-check)"
    nb.cells.append(nbformat.v4.new_code_cell(RUN_TESTS))
    client = NotebookClient(nb, timeout=cell_timeout, allow_errors=True, kernel_name="python3",
                            resources={"metadata": {"path": str(notebook.parent)}})
    client.execute()
    for output in nb.cells[-1].get("outputs", []):
        text = output.get("text", "")
        if MARKER in text:
            return json.loads(text.split(MARKER, 1)[1].strip().splitlines()[0])
    errors = [o for o in nb.cells[-1].get("outputs", []) if o.get("output_type") == "error"]
    detail = f": {errors[0]['ename']}: {errors[0]['evalue']}" if errors else ""
    raise RuntimeError(f"the public tests of {notebook.parent / 'tests'} did not run{detail}")


def _in_words(message: str) -> str:
    """otter's failure message without its header and the quoted test line: the exception."""
    lines = message.removeprefix("❌ Test case failed\n").strip().splitlines()
    if lines and lines[0].startswith("Error at line"):
        lines = lines[1:]
        while lines and lines[0].startswith("  "):
            lines = lines[1:]
    return "\n".join(lines)


def report(results: dict[str, list[dict]]) -> tuple[str, bool]:
    lines, ok = [], True
    for question, tests in results.items():
        passed = sum(t["passed"] for t in tests)
        ok &= passed == len(tests)
        mark = "passed" if passed == len(tests) else "FAILED"
        lines.append(f"{question}: {mark} ({passed}/{len(tests)} public tests)")
        lines += [f"  {t['test']}: " + _in_words(t["message"]).replace("\n", "\n    ")
                  for t in tests if not t["passed"]]
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--cell-timeout", type=int, default=600, help="seconds per cell")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not (args.notebook.parent / "tests").is_dir():
        parser.error(f"no tests/ folder beside {args.notebook}")
    results = run_public_tests(args.notebook, args.cell_timeout)
    text, ok = report(results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
