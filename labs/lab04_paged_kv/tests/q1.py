from otter.test_files import test_case

OK_FORMAT = False

name = "q1"
points = 8

@test_case(points=3, hidden=False, 
    success_message="your allocator agrees with the reference on a random program")
def test_allocator_public(BlockAllocator, env):
    from grader.checks.lab04_paged_kv import check_allocator
    check_allocator(BlockAllocator, seed=0, steps=40, namespace=env)

