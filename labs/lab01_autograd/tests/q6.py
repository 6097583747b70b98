from otter.test_files import test_case

OK_FORMAT = False

name = "q6"
points = 4

@test_case(points=0, hidden=False, 
    success_message="your model reaches 95 % on the held-out digits")
def test_digits_public(Tensor, model):
    import numpy as np
    from course_runtime.data import load_digits_split
    from course_runtime.testing import require, time_limit
    require(Tensor=Tensor, model=model)
    _, X_test, _, y_test = load_digits_split()
    with time_limit(60, 'your model on the 450 test digits'):
        predictions = np.asarray(model(Tensor(X_test)).data).argmax(axis=1)
    accuracy = float((predictions == y_test).mean())
    assert accuracy >= 0.95, f'test accuracy {accuracy:.3f} is below 0.95: train longer or tune'

