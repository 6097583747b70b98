from otter.test_files import test_case

OK_FORMAT = False

name = "q6"
points = 6

@test_case(points=3, hidden=False, 
    success_message="your step is within 5x of torch.distributed.pipelining's")
def test_speed_public(pipeline_worker, env):
    from grader.checks.lab03_pipeline import check_speed
    check_speed(pipeline_worker, bound=5.0, namespace=env)

