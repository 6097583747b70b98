from otter.test_files import test_case

OK_FORMAT = False

name = "q5"
points = 8

@test_case(points=3, hidden=False, 
    success_message="every request gets its tokens, and every block comes back")
def test_serve_public(serve, env):
    from grader.checks.lab04_paged_kv import check_serve
    check_serve(serve, seed=0, count=6, num_blocks=200, namespace=env)

