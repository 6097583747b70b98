from otter.test_files import test_case

OK_FORMAT = False

name = "q3"
points = 8

@test_case(points=3, hidden=False, 
    success_message="find_deadlock names the stuck stages on the public cases")
def test_find_deadlock_public(find_deadlock, env):
    from grader.checks.lab03_pipeline import check_find_deadlock
    check_find_deadlock(find_deadlock, seed=None, namespace=env)

