"""MathJax served with the book, so that its equations render without a network.

Sphinx loads MathJax from a CDN by default: offline, every equation of the book showed as raw
LaTeX. This extension copies MathJax 3 (the files the pinned ``sphinx-mathjax-offline`` package
ships) into ``_static/mathjax``; ``_config.yml`` points ``mathjax_path`` there. Only what the
CommonHTML renderer loads is copied: the TeX input with its extensions, the output and its fonts,
the menu and the accessibility modules, not the SVG or MathML bundles.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from sphinx.application import Sphinx

NEEDED = ("tex-chtml.js", "input/tex/extensions", "output/chtml", "ui", "a11y",
          "adaptors", "sre/speech-worker.js")


def mathjax_source() -> Path:
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or spec.origin is None:
        raise RuntimeError("the book needs the package sphinx-mathjax-offline (make setup)")
    return Path(spec.origin).parent / "static" / "mathjax"


def copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    source, target = mathjax_source(), Path(app.outdir) / "_static" / "mathjax"
    for name in NEEDED:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, target / name, dirs_exist_ok=True)
        elif path.exists():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / name)


def setup(app: Sphinx) -> dict[str, bool]:
    mathjax_source()  # fail at the start of a build, not at its end
    app.connect("build-finished", copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
