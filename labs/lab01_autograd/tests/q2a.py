from otter.test_files import test_case

OK_FORMAT = False

name = "q2a"
points = 6

@test_case(points=2, hidden=False, 
    success_message="the elementwise ops match PyTorch on the public shapes")
def test_elementwise_public(Tensor, env):
    from grader.checks.lab01_autograd import check_ops
    check_ops(Tensor, 'elementwise', seed=None, namespace=env)

