from otter.test_files import test_case

OK_FORMAT = False

name = "q1"
points = 4

@test_case(points=0, hidden=False, 
    success_message="broadcast_shape agrees with NumPy on the public cases")
def test_broadcast_shape_public(broadcast_shape):
    import numpy as np
    from course_runtime.testing import require, time_limit
    require(broadcast_shape=broadcast_shape)
    for a, b in [((3, 1, 4), (5, 1)), ((2, 3), (3,)), ((), (2,)), ((4, 1), (1, 4)), ((1,), ())]:
        with time_limit(10, f"broadcast_shape('add', {a}, {b})"):
            got = broadcast_shape('add', a, b)
        want = np.broadcast_shapes(a, b)
        assert got is not None and tuple(got) == want, f"broadcast_shape('add', {a}, {b}): expected {want}, got {got}"
    try:
        broadcast_shape('mul', (2, 3), (4,))
    except ValueError as error:
        assert 'mul' in str(error) and '(2, 3)' in str(error) and ('(4,)' in str(error)), f'the ValueError should name the op and both shapes, got {str(error)!r}'
    else:
        raise AssertionError("broadcast_shape('mul', (2, 3), (4,)) should raise ValueError")

@test_case(points=0, hidden=False, 
    success_message="unbroadcast agrees with torch.sum_to_size on the public cases")
def test_unbroadcast_public(unbroadcast):
    import numpy as np
    import torch
    from course_runtime.testing import assert_close, require, time_limit
    require(unbroadcast=unbroadcast)
    rng = np.random.default_rng(0)
    cases = [((5, 3, 4), (3, 1)), ((2, 3), (2, 3)), ((4, 2), ()), ((2, 1, 3), (1, 3))]
    for out_shape, shape in cases:
        grad = rng.standard_normal(out_shape).astype(np.float32)
        want = torch.from_numpy(grad.astype(np.float64)).sum_to_size(shape).numpy()
        with time_limit(10, f'unbroadcast(grad of shape {out_shape}, {shape})'):
            got = unbroadcast(grad, shape)
        assert_close(got, want, what=f'unbroadcast(grad of shape {out_shape}, {shape})', atol=0.0001)

