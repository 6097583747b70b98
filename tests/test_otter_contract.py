"""What the grader relies on in otter-grader, one contract per internal (grader/otter_adapter.py).

Each test states a fact about the installed otter that the adapter assumes, and fails with the
name of the internal when an upgrade changes it: the version, where otter's runner looks up
``grade_notebook`` and with which arguments it calls it, the signatures the adapter replaces,
the shape of test files, cases and results, and the columns of ``otter grade``'s table."""

from __future__ import annotations

import inspect
import textwrap

import pytest

from grader import otter_adapter

TEST_FILE = textwrap.dedent('''
    from otter.test_files import test_case

    OK_FORMAT = False

    name = "q9"
    points = 3

    @test_case(points=0, hidden=False, success_message="positive")
    def test_public(x):
        assert x > 0, "x should be positive"

    @test_case(points=1, hidden=True)
    def test_small(x):
        assert x < 10, "x should be small"

    @test_case(points=2, hidden=True)
    def test_loops(x):
        if x == 5:
            raise KeyboardInterrupt
        assert x != 7, "not 7"
''')


@pytest.fixture
def test_file_path(tmp_path):
    path = tmp_path / "q9.py"
    path.write_text(TEST_FILE)
    return path


def test_the_installed_otter_is_one_the_adapter_supports():
    import otter
    assert otter.__version__ in otter_adapter.SUPPORTED
    otter_adapter.check_version()


def test_another_otter_is_refused_with_what_to_do():
    with pytest.raises(otter_adapter.UnsupportedOtter, match="otter-grader 99.0.0 is installed"
                       ".*constraints.txt.*test_otter_contract"):
        otter_adapter.check_version("99.0.0")


def test_the_runner_calls_grade_notebook_by_module_lookup_with_these_arguments():
    """replace_notebook_grading sets python_runner.grade_notebook: the runner must look it up
    in its module when it runs, passing the arguments the course's grade_notebook reads."""
    from otter.run.run_autograder.runners import python_runner
    source = inspect.getsource(python_runner.PythonRunner.run)
    call = source[source.index("grade_notebook("):]
    call = call[:call.index("\n            )")]
    for argument in ("tests_glob=", "cwd=", "test_dir="):
        assert argument in call, f"otter's runner no longer passes {argument}"
    assert "from ....execute import grade_notebook" in inspect.getsource(python_runner)


def test_the_replaced_methods_keep_their_signatures():
    from otter.test_files import GradingResults
    from otter.test_files.exception_test import ExceptionTestFile
    assert list(inspect.signature(GradingResults.to_gradescope_dict).parameters) == [
        "self", "ag_config"]
    assert list(inspect.signature(ExceptionTestFile.run).parameters) == [
        "self", "global_environment"]


def test_a_test_file_loads_with_its_cases_points_and_visibility(test_file_path):
    test_file = otter_adapter.load_test_file(str(test_file_path))
    assert test_file.name == "q9"
    assert [(c.name, c.points, c.hidden) for c in test_file.test_cases] == [
        ("q9 - 1", 0, False), ("q9 - 2", 1, True), ("q9 - 3", 2, True)]
    case = test_file.test_cases[0]
    assert case.success_message == "positive"
    assert case.body.test_func.__name__ == "test_public"
    case.body.call_func({"x": 1})  # the globals' names are the function's arguments
    with pytest.raises(AssertionError, match="positive"):
        case.body.call_func({"x": -1})


def test_cases_fail_alone_with_messages_in_words(test_file_path, monkeypatch):
    """fail_cases_alone's run: an exception or an interrupt fails its case only, in words;
    the scores and the results otter builds from them follow."""
    from otter.test_files.exception_test import ExceptionTestFile
    monkeypatch.setattr(ExceptionTestFile, "run", ExceptionTestFile.run)  # restored after
    otter_adapter.fail_cases_alone()
    test_file = otter_adapter.load_test_file(str(test_file_path))
    test_file.run({"x": 5})
    passed = [r.passed for r in test_file.test_case_results]
    assert passed == [True, True, False]
    assert test_file.test_case_results[2].message == otter_adapter.INTERRUPTED
    assert (test_file.score, test_file.possible) == (1, 3)
    other = otter_adapter.load_test_file(str(test_file_path))
    other.run({"x": 12})
    message = other.test_case_results[1].message
    assert message == "❌ Test case failed\nAssertionError: x should be small"
    assert "assert x < 10" not in message  # the hidden test's source is never quoted


def test_results_hold_what_the_batch_and_gradescope_read(test_file_path):
    test_file = otter_adapter.load_test_file(str(test_file_path))
    test_file.test_case_results = [otter_adapter.case_result(c, c.name != "q9 - 3", "m")
                                   for c in test_file.test_cases]
    results = otter_adapter.grading_results([test_file])
    assert results.get_result("q9") is test_file and list(results.test_files) == ["q9"]
    assert (results.total, results.possible) == (1, 3)
    assert results.percent == pytest.approx(1 / 3, abs=1e-4)
    assert not results.has_catastrophic_failure() and results._catastrophic_error is None
    assert results.passed_all_public
    assert "q9" in results.summary()
    result = test_file.test_case_results[0]
    assert (result.test_case.name, result.passed, result.message) == ("q9 - 1", True, "m")


def test_the_scores_table_has_otters_columns(test_file_path):
    test_file = otter_adapter.load_test_file(str(test_file_path))
    test_file.test_case_results = [otter_adapter.case_result(c, True, "ok")
                                   for c in test_file.test_cases]
    results = otter_adapter.grading_results([test_file])
    results.file = "a.ipynb"
    table = otter_adapter.scores_table([results])
    assert set(table.columns) == otter_adapter.score_columns() | {"q9"}
    rows = table.set_index("file")
    assert rows.loc["points-per-question", "q9"] == 3
    assert rows.loc["a.ipynb", "q9"] == 3 and rows.loc["a.ipynb", "grading_status"] == "Completed"


def test_points_resolve_as_otter_resolves_them():
    """A question's points spread over the tests that name none (the nbgrader export)."""
    tests = [("a", "", False, 0), ("b", "", True, None), ("c", "", True, None)]
    assert otter_adapter.resolve_points(4, tests) == [0, 2, 2]
    assert otter_adapter.resolve_points(None, [("a", "", True, 1.5)]) == [1.5]
