from otter.test_files import test_case

OK_FORMAT = False

name = "q2"
points = 10

@test_case(points=0, hidden=False, 
    success_message="ZeRO-1 matches AdamW at N=2, with 1/2 of the state per rank and 2Ψ sent")
def test_zero1_public(Zero1):
    from course_runtime.distributed.data_parallel import assert_sharded_training, train_on_ranks, train_single_process
    from course_runtime.testing import expected, require
    require(Zero1=Zero1)
    case = expected('zero')
    sizes, n = (case['sizes'], case['world_size'])
    ranks = train_on_ranks(Zero1, n, sizes)
    assert_sharded_training(ranks, train_single_process(sizes, n, seed=0), stage=1, num_params=case['num_params'], traffic=case['traffic']['1'], label=f"Zero1 (MLP {'-'.join(map(str, sizes))}, N={n})")

