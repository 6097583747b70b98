from otter.test_files import test_case

OK_FORMAT = False

name = "q4"
points = 6

@test_case(points=2, hidden=False, 
    success_message="the paged cache generates what the model generates without a cache")
def test_generate_public(generate_paged, env):
    from grader.checks.lab04_paged_kv import check_generate
    check_generate(generate_paged, seed=0, count=3, max_new=10, namespace=env)

