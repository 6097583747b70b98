from otter.test_files import test_case

OK_FORMAT = False

name = "q2e"
points = 3

@test_case(points=0, hidden=False, 
    success_message="reshape, transpose and getitem match PyTorch on the public shapes")
def test_shape_public(Tensor):
    from course_runtime.opcheck import check_op
    cases = [('reshape (3, 4) -> (4, 3)', lambda x: x.reshape(4, 3), None, [(3, 4)]), ('transpose (3, 4, 2)', lambda x: x.transpose(2, 0, 1), lambda x: x.permute(2, 0, 1), [(3, 4, 2)]), ('.T', lambda x: x.T, None, [(3, 4)]), ('slice [1:, ::2]', lambda x: x[1:, ::2], None, [(3, 4)]), ('repeated rows [[0, 1, 0]]', lambda x: x[[0, 1, 0]], None, [(3, 4)])]
    for what, ours, theirs, shapes, *domains in cases:
        check_op(Tensor, what, ours, theirs or ours, shapes, *domains)

