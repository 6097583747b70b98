from otter.test_files import test_case

OK_FORMAT = False

name = "q2d"
points = 4

@test_case(points=0, hidden=False, 
    success_message="matmul matches PyTorch on the public shapes")
def test_matmul_public(Tensor):
    from course_runtime.opcheck import check_op
    cases = [('(4, 3) @ (3, 5)', lambda x, y: x @ y, None, [(4, 3), (3, 5)]), ('batched (2, 4, 3) @ (2, 3, 5)', lambda x, y: x @ y, None, [(2, 4, 3), (2, 3, 5)]), ('broadcast (2, 4, 3) @ (3, 5)', lambda x, y: x @ y, None, [(2, 4, 3), (3, 5)])]
    for what, ours, theirs, shapes, *domains in cases:
        check_op(Tensor, what, ours, theirs or ours, shapes, *domains)

