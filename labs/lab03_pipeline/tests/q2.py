from otter.test_files import test_case

OK_FORMAT = False

name = "q2"
points = 10

@test_case(points=3, hidden=False, 
    success_message="your 1F1B schedules are valid, hold at most p activations, and do not stall")
def test_one_f_one_b_public(one_f_one_b_schedule, env):
    from grader.checks.lab03_pipeline import check_schedule
    check_schedule(one_f_one_b_schedule, '1f1b', [(2, 1), (2, 4), (4, 8)], namespace=env)

