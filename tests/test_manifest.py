"""The lab manifest (grader/labs.toml) names every file of every lab, and only files that exist."""

from __future__ import annotations

import ast

from grader.labs import MANIFEST, REPO, SOLUTIONS, Lab, all_labs, manifest

REQUIRED = ("title", "part", "chapters", "page", "master", "student", "reference", "checks",
            "bugs", "benchmark")


def test_every_lab_under_solutions_is_in_the_manifest():
    folders = {p.name for p in SOLUTIONS.glob("lab[0-9][0-9]_*") if p.is_dir()}
    assert folders == set(manifest()), f"{MANIFEST.name} and solutions/ disagree"


def test_every_entry_names_its_files_and_they_exist():
    for lab in all_labs():
        missing_keys = [k for k in REQUIRED if k not in lab.entry]
        assert not missing_keys, f"{lab.name} lacks {missing_keys} in {MANIFEST.name}"
        for key in REQUIRED[2:]:
            for path in lab.paths(key):
                assert path.exists(), f"{lab.name}.{key}: {path.relative_to(REPO)} does not exist"


def test_files_carry_the_lab_key():
    for lab in all_labs():
        for key in ("master", "student", "checks", "bugs"):
            assert lab.name in str(lab.path(key).relative_to(REPO)), (lab.name, key)
        assert lab.master.name == f"{lab.name}.ipynb"


def test_chapters_and_page_are_in_the_book():
    toc = (REPO / "book" / "_toc.yml").read_text()
    for lab in all_labs():
        for page in [lab.path("page"), *lab.paths("chapters")]:
            assert page.relative_to(REPO / "book").with_suffix("").as_posix() in toc, page


def test_the_checks_compare_with_the_reference_modules_they_name():
    """A lab's checks import the reference modules the manifest lists for it."""
    for lab in all_labs():
        imported = set()
        for node in ast.walk(ast.parse(lab.checks.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        for module in lab.paths("reference"):
            dotted = module.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
            assert any(name == dotted or name.startswith(dotted + ".") for name in imported), \
                f"{lab.name}: its checks never import {dotted}"


def test_an_unknown_lab_is_refused():
    import pytest
    with pytest.raises(SystemExit, match="is not in grader/labs.toml"):
        Lab("lab99_nothing")


def test_every_lab_is_graded_isolated():
    """The grader refuses a lab whose checks cannot judge a submission from a process of its
    own (grader.gradescope.require_isolated): no lab's hidden tests run in the student's kernel."""
    import importlib
    for lab in all_labs():
        checks = importlib.import_module(f"grader.checks.{lab.name}")
        assert getattr(checks, "ISOLATED", False) is True, lab.name
