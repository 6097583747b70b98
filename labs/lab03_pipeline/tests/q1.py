from otter.test_files import test_case

OK_FORMAT = False

name = "q1"
points = 6

@test_case(points=0, hidden=False, 
    success_message="your GPipe schedules are the public cases', action for action")
def test_gpipe_public(gpipe_schedule):
    from course_runtime.pipeline import Action, structure_problems
    from course_runtime.testing import expected, require, time_limit
    require(gpipe_schedule=gpipe_schedule)
    for case in expected('q1_gpipe'):
        p, m = (case['num_stages'], case['num_microbatches'])
        with time_limit(10, f'gpipe_schedule({p}, {m})'):
            got = gpipe_schedule(p, m)
        problems = structure_problems(got, m)
        assert not problems, f'gpipe_schedule({p}, {m}) is not well formed:\n  ' + '\n  '.join(problems[:6])
        assert len(got) == p, f'gpipe_schedule({p}, {m}) returned {len(got)} stages, not {p}'
        for s, (actions, want) in enumerate(zip(got, case['schedule'])):
            mine, theirs = ([str(Action(*a)) for a in actions], [str(Action(*a)) for a in want])
            k = next((k for k, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(theirs))
            assert mine == theirs, f'gpipe_schedule({p}, {m}), stage {s}, from position {k} on: expected {theirs[k:k + 4]}, got {mine[k:k + 4]}'

