from otter.test_files import test_case

OK_FORMAT = False

name = "q1"
points = 8

@test_case(points=3, hidden=False)
def test_greedy_verify_public(greedy_verify, env):
    from grader.checks.lab05_speculative import check_greedy_verify
    check_greedy_verify(greedy_verify, seed=0, cases=9, namespace=env)

