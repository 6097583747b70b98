from otter.test_files import test_case

OK_FORMAT = False

name = "q1"
points = 6

@test_case(points=0, hidden=False, 
    success_message="the public partitions are right")
def test_partition_public(padded_size, shard_range, flatten_padded, unflatten):
    import torch
    from course_runtime.testing import assert_close, expected, require, time_limit
    require(padded_size=padded_size, shard_range=shard_range, flatten_padded=flatten_padded, unflatten=unflatten)
    cases = expected('q1_partition')
    for case in cases['pairs']:
        numel, n = (case['numel'], case['world_size'])
        with time_limit(5, f'padded_size({numel}, {n})'):
            got = padded_size(numel, n)
        assert got == case['padded'], f"padded_size({numel}, {n}) returned {got}, expected {case['padded']}: the smallest multiple of the world size that holds them"
        for rank, want in enumerate(case['ranges']):
            with time_limit(5, f'shard_range({numel}, {n}, {rank})'):
                got = tuple(shard_range(numel, n, rank))
            assert got == tuple(want), f'shard_range({numel}, {n}, {rank}) returned {got}, expected {tuple(want)}'
    for case in cases['trials']:
        shapes, n = ([tuple(s) for s in case['shapes']], case['world_size'])
        tensors = [torch.tensor(t).reshape(s) for t, s in zip(case['tensors'], shapes)]
        want = torch.zeros(case['padded_size'])
        values = torch.cat([t.reshape(-1) for t in tensors])
        want[:values.numel()] = values
        with time_limit(5, 'flatten_padded'):
            flat = flatten_padded(tensors, n)
        assert_close(flat, want.numpy(), atol=0.0, what=f'flatten_padded of shapes {shapes} for world size {n}')
        with time_limit(5, 'unflatten'):
            views = list(unflatten(flat, shapes))
        assert len(views) == len(shapes), f'unflatten returned {len(views)} tensors for {len(shapes)} shapes'
        for shape, t, view in zip(shapes, tensors, views):
            assert_close(view, t.numpy(), atol=0.0, what=f'unflatten: tensor of shape {shape}')
            assert not view.numel() or view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr(), f'unflatten returned a copy for shape {shape}: return views of the flat buffer (slice and .view), so that writing into the buffer updates the parameters'

