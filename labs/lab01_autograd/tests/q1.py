from otter.test_files import test_case

OK_FORMAT = False

name = "q1"
points = 4

@test_case(points=1, hidden=False, 
    success_message="broadcast_shape agrees with NumPy on the public cases")
def test_broadcast_shape_public(broadcast_shape):
    from grader.checks.lab01_autograd import check_broadcast_shape
    check_broadcast_shape(broadcast_shape, seed=0, cases=10)

@test_case(points=1, hidden=False, 
    success_message="unbroadcast agrees with torch.sum_to_size on the public cases")
def test_unbroadcast_public(unbroadcast):
    from grader.checks.lab01_autograd import check_unbroadcast
    check_unbroadcast(unbroadcast, seed=0, cases=10)

