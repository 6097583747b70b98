from otter.test_files import test_case

OK_FORMAT = False

name = "q3"
points = 8

@test_case(points=0, hidden=False, 
    success_message="ZeRO-2 matches AdamW at N=2 and drops the full gradients")
def test_zero2_public(Zero2):
    from course_runtime.distributed.data_parallel import assert_sharded_training, train_on_ranks, train_single_process
    from course_runtime.testing import expected, require
    require(Zero2=Zero2)
    case = expected('zero')
    sizes, n = (case['sizes'], case['world_size'])
    ranks = train_on_ranks(Zero2, n, sizes)
    assert_sharded_training(ranks, train_single_process(sizes, n, seed=0), stage=2, num_params=case['num_params'], traffic=case['traffic']['2'], label=f"Zero2 (MLP {'-'.join(map(str, sizes))}, N={n})")

