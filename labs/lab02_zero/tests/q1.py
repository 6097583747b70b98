from otter.test_files import test_case

OK_FORMAT = False

name = "q1"
points = 6

@test_case(points=2, hidden=False, 
    success_message="the public partitions are right")
def test_partition_public(padded_size, shard_range, flatten_padded, unflatten, env):
    from grader.checks.lab02_zero import check_partition
    check_partition(padded_size, shard_range, flatten_padded, unflatten, seed=0, cases=5, namespace=env)

