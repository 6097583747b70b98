from otter.test_files import test_case

OK_FORMAT = False

name = "q1"
points = 8

@test_case(points=0, hidden=False, 
    success_message="greedy_verify emits what the reference emits on the public cases")
def test_greedy_verify_public(greedy_verify):
    import torch
    from course_runtime.testing import expected, require, time_limit
    require(greedy_verify=greedy_verify)
    for case in expected('q1_greedy_verify'):
        logits, proposals = (torch.tensor(case['logits']), case['proposals'])
        with time_limit(10, 'greedy_verify'):
            got = greedy_verify(logits, list(proposals))
        got = got.tolist() if isinstance(got, torch.Tensor) else got
        assert got is not None and [int(t) for t in got] == case['emitted'], f"greedy_verify with proposals {proposals} and target argmax per row {logits.argmax(-1).tolist()}: expected {case['emitted']} (the agreeing proposals, then the target's token at the next position), got {got}"

