from otter.test_files import test_case

OK_FORMAT = False

name = "q2b"
points = 3

@test_case(points=0, hidden=False, 
    success_message="the unary ops match PyTorch on the public shapes")
def test_unary_public(Tensor):
    from course_runtime.opcheck import check_op
    cases = [('exp', lambda x: x.exp(), None, [(3, 4)]), ('log', lambda x: x.log(), None, [(3, 4)], ['positive']), ('relu', lambda x: x.relu(), None, [(3, 4)]), ('tanh', lambda x: x.tanh(), None, [(3, 4)], ['wide']), ('sigmoid of large inputs', lambda x: x.sigmoid(), None, [(3, 4)], ['wide'])]
    for what, ours, theirs, shapes, *domains in cases:
        check_op(Tensor, what, ours, theirs or ours, shapes, *domains)

