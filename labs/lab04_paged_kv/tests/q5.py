from otter.test_files import test_case

OK_FORMAT = False

name = "q5"
points = 8

@test_case(points=0, hidden=False, 
    success_message="every request gets its tokens, and every block comes back")
def test_serve_public(serve, LabPagedCache):
    """Six requests on your LabPagedCache of 12 blocks of 4, at most 6 running at once."""
    from course_runtime.models import generate, load
    from course_runtime.serving import OutOfBlocks, request_stream
    from course_runtime.testing import require, time_limit
    require(serve=serve, LabPagedCache=LabPagedCache)
    model = load('draft').double()
    requests = request_stream(6, model.config.vocab_size, seed=0, prompt_len=(1, 20), output_len=(1, 24))
    cache = LabPagedCache(model, num_blocks=12, block_size=4)
    with time_limit(120, 'your serve'):
        try:
            result = serve(model, requests, cache, 6)
        except OutOfBlocks as error:
            raise AssertionError(f"serve ran out of blocks ({error}): admit a request only when the blocks of its whole length are free, and free each request's sequence when it finishes") from None
    assert isinstance(result, tuple) and len(result) == 2, f'serve returned {result!r}: expected (outputs, steps)'
    outputs, steps = result
    for r in requests:
        want = generate(model, list(r.prompt), r.max_new_tokens, cache=None)[0].tolist()
        got = outputs.get(r.id)
        assert got is not None and [int(t) for t in got] == want, f'request {r.id} ({len(r.prompt)}-token prompt, {r.max_new_tokens} new): got {got}, expected {want} (this runs on LabPagedCache, so on your q1-q3 too)'
    assert cache.allocator.num_free == 12 and (not cache.tables), f"after serve, {12 - cache.allocator.num_free} blocks and {len(cache.tables)} sequences are left: free each request's sequence when it finishes"

