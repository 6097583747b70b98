from otter.test_files import test_case

OK_FORMAT = False

name = "q5"
points = 4

@test_case(points=1, hidden=False, 
    success_message="Adam matches torch.optim.Adam for 5 steps")
def test_adam_public(Tensor, Adam, env):
    from grader.checks.lab01_autograd import check_adam
    check_adam(Tensor, Adam, seed=0, steps=5, namespace=env)

