from otter.test_files import test_case

OK_FORMAT = False

name = "q4"
points = 12

@test_case(points=4, hidden=False, 
    success_message="ZeRO-3 matches AdamW at N=2, sends 3Ψ and frees what it gathers")
def test_zero3_public(Zero3, env):
    from grader.checks.lab02_zero import check_zero
    check_zero(Zero3, stage=3, world_size=2, seed=0, namespace=env)

