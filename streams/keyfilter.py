"""A set of keys that may answer "maybe" for a key it never saw, but never "no" for one it did.

What: :class:`KeyFilter` is a scalable Bloom filter over bytes keys. :meth:`~KeyFilter.add`
remembers a key; ``key in filter`` is False only if the key was never added. A True answer is
a hint to look the key up where it really lives.

Why: the worker looks up internal table entries (identity aliases, erasure markers) for every
new id it sees, and most of those lookups miss. A miss in the RocksDB store searches every
partition's database, so the worker keeps an in-memory answer to "could this key be in the
table?". As a set of the keys that answer cost about 35 bytes per alias with the memory store
(whose keys it shares) and over 100 with RocksDB, in a worker that holds one alias per
identified user; this filter costs 2 to 4 bytes per key. Deleted keys stay in the filter:
their lookups miss, as for any false positive.

The filter grows in stages: once a stage holds its capacity, a new one twice as large (and
with half the false-positive rate) takes the new keys, so the rate over all stages stays
under ``false_positives`` however many keys come.

>>> keys = KeyFilter(capacity=100)
>>> keys.add(b"\\x00alias/anon-1")
>>> b"\\x00alias/anon-1" in keys, b"\\x00alias/anon-2" in keys
(True, False)
>>> for i in range(1_000):
...     keys.add(b"key-%d" % i)
>>> all(b"key-%d" % i in keys for i in range(1_000)), keys.stages
(True, 4)
"""

from __future__ import annotations

import math
from hashlib import blake2b

__all__ = ["KeyFilter"]


class _Stage:
    """One fixed-size Bloom filter: ``hashes`` bit positions per key in ``bits`` bits."""

    __slots__ = ("bits", "capacity", "count", "hashes", "table")

    def __init__(self, capacity: int, false_positives: float) -> None:
        self.capacity = capacity
        self.count = 0
        self.bits = max(64, math.ceil(-capacity * math.log(false_positives) / math.log(2) ** 2))
        self.hashes = max(1, round(self.bits / capacity * math.log(2)))
        self.table = bytearray((self.bits + 7) // 8)

    def positions(self, key_hash: int) -> list[int]:
        # Double hashing (Kirsch and Mitzenmacher): two halves of one 64-bit hash give every
        # position, with the false-positive rate of independent hashes.
        low, high = key_hash & 0xFFFFFFFF, (key_hash >> 32) | 1
        return [(low + i * high) % self.bits for i in range(self.hashes)]

    def add(self, key_hash: int) -> None:
        table = self.table
        for bit in self.positions(key_hash):
            table[bit >> 3] |= 1 << (bit & 7)
        self.count += 1

    def __contains__(self, key_hash: int) -> bool:
        # positions() inlined, stopping at the first clear bit: most lookups miss, and a miss
        # usually shows in the first two positions.
        table, bits = self.table, self.bits
        position, step = key_hash & 0xFFFFFFFF, (key_hash >> 32) | 1
        for _ in range(self.hashes):
            bit = position % bits
            if not table[bit >> 3] & (1 << (bit & 7)):
                return False
            position += step
        return True


class KeyFilter:
    """A scalable Bloom filter of bytes keys (see the module's docstring)."""

    def __init__(self, capacity: int = 65_536, false_positives: float = 0.01) -> None:
        if capacity <= 0 or not 0.0 < false_positives < 1.0:
            raise ValueError("capacity must be positive and false_positives within (0, 1)")
        # Stage i gets rate p / 2**(i + 1): the stages' rates sum to under p.
        self._false_positives = false_positives
        self._stages = [_Stage(capacity, false_positives / 2)]

    @staticmethod
    def _hash(key: bytes) -> int:
        # Not Python's hash(): it is seeded per process, so which keys collide (and what a test
        # sees) would change from run to run.
        return int.from_bytes(blake2b(key, digest_size=8).digest(), "little")

    def add(self, key: bytes) -> None:
        """Remember ``key``; a key it already answers for is not counted again (a re-indexed
        partition adds its keys again, and its answer for them cannot change anyway)."""
        key_hash = self._hash(key)
        if self._answers_for(key_hash):
            return
        stage = self._stages[-1]
        if stage.count >= stage.capacity:
            rate = self._false_positives / 2 ** (len(self._stages) + 1)
            stage = _Stage(stage.capacity * 2, rate)
            self._stages.append(stage)
        stage.add(key_hash)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self._answers_for(self._hash(key))

    def _answers_for(self, key_hash: int) -> bool:
        return any(key_hash in stage for stage in self._stages)

    def __len__(self) -> int:
        """Keys added (not counting those it already answered for)."""
        return sum(stage.count for stage in self._stages)

    @property
    def stages(self) -> int:
        return len(self._stages)

    @property
    def nbytes(self) -> int:
        """Memory of the bit tables."""
        return sum(len(stage.table) for stage in self._stages)
