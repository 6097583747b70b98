from otter.test_files import test_case

OK_FORMAT = False

name = "q3"
points = 8

@test_case(points=0, hidden=False, 
    success_message="the diamond-shaped graph is ordered and differentiated correctly")
def test_engine_public(Tensor, make_node, topological_order, backward):
    import numpy as np
    from course_runtime.testing import assert_close, require, time_limit
    require(Tensor=Tensor, make_node=make_node, topological_order=topological_order, backward=backward)

    def scale(x, c):
        return make_node(x.data * c, (x,), lambda g: (g * c,), 'scale')

    def times(x, y):
        return make_node(x.data * y.data, (x, y), lambda g: (g * y.data, g * x.data), 'times')

    def total(x):
        return make_node(np.asarray(x.data.sum(), dtype=x.data.dtype), (x,), lambda g: (np.broadcast_to(g, x.shape),), 'total')
    a = Tensor(np.array([1.0, 2.0, 3.0], dtype=np.float32), requires_grad=True)
    b = scale(a, 2.0)
    c = times(a, b)
    root = total(c)
    with time_limit(10, 'topological_order(root)'):
        order = topological_order(root)
    ids = [id(t) for t in order or []]
    assert sorted(ids) == sorted({id(a), id(b), id(c), id(root)}), f'topological_order should list a, b, c and root once each, got {len(ids)} tensors'
    position = {i: k for k, i in enumerate(ids)}
    assert position[id(a)] < position[id(b)] < position[id(c)] < position[id(root)], 'every tensor must come after the tensors it was computed from, root last'
    with time_limit(10, 'backward(root)'):
        backward(root)
    assert_close(a.grad, 4 * a.data, what='a.grad for root = sum(2a^2)', atol=1e-05)
    backward(root)
    assert_close(a.grad, 8 * a.data, what='a.grad after a second backward (leaves accumulate)', atol=1e-05)
    try:
        backward(c)
    except RuntimeError:
        pass
    else:
        raise AssertionError('backward(c) on a non-scalar output without grad should raise RuntimeError')

