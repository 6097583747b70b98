from otter.test_files import test_case

OK_FORMAT = False

name = "q2"
points = 10

@test_case(points=3, hidden=False, 
    success_message="slots, forks and releases agree with the tables")
def test_tables_public(append_slots, fork, release, env):
    from grader.checks.lab04_paged_kv import check_block_tables
    check_block_tables(append_slots, fork, release, seed=0, steps=30, namespace=env)

@test_case(points=2, hidden=False, 
    success_message="a forked sequence copies its shared block before writing")
def test_copy_on_write_public(append_slots, fork, env):
    from grader.checks.lab04_paged_kv import check_copy_on_write
    check_copy_on_write(append_slots, fork, namespace=env)

