from otter.test_files import test_case

OK_FORMAT = False

name = "q2"
points = 12

@test_case(points=0, hidden=False, 
    success_message="residual_distribution returns what the reference returns on the public cases")
def test_residual_public(residual_distribution):
    import torch
    from course_runtime.testing import assert_close, expected, require, time_limit
    require(residual_distribution=residual_distribution)
    for case in expected('q2_residual'):
        p, q = (torch.tensor(case['p']), torch.tensor(case['q']))
        with time_limit(10, 'residual_distribution'):
            got = residual_distribution(p.clone(), q.clone())
        assert_close(None if got is None else torch.as_tensor(got).numpy(), case['residual'], what=f'residual_distribution(p={p.numpy().round(4)}, q={q.numpy().round(4)})', atol=1e-06)

@test_case(points=0, hidden=False, 
    success_message="rejection_step emits tokens distributed as p on the public cases")
def test_rejection_step_public(rejection_step):
    """The spec: whatever q is, the emitted tokens are distributed as p. 4,000 seeded draws put
    a correct rule within 0.002 of p here, every time (the seed is fixed); redrawing from q,
    swapping p and q or not normalising the residual lands 0.2 or more away."""
    import torch
    from course_runtime.testing import assert_close, require, time_limit
    require(rejection_step=rejection_step)
    n = 4000
    for p, q in [([0.1, 0.6, 0.3], [0.5, 0.2, 0.3]), ([0.5, 0.5, 0.0, 0.0], [0.0, 0.1, 0.4, 0.5])]:
        p, q = (torch.tensor(p), torch.tensor(q))
        g = torch.Generator().manual_seed(0)
        drafts = torch.multinomial(q, n, replacement=True, generator=g).tolist()
        uniforms = torch.rand(n, 2, generator=g).tolist()
        counts = torch.zeros(len(p))
        with time_limit(60, f'{n} calls of rejection_step'):
            for x, (u, v) in zip(drafts, uniforms):
                out = rejection_step(p.clone(), q.clone(), x, u, v)
                assert isinstance(out, tuple) and len(out) == 2, f'rejection_step should return (token, accepted), got {out!r}'
                counts[int(out[0])] += 1
        assert_close((counts / n).numpy(), p.numpy(), atol=0.03, what=f'frequencies of the tokens rejection_step emits for p={p.tolist()}, draft tokens drawn from q={q.tolist()} (they should follow p)')

