from otter.test_files import test_case

OK_FORMAT = False

name = "q4"
points = 6

@test_case(points=0, hidden=False, 
    success_message="your paged cache generates what the model generates without a cache")
def test_generate_public(generate_paged, LabPagedCache):
    """Three prompts through your LabPagedCache against greedy decoding without any cache."""
    from course_runtime.models import generate, load, load_tokenizer
    from course_runtime.testing import require, time_limit
    require(generate_paged=generate_paged, LabPagedCache=LabPagedCache)
    model, tokenizer = (load('draft').double(), load_tokenizer())
    prompts = [tokenizer.encode(t) for t in ('Call me Ishmael.', 'The whale', 'It was')]
    cache = LabPagedCache(model, num_blocks=24, block_size=4)
    with time_limit(60, 'your generate_paged'):
        got = generate_paged(model, prompts, 10, cache)
    assert got is not None and len(got) == 3, f'generate_paged returned {got!r}: expected 3 lists of 10 tokens'
    for prompt, tokens in zip(prompts, got):
        want = generate(model, prompt, 10, cache=None)[0].tolist()
        assert [int(t) for t in tokens] == want, f'prompt {tokenizer.decode(prompt)!r}: generated {list(tokens)}, greedy decoding without a cache gives {want} (this runs on LabPagedCache, so on your q1-q3: make their tests pass first)'
    assert cache.allocator.num_free == 24, f'after generate_paged, {24 - cache.allocator.num_free} of 24 blocks are still taken: free every sequence when it is done'

