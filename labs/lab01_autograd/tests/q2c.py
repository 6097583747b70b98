from otter.test_files import test_case

OK_FORMAT = False

name = "q2c"
points = 4

@test_case(points=1, hidden=False, 
    success_message="sum_, mean and max_ match PyTorch on the public shapes")
def test_reductions_public(Tensor, env):
    from grader.checks.lab01_autograd import check_ops
    check_ops(Tensor, 'reductions', seed=None, namespace=env)

