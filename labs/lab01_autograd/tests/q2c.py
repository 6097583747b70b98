from otter.test_files import test_case

OK_FORMAT = False

name = "q2c"
points = 4

@test_case(points=0, hidden=False, 
    success_message="sum_, mean and max_ match PyTorch on the public shapes")
def test_reductions_public(Tensor):
    from course_runtime.opcheck import check_op
    cases = [('sum', lambda x: x.sum(), None, [(2, 3, 4)]), ('sum axis=1 keepdims', lambda x: x.sum(axis=1, keepdims=True), lambda x: x.sum(dim=1, keepdim=True), [(2, 3, 4)]), ('sum axis=(0, 2)', lambda x: x.sum(axis=(0, 2)), lambda x: x.sum(dim=(0, 2)), [(2, 3, 4)]), ('mean axis=-1', lambda x: x.mean(axis=-1), lambda x: x.mean(dim=-1), [(2, 3, 4)]), ('mean axis=(0, 1)', lambda x: x.mean(axis=(0, 1)), lambda x: x.mean(dim=(0, 1)), [(2, 3, 4)]), ('max axis=1', lambda x: x.max(axis=1), lambda x: x.amax(dim=1), [(2, 3, 4)]), ('max with ties', lambda x: x.max(axis=-1, keepdims=True), lambda x: x.amax(dim=-1, keepdim=True), [(4, 6)], ['ties'])]
    for what, ours, theirs, shapes, *domains in cases:
        check_op(Tensor, what, ours, theirs or ours, shapes, *domains)

