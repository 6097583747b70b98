from otter.test_files import test_case

OK_FORMAT = False

name = "q1"
points = 8

@test_case(points=0, hidden=False, 
    success_message="your allocator follows the rules on a short program")
def test_allocator_public(BlockAllocator):
    """A short program on 3 blocks; each check is one rule of the handout."""
    from course_runtime.serving import OutOfBlocks
    from course_runtime.testing import require, time_limit
    require(BlockAllocator=BlockAllocator)
    with time_limit(10, 'your BlockAllocator'):
        allocator = BlockAllocator(3, 4)
        assert allocator.num_free == 3, f'a new allocator of 3 blocks has num_free {allocator.num_free}, expected 3'
        a, b = (allocator.allocate(), allocator.allocate())
        assert a in range(3) and b in range(3) and (a != b), f'two allocate() calls gave {a!r} and {b!r}: expected two different block ids in 0..2'
        assert allocator.num_free == 1 and allocator.ref_count(a) == 1, f'after two allocate(): num_free {allocator.num_free} (expected 1), ref_count({a}) {allocator.ref_count(a)} (expected 1)'
        allocator.share(a)
        assert allocator.ref_count(a) == 2 and allocator.num_free == 1, f'after share({a}): ref_count({a}) {allocator.ref_count(a)} (expected 2), num_free {allocator.num_free} (expected 1: sharing takes no block)'
        c = allocator.allocate()
        try:
            allocator.allocate()
        except OutOfBlocks:
            pass
        else:
            raise AssertionError('with all 3 blocks taken, allocate() must raise OutOfBlocks')
        allocator.free(a)
        assert allocator.ref_count(a) == 1 and allocator.num_free == 0, f'after free({a}) of a block shared by two: ref_count {allocator.ref_count(a)} (expected 1), num_free {allocator.num_free} (expected 0: one user is left)'
        allocator.free(a)
        allocator.free(c)
        assert allocator.ref_count(a) == 0 and allocator.num_free == 2, f'after freeing every reference to {a} and {c}: ref_count({a}) {allocator.ref_count(a)} (expected 0), num_free {allocator.num_free} (expected 2)'
        again = allocator.allocate()
        assert again in (a, c), f'only blocks {a} and {c} are free, but allocate() gave {again!r}'

