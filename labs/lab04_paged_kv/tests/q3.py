from otter.test_files import test_case

OK_FORMAT = False

name = "q3"
points = 10

@test_case(points=0, hidden=False, 
    success_message="paged attention equals dense attention on scattered, NaN-poisoned blocks")
def test_decode_public(paged_decode_attention):
    """Three sequences of 6, 12 and 1 keys in scattered blocks of 4 (padding past a sequence's
    blocks), every slot no sequence holds set to NaN; the oracle is PyTorch's attention over
    each sequence's keys, read densely through its table before the poisoning."""
    import math
    import torch
    from torch.nn import functional as F
    from course_runtime.testing import assert_close, require, time_limit
    require(paged_decode_attention=paged_decode_attention)
    g = torch.Generator().manual_seed(0)
    tables = torch.tensor([[7, 2, 9], [0, 5, 3], [8, 8, 8]])
    lens = torch.tensor([6, 12, 1])
    k_cache, v_cache = (torch.randn(2, 10, 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
    q = torch.randn(3, 2, 8, generator=g, dtype=torch.float64)
    dense = [[c[:, tables[b]].flatten(1, 2)[:, :lens[b]] for c in (k_cache, v_cache)] for b in range(3)]
    want = torch.stack([F.scaled_dot_product_attention(q[b][:, None], k, v)[:, 0] for b, (k, v) in enumerate(dense)])
    held = torch.zeros(10, 4, dtype=torch.bool)
    for b in range(3):
        for p in range(int(lens[b])):
            held[tables[b, p // 4], p % 4] = True
    k_cache[:, ~held] = math.nan
    v_cache[:, ~held] = math.nan
    with time_limit(30, 'your paged_decode_attention'):
        got = paged_decode_attention(q, k_cache, v_cache, tables, lens)
    assert_close(None if got is None else torch.as_tensor(got).detach().numpy(), want.numpy(), what='paged_decode_attention on 3 sequences of 6, 12 and 1 keys (unused slots NaN)', atol=1e-09, rtol=1e-09)

