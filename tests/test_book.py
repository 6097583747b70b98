"""The book builds from scratch with every notebook executed and warnings as errors, and it cites
every entry of the course's reading list."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO / "book"


def reading_list_entries() -> list[tuple[str, str, str]]:
    """(part, title, url) for every entry of tests/data/reading_list.md."""
    entries, part = [], ""
    for line in (REPO / "tests" / "data" / "reading_list.md").read_text().splitlines():
        if line.startswith("## "):
            part = line[3:].split("—")[0].strip()
        for title, url in re.findall(r"\[([^\]]+)\]\((https?://[^)]+)\)", line):
            entries.append((part, title, url))
    return entries


def book_text() -> str:
    return "\n".join(p.read_text() for p in BOOK.rglob("*.md") if "_build" not in p.parts)


def test_every_reading_list_entry_is_in_the_book():
    text = book_text()
    entries = reading_list_entries()
    assert len(entries) >= 70
    missing = [f"{part}: {title} ({url})" for part, title, url in entries if url not in text]
    assert not missing, "not cited in the book:\n" + "\n".join(missing)


@pytest.mark.slow
def test_book_builds_with_every_notebook_executed(tmp_path):
    """A fresh build (no cache), as `make book` runs it: -W and a failing cell fail the build."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "jupyter-book"), "build", str(BOOK), "--warningiserror",
         "--keep-going", "--path-output", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    html = tmp_path / "_build" / "html"
    pages = {p.relative_to(html).as_posix() for p in html.rglob("*.html")}
    assert {"index.html", "lab01.html", "benchmarks.html", "part2/autodiff.html"} <= pages
    assert "Traceback" not in (html / "part2" / "autodiff.html").read_text()
