from otter.test_files import test_case

OK_FORMAT = False

name = "q4"
points = 4

@test_case(points=0, hidden=False, 
    success_message="expected_tokens_per_step agrees with the reference on the public cases")
def test_formula_public(expected_tokens_per_step):
    from course_runtime.testing import assert_close, expected, require, time_limit
    require(expected_tokens_per_step=expected_tokens_per_step)
    for case in expected('q4_expected_tokens'):
        alpha, gamma = (case['alpha'], case['gamma'])
        with time_limit(5, 'expected_tokens_per_step'):
            got = expected_tokens_per_step(alpha, gamma)
        assert_close(None if got is None else float(got), case['tokens'], atol=1e-06, rtol=1e-06, what=f'expected_tokens_per_step({alpha}, {gamma})')

