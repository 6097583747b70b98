from otter.test_files import test_case

OK_FORMAT = False

name = "q6"
points = 8

@test_case(points=4, hidden=False, 
    success_message="your ZeRO-1 step is within 3x of the reference's")
def test_speed_public(Zero1, env):
    from grader.checks.lab02_zero import check_speed
    check_speed(Zero1, stage=1, world_size=2, bound=3.0, namespace=env)

