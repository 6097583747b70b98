from otter.test_files import test_case

OK_FORMAT = False

name = "q6"
points = 8

@test_case(points=0, hidden=False, 
    success_message="your ZeRO-1 step is within 2.25x of PyTorch's")
def test_speed_public(Zero1):
    import numpy as np
    from course_runtime.distributed.data_parallel import time_against_pytorch
    from course_runtime.testing import require
    require(Zero1=Zero1)
    timed = time_against_pytorch({1: Zero1}, world_size=2, rounds=10)[1]
    assert timed['difference'] < 0.0001, f"after the timed steps your Zero1's parameters differ from ZeroRedundancyOptimizer's by up to {timed['difference']:.3g}: a fast step only counts when it is right"
    ratio = np.median(timed['yours']) / np.median(timed['pytorch'])
    print(f"ZeRO-1 step: yours {np.median(timed['yours']) * 1000.0:.2f} ms, {timed['peer']} {np.median(timed['pytorch']) * 1000.0:.2f} ms, ratio {ratio:.2f}")
    assert ratio <= 2.25, f"your ZeRO-1 step takes {ratio:.2f}x the time of {timed['peer']} (median of 10 interleaved steps); the bound is 2.25x"

