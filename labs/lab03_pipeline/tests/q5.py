from otter.test_files import test_case

OK_FORMAT = False

name = "q5"
points = 12

@test_case(points=0, hidden=False, 
    success_message="on 2 processes, your gradients equal the unsplit model's")
def test_worker_public(pipeline_worker):
    from course_runtime.pipeline import check_worker, lab_batch
    from course_runtime.testing import expected, require
    require(pipeline_worker=pipeline_worker)
    data = expected('q5_worker')
    cases = [(c['name'], c['schedule'], *lab_batch(c['num_microbatches'], seed=c['seed'])) for c in data['cases']]
    check_worker(pipeline_worker, data['world_size'], cases)

