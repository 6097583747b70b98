from otter.test_files import test_case

OK_FORMAT = False

name = "q2"
points = 10

@test_case(points=0, hidden=False, 
    success_message="your 1F1B schedules are well formed and compute in 1F1B's order")
def test_one_f_one_b_public(one_f_one_b_schedule):
    from course_runtime.pipeline import COMPUTE, Action, structure_problems
    from course_runtime.testing import expected, require, time_limit
    require(one_f_one_b_schedule=one_f_one_b_schedule)
    for case in expected('q2_one_f_one_b'):
        p, m = (case['num_stages'], case['num_microbatches'])
        with time_limit(10, f'one_f_one_b_schedule({p}, {m})'):
            got = one_f_one_b_schedule(p, m)
        problems = structure_problems(got, m)
        assert not problems, f'one_f_one_b_schedule({p}, {m}) is not well formed:\n  ' + '\n  '.join(problems[:6])
        assert len(got) == p, f'one_f_one_b_schedule({p}, {m}) returned {len(got)} stages, not {p}'
        for s, (actions, want) in enumerate(zip(got, case['compute'])):
            mine = [str(Action(*a)) for a in actions if a[0] in COMPUTE]
            theirs = [str(Action(*a)) for a in want]
            assert mine == theirs, f'one_f_one_b_schedule({p}, {m}), stage {s}: forwards and backwards run in the order {mine}, expected {theirs} (min(p - 1 - s, m) forwards of warm-up, then one forward and one backward, then the backwards still owed)'

