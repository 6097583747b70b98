from otter.test_files import test_case

OK_FORMAT = False

name = "q4"
points = 14

@test_case(points=0, hidden=False, 
    success_message="your stale keys and values give DistriFusion's noise predictions")
def test_stale_public(StaleKV):
    import torch
    from course_runtime.patch_parallel import trajectory_eps
    from course_runtime.testing import assert_close, expected, require
    require(StaleKV=StaleKV)
    case = expected('q3_q4_trajectory')
    steps, warmup = (len(case['timesteps']), case['warmup'])
    got = trajectory_eps(torch.tensor(case['xs']), case['timesteps'], case['labels'], case['world_size'], guidance=case['guidance'], warmup=warmup, stale_kv=StaleKV, timeout=120)
    want = torch.tensor(case['stale_eps'])
    for i in range(steps):
        assert_close(got['eps'][i].numpy(), want[i].numpy(), atol=0.0001, rtol=0.0001, what=f"DistriFusion's noise predictions on 2 ranks, step {i} ({('warm-up' if i < warmup else 'stale')})")
    blocks = 4
    for rank, calls in enumerate(got['calls']):
        assert calls.get('all_gather', 0) == blocks * warmup, f"rank {rank} ran {calls.get('all_gather', 0)} blocking all-gathers, expected {blocks * warmup}: after the warm-up, gather in the background"

