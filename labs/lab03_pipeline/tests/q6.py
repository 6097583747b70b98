from otter.test_files import test_case

OK_FORMAT = False

name = "q6"
points = 6

@test_case(points=0, hidden=False, 
    success_message="your gradients equal PyTorch's, and your step is within 5x of PyTorch's")
def test_speed_public(pipeline_worker):
    from statistics import median
    from course_runtime.pipeline import check_worker, compare_with_torch, lab_batch
    from course_runtime.testing import expected, require
    require(pipeline_worker=pipeline_worker)
    data = expected('q6_speed')
    first = data['check']
    check_worker(pipeline_worker, first['world_size'], [(c['name'], c['schedule'], *lab_batch(c['num_microbatches'], seed=c['seed'])) for c in first['cases']])
    times = compare_with_torch(pipeline_worker, data['schedule'], data['num_stages'], data['num_microbatches'], rounds=6)
    assert times['difference'] < 0.0001, f"in the timed steps your gradients differ from torch.distributed.pipelining's by {times['difference']:.3g} (relative to the largest): a step only counts when it is right"
    yours, theirs = (median(times['yours']), median(times['torch']))
    print(f'1F1B pipeline step: yours {yours * 1000.0:.2f} ms, torch.distributed.pipelining {theirs * 1000.0:.2f} ms, ratio {yours / theirs:.2f}')
    assert yours / theirs <= data['bound'], f"your 1F1B step takes {yours / theirs:.2f}x the time of torch.distributed.pipelining's (median of 6 interleaved steps); the bound is {data['bound']:g}x"

