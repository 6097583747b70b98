from otter.test_files import test_case

OK_FORMAT = False

name = "q3"
points = 8

@test_case(points=3, hidden=False, 
    success_message="ZeRO-2 matches AdamW at N=2 and drops the full gradients")
def test_zero2_public(Zero2, env):
    from grader.checks.lab02_zero import check_zero
    check_zero(Zero2, stage=2, world_size=2, seed=0, namespace=env)

