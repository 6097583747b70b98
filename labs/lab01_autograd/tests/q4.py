from otter.test_files import test_case

OK_FORMAT = False

name = "q4"
points = 4

@test_case(points=1, hidden=False, 
    success_message="log_softmax and cross_entropy match PyTorch on ordinary logits")
def test_softmax_public(Tensor, log_softmax, cross_entropy, env):
    from grader.checks.lab01_autograd import check_softmax_ops
    check_softmax_ops(Tensor, log_softmax, cross_entropy, seed=0, scale=1.0, namespace=env)

