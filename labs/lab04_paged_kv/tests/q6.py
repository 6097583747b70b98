from otter.test_files import test_case

OK_FORMAT = False

name = "q6"
points = 8

@test_case(points=4, hidden=False, 
    success_message="continuous batching takes at least 2x fewer model calls than static batching")
def test_steps_public(serve, env):
    from grader.checks.lab04_paged_kv import check_steps_vs_static
    check_steps_vs_static(serve, seed=0, count=32, bound=2.0, namespace=env)

