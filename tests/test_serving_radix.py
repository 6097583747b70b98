"""The radix-tree prefix cache against brute force over the sequences it was given."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from course_reference.serving.radix import RadixCache

# Small alphabets and lengths make shared prefixes (and edge splits) common.
sequences = st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=8), min_size=1,
                     max_size=25)


def common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@settings(max_examples=200, deadline=None)
@given(sequences)
def test_unbounded_cache_matches_the_longest_common_prefix(seqs):
    cache = RadixCache()
    seen = []
    for s in seqs:
        expected = max((common_prefix(s, t) for t in seen), default=0)
        assert cache.match(s) == expected
        assert cache.insert(s) == expected
        seen.append(s)
        cache.check()
        # One token per distinct non-empty prefix: the size of a trie of everything seen.
        assert cache.size == len({tuple(t[:i]) for t in seen for i in range(1, len(t) + 1)})


@settings(max_examples=200, deadline=None)
@given(sequences, st.integers(8, 20))
def test_bounded_cache_stays_within_capacity_and_never_overclaims(seqs, capacity):
    cache = RadixCache(capacity)
    seen = []
    for s in seqs:
        hit = cache.insert(s)
        assert hit <= max((common_prefix(s, t) for t in seen), default=0)
        seen.append(s)
        cache.check()
        assert cache.match(s) == len(s)          # what was just inserted is cached whole
        for cached in cache.sequences():        # everything cached was once given
            assert any(tuple(t[:len(cached)]) == cached for t in seen)


def test_least_recently_used_leaf_goes_first():
    cache = RadixCache(capacity=12)
    a, b, c = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
    for s in (a, b, c):
        cache.insert(s)
    cache.match(a)                              # a is now more recent than b
    cache.insert([4, 4, 4, 4])                  # needs 4 tokens: b, the oldest, goes
    assert cache.match(b) == 0
    assert cache.match(a) == 4 and cache.match(c) == 4
    assert cache.evicted == 4


def test_a_shared_prefix_is_stored_once_and_split_where_requests_diverge():
    cache = RadixCache()
    system = [9] * 10
    cache.insert(system + [1, 2, 3])
    assert cache.insert(system + [1, 5]) == 11
    assert cache.insert(system + [7]) == 10
    assert cache.size == 10 + 3 + 1 + 1
    assert cache.sequences() == sorted([tuple(system + [1, 2, 3]), tuple(system + [1, 5]),
                                        tuple(system + [7])])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="positive number of tokens"):
        RadixCache(0)
    with pytest.raises(ValueError, match="cannot fit"):
        RadixCache(4).insert([1, 2, 3, 4, 5])
