from otter.test_files import test_case

OK_FORMAT = False

name = "q3"
points = 8

@test_case(points=0, hidden=False, 
    success_message="find_deadlock names the stuck stages on the public cases")
def test_find_deadlock_public(find_deadlock):
    from course_runtime.pipeline import Action
    from course_runtime.testing import expected, require, time_limit
    require(find_deadlock=find_deadlock)
    for case in expected('q3_deadlock'):
        name, want = (case['name'], {r: Action(*a) for r, a in case['stuck']})
        schedule = [[Action(*a) for a in actions] for actions in case['schedule']]
        with time_limit(10, f'find_deadlock on {name}'):
            got = find_deadlock(schedule)
        got = {} if got is None else got
        try:
            got = {int(r): Action(*a) for r, a in dict(got).items()}
        except (TypeError, ValueError) as error:
            raise AssertionError(f'find_deadlock on {name}: expected a dict stage -> the action it is stuck at, got {got!r} ({error})') from None
        assert got == want, f"find_deadlock on {name}: expected {want or '{}'} (every stage that can never finish, and the action it waits at), got {got or '{}'}"

