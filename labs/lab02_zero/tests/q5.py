from otter.test_files import test_case

OK_FORMAT = False

name = "q5"
points = 6

@test_case(points=2, hidden=False, 
    success_message="the theory table is right for the lab's MLP at N=2")
def test_theory_public(theory_bytes, theory_traffic, env):
    from grader.checks.lab02_zero import check_theory
    check_theory(theory_bytes, theory_traffic, seed=0, cases=0, namespace=env)

