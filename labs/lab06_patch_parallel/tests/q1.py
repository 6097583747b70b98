from otter.test_files import test_case

OK_FORMAT = False

name = "q1"
points = 6

@test_case(points=0, hidden=False, 
    success_message="your bands split and merge the public images")
def test_split_merge_public(split_band, merge_bands):
    import torch
    from course_runtime.testing import assert_close, expected, require, time_limit
    require(split_band=split_band, merge_bands=merge_bands)
    for case in expected('q1_split'):
        images, patch, N = (torch.tensor(case['images']), case['patch'], case['world_size'])
        for r, want in enumerate(case['bands']):
            with time_limit(10, 'split_band'):
                got = split_band(images.clone(), r, N, patch)
            assert_close(None if got is None else torch.as_tensor(got).numpy(), torch.tensor(want).numpy(), atol=0, what=f'split_band(images {tuple(images.shape)}, rank {r}, world_size {N}, patch {patch})')
        with time_limit(10, 'merge_bands'):
            got = merge_bands([torch.tensor(b) for b in case['bands']])
        assert_close(None if got is None else torch.as_tensor(got).numpy(), images.numpy(), atol=0, what=f'merge_bands of {N} bands')

