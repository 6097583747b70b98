from otter.test_files import test_case

OK_FORMAT = False

name = "q3"
points = 10

@test_case(points=3, hidden=False, 
    success_message="paged attention equals dense attention on scattered, NaN-poisoned blocks")
def test_decode_public(paged_decode_attention, env):
    from grader.checks.lab04_paged_kv import check_decode_attention
    check_decode_attention(paged_decode_attention, seed=0, cases=4, namespace=env)

@test_case(points=2, hidden=False, 
    success_message="the cache is read block by block")
def test_no_dense_gather_public(paged_decode_attention, env):
    from grader.checks.lab04_paged_kv import check_no_dense_gather
    check_no_dense_gather(paged_decode_attention, namespace=env)

