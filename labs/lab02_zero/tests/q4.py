from otter.test_files import test_case

OK_FORMAT = False

name = "q4"
points = 12

@test_case(points=0, hidden=False, 
    success_message="ZeRO-3 matches AdamW at N=2, sends 3Ψ and frees what it gathers")
def test_zero3_public(Zero3):
    from course_runtime.distributed.data_parallel import check_public_case
    from course_runtime.testing import require
    require(Zero3=Zero3)
    check_public_case(Zero3, stage=3)

