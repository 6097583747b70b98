from otter.test_files import test_case

OK_FORMAT = False

name = "q3"
points = 8

@test_case(points=2, hidden=False, 
    success_message="the diamond-shaped graph is ordered and differentiated correctly")
def test_engine_public(Tensor, make_node, topological_order, backward, env):
    from grader.checks.lab01_autograd import check_engine_basics
    check_engine_basics(Tensor, make_node, topological_order, backward, namespace=env)

