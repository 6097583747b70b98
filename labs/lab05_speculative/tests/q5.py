from otter.test_files import test_case

OK_FORMAT = False

name = "q5"
points = 10

@test_case(points=4, hidden=False, 
    success_message="fewer than half a target forward pass per token")
def test_forwards_per_token_public(speculative_generate, env):
    from grader.checks.lab05_speculative import check_forwards_per_token
    check_forwards_per_token(speculative_generate, bound=0.45, namespace=env)

