from otter.test_files import test_case

OK_FORMAT = False

name = "q7"
points = 6

@test_case(points=3, hidden=False, 
    success_message="your training step is within 2.5x of the reference's")
def test_speed_public(Tensor, MLP, SGD, cross_entropy, env):
    from grader.checks.lab01_autograd import check_speed
    check_speed(Tensor, MLP, SGD, cross_entropy, bound=2.5, namespace=env)

