from otter.test_files import test_case

OK_FORMAT = False

name = "q2"
points = 12

@test_case(points=2, hidden=False)
def test_residual_public(residual_distribution, env):
    from grader.checks.lab05_speculative import check_residual
    check_residual(residual_distribution, seed=0, cases=4, namespace=env)

@test_case(points=3, hidden=False)
def test_rejection_step_public(rejection_step, env):
    from grader.checks.lab05_speculative import check_rejection_step
    check_rejection_step(rejection_step, seed=0, cases=2, namespace=env)

