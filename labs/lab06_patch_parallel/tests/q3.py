from otter.test_files import test_case

OK_FORMAT = False

name = "q3"
points = 10

@test_case(points=0, hidden=False, 
    success_message="on 2 ranks, your noise predictions equal the single process's")
def test_gather_public(gather_kv):
    import torch
    from course_runtime.models.dit import load
    from course_runtime.patch_parallel import kv_bytes_per_step, trajectory_eps
    from course_runtime.testing import assert_close, expected, require
    require(gather_kv=gather_kv)
    case = expected('q3_q4_trajectory')
    steps = len(case['timesteps'])
    got = trajectory_eps(torch.tensor(case['xs']), case['timesteps'], case['labels'], case['world_size'], guidance=case['guidance'], warmup=steps, gather_kv=gather_kv, timeout=120)
    assert_close(got['eps'].numpy(), torch.tensor(case['eps']).numpy(), atol=0.0001, rtol=0.0001, what='the noise predictions on 2 ranks with your gather_kv (against the single process)')
    want = kv_bytes_per_step(load('dit'), len(case['labels']), case['world_size']) * steps
    assert all((abs(sent - want) <= 1e-06 * want for sent in got['kv_bytes'])), f"each rank sent {got['kv_bytes']} bytes, expected {want:,.0f}"

