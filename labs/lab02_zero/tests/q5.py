from otter.test_files import test_case

OK_FORMAT = False

name = "q5"
points = 6

@test_case(points=0, hidden=False, 
    success_message="the theory table is right for the lab's MLP at N=2")
def test_theory_public(theory_bytes, theory_traffic):
    from course_runtime.testing import assert_close, expected, require, time_limit
    require(theory_bytes=theory_bytes, theory_traffic=theory_traffic)
    for case in expected('q5_theory'):
        psi, n, stage = (case['num_params'], case['world_size'], case['stage'])
        with time_limit(5, 'theory_bytes'):
            got = theory_bytes(psi, n, stage)
        for key, want in case['bytes'].items():
            assert isinstance(got, dict) and key in got, f'theory_bytes should return a dict with key {key!r}, got {got!r}'
            assert_close(float(got[key]), want, atol=1e-06, rtol=1e-09, what=f'theory_bytes({psi}, {n}, stage {stage})[{key!r}]')
        with time_limit(5, 'theory_traffic'):
            sent = theory_traffic(psi, n, stage)
        assert_close(float(sent), case['traffic'], atol=1e-06, rtol=1e-09, what=f'theory_traffic({psi}, {n}, stage {stage}) in bytes')

