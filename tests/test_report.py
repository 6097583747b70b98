"""The batch's score report (grader/report.py) on a table made by hand: the shares of full,
partial and no marks per question, the submissions that did not complete, the slowest ones,
and figures that are real PNG files embedded in a self-contained page."""

from __future__ import annotations

import pandas as pd
import pytest

from grader.report import problems, question_summary, write_report


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame([
        dict(file="points-per-question", q1=2.0, q2=4.0, total_points_earned=6.0,
             percent_correct=100.0, grading_status="Completed"),
        dict(file="a.ipynb", q1=2.0, q2=4.0, total_points_earned=6.0, percent_correct=100.0,
             grading_status="Completed"),
        dict(file="b.ipynb", q1=1.0, q2=0.0, total_points_earned=1.0, percent_correct=16.7,
             grading_status="Completed"),
        dict(file="c.ipynb", q1=2.0, q2=0.0, total_points_earned=2.0, percent_correct=33.3,
             grading_status="timed out after 900 s (an infinite loop or a hang?)"),
        dict(file="d.ipynb", q1=0.0, q2=0.0, total_points_earned=0.0, percent_correct=0.0,
             grading_status="grading process exited with status 3 <without results>"),
    ])


def test_question_shares(table):
    summary = question_summary(table)
    assert list(summary.index) == ["q1", "q2"]
    assert summary.loc["q1", ["full", "partial", "none"]].tolist() == [0.5, 0.25, 0.25]
    assert summary.loc["q2", ["full", "partial", "none"]].tolist() == [0.25, 0.0, 0.75]
    assert summary.loc["q2", "mean"] == 1.0
    assert summary.loc["q1", "possible"] == 2.0


def test_problems_are_the_rows_that_did_not_complete(table):
    assert [name for name, _ in problems(table)] == ["c.ipynb", "d.ipynb"]


def test_report_page(table, tmp_path):
    seconds = {"a.ipynb": 3.0, "b.ipynb": 40.0, "c.ipynb": 900.0, "d.ipynb": 1.5}
    page = write_report(table, seconds, tmp_path, title="Lab 9", slowest=2).read_text()
    assert page.startswith("<!doctype html>") and "<title>Lab 9</title>" in page
    slow = page.split("<h2>Slowest 2</h2>")[1].split("<h2>")[0]
    assert slow.index("c.ipynb") < slow.index("b.ipynb") and "a.ipynb" not in slow
    failed = page.split("<h2>Failed or crashed</h2>")[1]
    assert "timed out after 900 s" in failed and "&lt;without results&gt;" in failed
    assert "a.ipynb" not in failed and "b.ipynb" not in failed
    assert page.count("data:image/png;base64,") == 2
    for name in ("totals", "questions"):
        assert (tmp_path / f"report-{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4 submissions" in page and "2 did not complete" in page
    assert "total possible 6 points" in page
