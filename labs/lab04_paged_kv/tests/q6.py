from otter.test_files import test_case

OK_FORMAT = False

name = "q6"
points = 8

@test_case(points=0, hidden=False, 
    success_message="continuous batching takes at least 2x fewer model calls than static batching")
def test_steps_public(serve, LabPagedCache):
    """32 requests in the KV memory of 6 of the longest: your serve on your LabPagedCache
    against static padded batching, counted in model calls."""
    from course_runtime.models import load
    from course_runtime.serving import blocks_for, request_stream, serve_static, static_batch_size
    from course_runtime.testing import require, time_limit
    require(serve=serve, LabPagedCache=LabPagedCache)
    model = load('draft').double()
    stream = request_stream(32, model.config.vocab_size, seed=0, prompt_len=(2, 16), output_len=(2, 96))
    longest = max((r.max_len for r in stream))
    slots = 6 * blocks_for(longest, 4) * 4
    with time_limit(300, 'your serve'):
        result = serve(model, stream, LabPagedCache(model, slots // 4, 4), 64)
    assert isinstance(result, tuple) and len(result) == 2, f'serve returned {result!r}: expected (outputs, steps)'
    outputs, steps = result
    static = serve_static(model, stream, batch_size=static_batch_size(slots, longest), max_len=longest)
    assert outputs == static.outputs, 'your serve and static batching generated different tokens'
    print(f'static batching {static.steps} model calls, yours {steps}')
    assert static.steps >= 2 * steps, f'static batching took {static.steps} model calls and yours {steps}: only {static.steps / steps:.2f}x fewer, expected at least 2x'

