from otter.test_files import test_case

OK_FORMAT = False

name = "q4"
points = 8

@test_case(points=0, hidden=False, 
    success_message="your simulator gives the public cases' timelines, bubble and memory")
def test_simulate_public(simulate, bubble_fraction, peak_in_flight):
    import numpy as np
    from course_runtime.pipeline import COMPUTE, Action
    from course_runtime.testing import assert_close, expected, require, time_limit
    require(simulate=simulate, bubble_fraction=bubble_fraction, peak_in_flight=peak_in_flight)
    for case in expected('q4_simulate'):
        name = case['name']
        schedule = [[Action(*a) for a in actions] for actions in case['schedule']]
        with time_limit(20, f'simulate on {name}'):
            events = simulate([list(a) for a in schedule], case['forward_cost'], case['backward_cost'])
            bubble = bubble_fraction(events, len(schedule))
            peaks = peak_in_flight([list(a) for a in schedule])
        try:
            got = {(int(e[0]), str(e[1]), int(e[2])): (float(e[-2]), float(e[-1])) for e in events if e[1] in COMPUTE}
        except (TypeError, IndexError, ValueError) as error:
            raise AssertionError(f'simulate on {name}: expected a list of (stage, op, microbatch, start, end), got {str(events)[:200]} ({error})') from None
        want = {(s, op, i): (start, end) for s, op, i, start, end in case['events']}
        assert set(got) == set(want), f'simulate on {name}: expected one event per forward and backward; missing {sorted(set(want) - set(got))[:4]}, extra {sorted(set(got) - set(want))[:4]}'
        keys = sorted(want, key=lambda k: want[k])
        assert_close(np.array([got[k] for k in keys]), np.array([want[k] for k in keys]), what=f'simulate on {name}: (start, end) of the {len(keys)} compute events, in order of expected start', atol=1e-09, rtol=1e-09)
        assert_close(bubble, case['bubble'], what=f'bubble_fraction on {name}', atol=1e-09)
        assert list(peaks) == case['peak_in_flight'], f"peak_in_flight on {name}: expected {case['peak_in_flight']}, got {list(peaks)}"

