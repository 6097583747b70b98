from otter.test_files import test_case

OK_FORMAT = False

name = "q5"
points = 4

@test_case(points=0, hidden=False, 
    success_message="Adam matches torch.optim.Adam for 5 steps")
def test_adam_public(Tensor, Adam):
    import numpy as np
    import torch
    from course_runtime.testing import assert_close, require, time_limit
    require(Adam=Adam)
    rng = np.random.default_rng(0)
    start = rng.standard_normal((3, 4)).astype(np.float32)
    ours = Tensor(start.copy(), requires_grad=True)
    theirs = torch.tensor(start.astype(np.float64), requires_grad=True)
    optimizer = Adam([ours], lr=0.1, betas=(0.8, 0.9), eps=1e-06)
    reference = torch.optim.Adam([theirs], lr=0.1, betas=(0.8, 0.9), eps=1e-06)
    for step in range(1, 6):
        grad = rng.standard_normal((3, 4)).astype(np.float32)
        optimizer.zero_grad()
        ours.grad = grad.copy()
        with time_limit(10, 'Adam.step()'):
            optimizer.step()
        reference.zero_grad()
        theirs.grad = torch.from_numpy(grad.astype(np.float64))
        reference.step()
        assert_close(ours.data, theirs.detach().numpy(), atol=1e-05, what=f'the parameter after step {step} (torch.optim.Adam, same gradients)')

