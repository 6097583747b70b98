from otter.test_files import test_case

OK_FORMAT = False

name = "q1"
points = 6

@test_case(points=2, hidden=False, 
    success_message="your GPipe schedules are valid, all-forward-then-all-backward, and do not stall")
def test_gpipe_public(gpipe_schedule, env):
    from grader.checks.lab03_pipeline import check_schedule
    check_schedule(gpipe_schedule, 'gpipe', [(2, 1), (2, 3), (4, 8)], namespace=env)

