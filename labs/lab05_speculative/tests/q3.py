from otter.test_files import test_case

OK_FORMAT = False

name = "q3"
points = 16

@test_case(points=0, hidden=False, 
    success_message="greedy speculative decoding reproduces the target's greedy output")
def test_greedy_public(speculative_generate):
    from course_runtime.models import generate, load, load_tokenizer
    from course_runtime.testing import require, time_limit
    require(speculative_generate=speculative_generate)
    target, draft, tokenizer = (load('target'), load('draft'), load_tokenizer())
    prompt = tokenizer.encode('Call me Ishmael. ')
    want = generate(target, prompt, 60)[0].tolist()
    with time_limit(60, 'speculative_generate'):
        result = speculative_generate(target, draft, prompt, 60, gamma=4)
    assert isinstance(result, tuple) and len(result) == 2, f'speculative_generate should return (tokens, stats), got {type(result).__name__}'
    got = [int(t) for t in result[0]]
    first = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), 60))
    assert got == want, f"gamma=4: greedy speculative decoding must return the target's greedy output, token for token; yours differs from new token {first} on (expected {tokenizer.decode(want)!r}, got {tokenizer.decode(got)!r}, {len(got)} tokens for 60)"

