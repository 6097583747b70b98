from otter.test_files import test_case

OK_FORMAT = False

name = "q3"
points = 8

@test_case(points=0, hidden=False, 
    success_message="ZeRO-2 matches AdamW at N=2 and drops the full gradients")
def test_zero2_public(Zero2):
    from course_runtime.distributed.data_parallel import check_public_case
    from course_runtime.testing import require
    require(Zero2=Zero2)
    check_public_case(Zero2, stage=2)

