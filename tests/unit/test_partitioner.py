"""The batch partitioner agrees with aiokafka's (Kafka's) default partitioner on every key."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as kafka_murmur2

from connectors.partitioner import murmur2, partitions_for_keys


def random_keys(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(0, 81)) for _ in range(count)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_murmur2_equals_kafkas_for_keys_of_every_length(seed: int) -> None:
    keys = random_keys(seed, 2000)
    assert {len(k) % 4 for k in keys} == {0, 1, 2, 3}
    assert murmur2(keys).tolist() == [kafka_murmur2(k) for k in keys]


@pytest.mark.parametrize("partitions", [1, 3, 8, 100])
def test_partitions_equal_the_default_partitioners(partitions: int) -> None:
    keys = random_keys(partitions, 1000) + [f"u{i:05d}".encode() for i in range(1000)]
    everyone = list(range(partitions))
    want = [DefaultPartitioner()(k, everyone, everyone) for k in keys]
    assert partitions_for_keys(keys, partitions) == want


def test_no_keys_no_partitions() -> None:
    assert partitions_for_keys([], 8) == []


def test_remembered_hashes_give_the_same_partitions_and_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from connectors import partitioner

    monkeypatch.setattr(partitioner, "REMEMBERED_KEYS", 500)
    monkeypatch.setattr(partitioner, "_positive_hashes", {})
    keys = random_keys(4, 300)
    everyone = list(range(7))
    want = [DefaultPartitioner()(k, everyone, everyone) for k in keys]
    assert partitions_for_keys(keys, 7) == want
    hashed: list[int] = []

    def counting_murmur2(batch: list[bytes]) -> object:
        hashed.append(len(batch))
        return murmur2(batch)

    monkeypatch.setattr(partitioner, "murmur2", counting_murmur2)
    assert partitions_for_keys(keys + keys, 7) == want + want
    assert hashed == []  # remembered, not hashed again
    more = random_keys(5, 300)  # 600 keys in all: the memo starts over
    want_more = [DefaultPartitioner()(k, everyone, everyone) for k in more]
    assert partitions_for_keys(keys[:1] + more, 7) == want[:1] + want_more
    # The memo started over: each distinct key of the batch hashed once, the remembered one too.
    assert hashed == [len(set(keys[:1] + more))]
    assert len(partitioner._positive_hashes) <= 500
    assert partitions_for_keys(keys, 7) == want


def test_a_few_keys_are_hashed_one_by_one_to_the_same_partitions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from connectors import partitioner

    monkeypatch.setattr(partitioner, "_positive_hashes", {})
    hashed: list[int] = []

    def counting_murmur2(batch: list[bytes]) -> object:
        hashed.append(len(batch))
        return murmur2(batch)

    monkeypatch.setattr(partitioner, "murmur2", counting_murmur2)
    everyone = list(range(5))
    few = random_keys(6, partitioner.FEW_KEYS - 1)
    many = random_keys(7, partitioner.FEW_KEYS)
    for keys in (few, many):
        want = [DefaultPartitioner()(k, everyone, everyone) for k in keys]
        assert partitions_for_keys(keys, 5) == want
    assert hashed == [len(set(many))]  # the few went one by one, the many as arrays
