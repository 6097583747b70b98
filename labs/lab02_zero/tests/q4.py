from otter.test_files import test_case

OK_FORMAT = False

name = "q4"
points = 12

@test_case(points=0, hidden=False, 
    success_message="ZeRO-3 matches AdamW at N=2, sends 3Ψ and frees what it gathers")
def test_zero3_public(Zero3):
    from course_runtime.distributed.data_parallel import assert_sharded_training, train_on_ranks, train_single_process
    from course_runtime.testing import expected, require
    require(Zero3=Zero3)
    case = expected('zero')
    sizes, n = (case['sizes'], case['world_size'])
    ranks = train_on_ranks(Zero3, n, sizes)
    assert_sharded_training(ranks, train_single_process(sizes, n, seed=0), stage=3, num_params=case['num_params'], traffic=case['traffic']['3'], label=f"Zero3 (MLP {'-'.join(map(str, sizes))}, N={n})")

