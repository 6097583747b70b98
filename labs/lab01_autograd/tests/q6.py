from otter.test_files import test_case

OK_FORMAT = False

name = "q6"
points = 4

@test_case(points=4, hidden=False, 
    success_message="your model reaches 95 % on the held-out digits")
def test_digits(Tensor, model, env):
    from grader.checks.lab01_autograd import check_digits_model
    check_digits_model(Tensor, model, threshold=0.95, namespace=env)

