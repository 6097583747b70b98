from otter.test_files import test_case

OK_FORMAT = False

name = "q2"
points = 10

@test_case(points=4, hidden=False, 
    success_message="ZeRO-1 matches AdamW at N=2, with 1/2 of the state per rank and 2Ψ sent")
def test_zero1_public(Zero1, env):
    from grader.checks.lab02_zero import check_zero
    check_zero(Zero1, stage=1, world_size=2, seed=0, namespace=env)

