from otter.test_files import test_case

OK_FORMAT = False

name = "q2"
points = 8

@test_case(points=0, hidden=False, 
    success_message="your DDIM steps are the public cases'")
def test_ddim_public(ddim_step):
    import torch
    from course_runtime.diffusion import NoiseSchedule
    from course_runtime.testing import assert_close, expected, require, time_limit
    require(ddim_step=ddim_step)
    abar = NoiseSchedule().alphas_cumprod
    for case in expected('q2_ddim'):
        with time_limit(10, 'ddim_step'):
            got = ddim_step(torch.tensor(case['eps']), case['t'], case['t_prev'], torch.tensor(case['x']), abar.clone(), clip=case['clip'])
        assert_close(None if got is None else torch.as_tensor(got).numpy(), torch.tensor(case['x_prev']).numpy(), atol=1e-05, rtol=1e-05, what=f"ddim_step from t={case['t']} to t_prev={case['t_prev']} with clip={case['clip']}")

