from otter.test_files import test_case

OK_FORMAT = False

name = "q4"
points = 8

@test_case(points=3, hidden=False, 
    success_message="your simulator agrees with the reference on uniform stages")
def test_simulate_public(simulate, bubble_fraction, peak_in_flight, env):
    from grader.checks.lab03_pipeline import check_simulate
    check_simulate(simulate, bubble_fraction, peak_in_flight, seed=None, namespace=env)

