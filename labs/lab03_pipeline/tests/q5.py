from otter.test_files import test_case

OK_FORMAT = False

name = "q5"
points = 12

@test_case(points=4, hidden=False, 
    success_message="on 2 processes, your gradients equal the unsplit model's")
def test_worker_public(pipeline_worker, env):
    from grader.checks.lab03_pipeline import check_worker
    check_worker(pipeline_worker, world_size=2, ms=[1, 2, 5], seed=0, namespace=env)

