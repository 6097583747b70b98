from otter.test_files import test_case

OK_FORMAT = False

name = "q5"
points = 10

@test_case(points=0, hidden=False, 
    success_message="fewer than half a target forward pass per token")
def test_forwards_per_token_public(speculative_generate):
    from course_runtime.speculative import forwards_per_token
    from course_runtime.testing import require, time_limit
    require(speculative_generate=speculative_generate)
    with time_limit(120, 'forwards_per_token(speculative_generate)'):
        got = forwards_per_token(speculative_generate, gamma=4)
    assert got <= 0.45, f'your decoder ran {got:.3f} target forward passes per generated token at gamma=4 (target-only decoding runs 1.0); it should be at most 0.45: verify all proposals in one pass, and keep the bonus token'

