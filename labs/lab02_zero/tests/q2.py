from otter.test_files import test_case

OK_FORMAT = False

name = "q2"
points = 10

@test_case(points=0, hidden=False, 
    success_message="ZeRO-1 matches AdamW at N=2, with 1/2 of the state per rank and 2Ψ sent")
def test_zero1_public(Zero1):
    from course_runtime.distributed.data_parallel import check_public_case
    from course_runtime.testing import require
    require(Zero1=Zero1)
    check_public_case(Zero1, stage=1)

