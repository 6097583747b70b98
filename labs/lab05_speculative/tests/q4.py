from otter.test_files import test_case

OK_FORMAT = False

name = "q4"
points = 4

@test_case(points=2, hidden=False)
def test_formula_public(expected_tokens_per_step):
    from grader.checks.lab05_speculative import check_expected_tokens
    check_expected_tokens(expected_tokens_per_step)

