from otter.test_files import test_case

OK_FORMAT = False

name = "q4"
points = 4

@test_case(points=0, hidden=False, 
    success_message="log_softmax and cross_entropy match PyTorch, also on logits in the thousands")
def test_softmax_public(Tensor, log_softmax, cross_entropy):
    import numpy as np
    import torch
    from course_runtime.opcheck import check_op
    from course_runtime.testing import require
    require(log_softmax=log_softmax, cross_entropy=cross_entropy)
    targets = np.array([0, 3, 1, 4, 2, 0])
    for domain in ('normal', 'huge'):
        check_op(Tensor, f'log_softmax of {domain} logits', lambda x: log_softmax(x, axis=-1), lambda x: torch.log_softmax(x, dim=-1), [(6, 5)], [domain])
        check_op(Tensor, f'cross_entropy of {domain} logits', lambda x: cross_entropy(x, targets), lambda x: torch.nn.functional.cross_entropy(x, torch.from_numpy(targets)), [(6, 5)], [domain])

