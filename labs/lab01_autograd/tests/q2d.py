from otter.test_files import test_case

OK_FORMAT = False

name = "q2d"
points = 4

@test_case(points=1, hidden=False, 
    success_message="matmul matches PyTorch on the public shapes")
def test_matmul_public(Tensor, env):
    from grader.checks.lab01_autograd import check_ops
    check_ops(Tensor, 'matmul', seed=None, namespace=env)

