from otter.test_files import test_case

OK_FORMAT = False

name = "q5"
points = 12

@test_case(points=0, hidden=False, 
    success_message="your sampler is close to the single process and sends the formula's bytes")
def test_samples_public(split_band, merge_bands, ddim_step, StaleKV):
    import torch
    from course_runtime.models.dit import load
    from course_runtime.patch_parallel import kv_bytes_per_step, sample_bands
    from course_runtime.testing import expected, require
    require(split_band=split_band, merge_bands=merge_bands, ddim_step=ddim_step, StaleKV=StaleKV)
    case = expected('q5_samples')
    got = sample_bands(case['labels'], case['world_size'], split_band=split_band, merge_bands=merge_bands, ddim_step=ddim_step, stale_kv=StaleKV, steps=case['steps'], guidance=case['guidance'], seed=case['seed'], timeout=180)
    error = float((torch.as_tensor(got['images']) - torch.tensor(case['single'])).abs().mean())
    assert error <= case['bound'], f"your DistriFusion samples differ from the single process's by {error:.3f} per pixel on average (bound {case['bound']})"
    want = kv_bytes_per_step(load('dit'), len(case['labels']), case['world_size']) * case['steps']
    assert all((abs(sent - want) <= 1e-06 * want for sent in got['kv_bytes'])), f"each rank sent {got['kv_bytes']} bytes, expected {want:,.0f}"

