from otter.test_files import test_case

OK_FORMAT = False

name = "q2e"
points = 3

@test_case(points=1, hidden=False, 
    success_message="reshape, transpose and getitem match PyTorch on the public shapes")
def test_shape_public(Tensor, env):
    from grader.checks.lab01_autograd import check_ops
    check_ops(Tensor, 'shape', seed=None, namespace=env)

