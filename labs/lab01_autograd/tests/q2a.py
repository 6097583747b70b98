from otter.test_files import test_case

OK_FORMAT = False

name = "q2a"
points = 6

@test_case(points=0, hidden=False, 
    success_message="the elementwise ops match PyTorch on the public shapes")
def test_elementwise_public(Tensor):
    from course_runtime.opcheck import check_op
    cases = [('sub (3, 1, 4) and (5, 1)', lambda x, y: x - y, None, [(3, 1, 4), (5, 1)]), ('mul (2, 3) and (3,)', lambda x, y: x * y, None, [(2, 3), (3,)]), ('div (4, 1) by (1, 4)', lambda x, y: x / y, None, [(4, 1), (1, 4)], ['normal', 'nonzero']), ('x * x', lambda x: x * x, None, [(3,)]), ('2.0 - x', lambda x: 2.0 - x, None, [(2, 2)]), ('neg', lambda x: -x, None, [(3, 2)]), ('x ** 3', lambda x: x ** 3, None, [(5,)]), ('x ** 0.5', lambda x: x ** 0.5, None, [(5,)], ['positive'])]
    for what, ours, theirs, shapes, *domains in cases:
        check_op(Tensor, what, ours, theirs or ours, shapes, *domains)

