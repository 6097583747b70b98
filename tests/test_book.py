"""The book builds from scratch with every notebook executed and warnings as errors, and it cites
every entry of the course's reading list."""

from __future__ import annotations

import re
import shutil
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


BOOK_GROUP = pytest.mark.xdist_group("book")


@pytest.mark.slow
@BOOK_GROUP
def test_book_builds_with_every_notebook_executed(built_book):
    """A fresh build (no cache), as `make book` runs it: -W and a failing cell fail the build."""
    html = built_book.require()
    pages = {p.relative_to(html).as_posix() for p in html.rglob("*.html")}
    assert {"index.html", "lab01.html", "benchmarks.html", "part2/autodiff.html"} <= pages
    assert "Traceback" not in (html / "part2" / "autodiff.html").read_text()


# Pages to read in the browser: equations, figures and wide tables among them.
OFFLINE_PAGES = ["intro.html", "part2/autodiff.html", "part1/transformer.html",
                 "part4/speculative.html", "benchmarks.html", "lab01.html"]
READ_PAGE = """async () => {
  if (window.MathJax && MathJax.startup) { await MathJax.startup.promise; }
  const article = document.querySelector("article") || document.body;
  const width = article.getBoundingClientRect().right;
  const scrolls = (el) => {
    for (let e = el.parentElement; e && e !== document.body; e = e.parentElement) {
      const x = getComputedStyle(e).overflowX;
      if ((x === "auto" || x === "scroll") && e.getBoundingClientRect().right <= width + 1)
        return true;
    }
    return false;
  };
  return {
    math: document.querySelectorAll("span.math, div.math").length,
    typeset: document.querySelectorAll("mjx-container").length,
    raw: [...document.querySelectorAll("span.math, div.math")]
           .filter(e => !e.querySelector("mjx-container")).map(e => e.textContent.slice(0, 60)),
    images: [...document.images].map(i => ({src: i.getAttribute("src"),
                                            ok: i.complete && i.naturalWidth > 0})),
    cut: [...article.querySelectorAll("table")]
           .filter(t => t.getBoundingClientRect().right > width + 1 && !scrolls(t))
           .map(t => t.textContent.trim().slice(0, 60)),
  };
}"""


@pytest.mark.slow
@BOOK_GROUP
def test_the_book_reads_offline_in_a_browser(built_book):
    """In Chromium with every request but file:// refused: equations typeset by the MathJax
    that ships with the book, every figure loaded, no table cut off at the page's edge."""
    from playwright.sync_api import sync_playwright

    html = built_book.require()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is needed for this test: apt-get install chromium (make test does)"
    refused: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})

        def offline(route):
            if route.request.url.startswith("file://"):
                return route.continue_()
            refused.append(route.request.url)
            return route.abort()

        page.route("**/*", offline)
        seen = {}
        for name in OFFLINE_PAGES:
            page.goto((html / name).as_uri(), wait_until="load")
            seen[name] = page.evaluate(READ_PAGE)
        browser.close()
    for name, found in seen.items():
        assert not found["raw"], f"{name}: equations left as raw LaTeX: {found['raw'][:3]}"
        broken = [i["src"] for i in found["images"] if not i["ok"]]
        assert not broken, f"{name}: figures that did not load offline: {broken}"
        assert not found["cut"], f"{name}: tables cut off at the page's edge: {found['cut']}"
    with_math = [name for name, found in seen.items() if found["math"]]
    assert len(with_math) >= 3, f"the pages checked should hold equations: {seen}"
    for name in with_math:
        assert seen[name]["typeset"] >= seen[name]["math"], f"{name}: {seen[name]}"
    assert any(found["images"] for found in seen.values()), "no figure was checked"
    mathjax = [url for url in refused if "mathjax" in url.lower()]
    assert not mathjax, f"the book still asks the network for MathJax: {mathjax}"
