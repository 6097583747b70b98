from otter.test_files import test_case

OK_FORMAT = False

name = "q7"
points = 6

@test_case(points=0, hidden=False, 
    success_message="your training step is correct and within 3x of PyTorch's")
def test_speed_public(Tensor, MLP, SGD, cross_entropy):
    from course_runtime.testing import require, time_limit
    from course_runtime.timing import measure_interleaved, pinned_threads
    from course_runtime.training import step_matches_torch, torch_step_timer, train_step_timer
    require(Tensor=Tensor, MLP=MLP, SGD=SGD, cross_entropy=cross_entropy)
    with time_limit(60, "one training step against PyTorch's"):
        step_matches_torch(Tensor, MLP, SGD, cross_entropy)
    with pinned_threads(1), time_limit(240, "timing your step against PyTorch's"):
        times = measure_interleaved({'yours': train_step_timer(Tensor, MLP, SGD, cross_entropy), 'torch': torch_step_timer()}, rounds=10)
    ratio = sorted(times['yours'])[5] / sorted(times['torch'])[5]
    print(f"your step: {ratio:.2f}x PyTorch's (one thread, median of 10 interleaved steps)")
    assert ratio <= 3.0, f"your step takes {ratio:.2f}x PyTorch's: profile it (q7, step 1)"

