"""The key filter: never a wrong "no", few wrong "maybe"s, at any size."""

from __future__ import annotations

import pytest

from streams.keyfilter import KeyFilter


def test_every_added_key_is_found_through_many_stages() -> None:
    keys = KeyFilter(capacity=1_000)
    added = [b"\x00alias/anon-%d" % i for i in range(50_000)]
    for key in added:
        keys.add(key)

    assert all(key in keys for key in added)
    # A key it already answered for (a false positive) is not counted: a few of them.
    assert 49_500 < len(keys) <= 50_000 and keys.stages == 6  # 1k + 2k + ... + 32k holds 50k


def test_adding_keys_again_counts_nothing() -> None:
    keys = KeyFilter(capacity=1_000)
    for _ in range(3):  # a partition indexed again after a rebalance adds its keys again
        for i in range(900):
            keys.add(b"k%d" % i)

    assert len(keys) <= 900 and keys.stages == 1


@pytest.mark.parametrize("added", [500, 20_000])
def test_false_positives_stay_under_the_rate_asked_for(added: int) -> None:
    keys = KeyFilter(capacity=1_000, false_positives=0.01)
    for i in range(added):
        keys.add(b"in-%d" % i)

    wrong = sum(b"out-%d" % i in keys for i in range(100_000))

    assert wrong / 100_000 < 0.01


def test_the_filter_costs_a_few_bits_per_key() -> None:
    keys = KeyFilter(capacity=10_000)
    for i in range(100_000):
        keys.add(b"k%d" % i)

    assert keys.nbytes / 100_000 < 3  # a stage just begun is mostly empty


def test_only_bytes_keys_can_be_in_it_and_bad_parameters_are_refused() -> None:
    keys = KeyFilter()
    keys.add(b"abc")
    assert "abc" not in keys and None not in keys
    with pytest.raises(ValueError, match="capacity"):
        KeyFilter(capacity=0)
    with pytest.raises(ValueError, match="false_positives"):
        KeyFilter(false_positives=1.5)
