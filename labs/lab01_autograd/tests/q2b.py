from otter.test_files import test_case

OK_FORMAT = False

name = "q2b"
points = 3

@test_case(points=1, hidden=False, 
    success_message="the unary ops match PyTorch on the public shapes")
def test_unary_public(Tensor, env):
    from grader.checks.lab01_autograd import check_ops
    check_ops(Tensor, 'unary', seed=None, namespace=env)

