from otter.test_files import test_case

OK_FORMAT = False

name = "q3"
points = 16

@test_case(points=4, hidden=False, 
    success_message="greedy speculative decoding reproduces the target's greedy output")
def test_greedy_public(speculative_generate, env):
    from grader.checks.lab05_speculative import check_greedy_equals_target
    check_greedy_equals_target(speculative_generate, gammas=[4], prompts=['Call me Ishmael. '], new_tokens=60, namespace=env)

