"""What students receive: labs/ matches the masters, and shows no solution and no hidden test."""

from __future__ import annotations

import shutil

import nbformat
import pytest

from grader.labs import Lab
from grader.leaks import find_leaks, hidden_test_names, solution_lines
from grader.student_folder import out_of_sync

from .conftest import lab_names


@pytest.mark.parametrize("lab", lab_names())
def test_labs_folder_is_in_sync_with_the_master(assigned, lab):
    assert out_of_sync(Lab(lab), assigned(lab).out / "student") == [], \
        "run `make update-labs` and commit labs/"


@pytest.mark.parametrize("lab", lab_names())
def test_nothing_secret_reaches_students(assigned, lab):
    built = assigned(lab)
    assert solution_lines(Lab(lab)), "the master should have solution code to protect"
    assert hidden_test_names(built.zip), "the lab should have hidden tests"
    assert find_leaks(Lab(lab), autograder_zip=built.zip) == []


@pytest.mark.parametrize("lab", lab_names())
def test_a_planted_leak_is_found(assigned, tmp_path, lab):
    """The leak check itself can fail: plant a solution line and a hidden test's name."""
    built = assigned(lab)
    copy = tmp_path / lab
    shutil.copytree(Lab(lab).student_dir, copy)
    notebook = copy / f"{lab}.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    secret = sorted(solution_lines(Lab(lab)))[0]
    hidden = sorted(hidden_test_names(built.zip))[0]
    nb.cells.append(nbformat.v4.new_code_cell(f"{secret}\n# {hidden}"))
    nbformat.write(nb, notebook)
    leaks = find_leaks(Lab(lab), student_dir=copy, autograder_zip=built.zip)
    assert any(secret in leak for leak in leaks), leaks
    assert any(hidden in leak for leak in leaks), leaks
