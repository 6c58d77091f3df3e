"""Kafka's default partitioner for a whole batch of keys at once.

Kafka clients place a keyed message on partition ``murmur2(key) & 0x7fffffff`` modulo the
topic's partition count (Java's ``Utils.murmur2``, aiokafka's ``DefaultPartitioner``), so every
client agrees where a key lives. aiokafka computes murmur2 in pure Python, byte by byte: for the
outbox's thousand-odd keyed messages a batch (triggers, offers, training examples) it took about
2.5% of the worker's main thread. :func:`partitions_for_keys` computes the same hash for a
batch of keys with numpy, one array operation per 4-byte block position instead of a Python
loop per key; a handful of keys (:data:`FEW_KEYS`) are hashed one by one, below the dozen array
operations' fixed cost.

>>> from aiokafka.partitioner import DefaultPartitioner
>>> keys = [b"u00042", b"anonymous-7f3a", b"", b"abc"]
>>> partitions_for_keys(keys, 8)
[0, 0, 1, 3]
>>> partitions_for_keys(keys, 8) == [DefaultPartitioner()(k, list(range(8)), []) for k in keys]
True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from aiokafka.partitioner import murmur2 as murmur2_of_one

SEED = 0x9747B28C
MULTIPLIER = np.uint32(0x5BD1E995)
REMEMBERED_KEYS = 1 << 16
"""Bound of the hashes :func:`partitions_for_keys` remembers (a few MB), cleared when full."""
_positive_hashes: dict[bytes, int] = {}
"""Key → ``murmur2(key) & 0x7fffffff`` of recently placed keys."""
FEW_KEYS = 16
"""Fewer keys than this are hashed one by one: 5 µs a key against about 95 µs for the arrays."""


def murmur2(keys: Sequence[bytes]) -> np.ndarray:
    """Kafka's murmur2 of each key, as unsigned 32-bit integers."""
    count = len(keys)
    if not count:
        return np.zeros(0, dtype=np.uint32)
    lengths = np.fromiter(map(len, keys), dtype=np.int64, count=count)
    blocks = lengths // 4
    # Room for every key's whole blocks and up to three tail bytes, zero-padded.
    width = (int(lengths.max()) // 4 + 1) * 4
    data = np.frombuffer(b"".join(k.ljust(width, b"\0") for k in keys), dtype=np.uint8)
    data = data.reshape(count, width)
    words = data.view("<u4")
    m = MULTIPLIER
    h = np.uint32(SEED) ^ lengths.astype(np.uint32)
    for i in range(int(blocks.max())):  # uint32 arithmetic wraps modulo 2**32, as Java's int
        k = words[:, i] * m
        k ^= k >> np.uint32(24)
        k *= m
        h = np.where(i < blocks, (h * m) ^ k, h)
    rows, tail = np.arange(count), blocks * 4
    extra = lengths % 4
    h = np.where(extra >= 3, h ^ (data[rows, tail + 2].astype(np.uint32) << np.uint32(16)), h)
    h = np.where(extra >= 2, h ^ (data[rows, tail + 1].astype(np.uint32) << np.uint32(8)), h)
    h = np.where(extra >= 1, (h ^ data[rows, tail].astype(np.uint32)) * m, h)
    h ^= h >> np.uint32(13)
    h *= m
    h ^= h >> np.uint32(15)
    return h


def partitions_for_keys(keys: Sequence[bytes], partitions: int) -> list[int]:
    """The partition (0 to ``partitions`` - 1) Kafka's default partitioner gives each key.

    Hashes are remembered for the last :data:`REMEMBERED_KEYS` or so keys: a batch's keys are
    mostly users seen in the batches before, and looking one up costs a fraction of the
    dozen array operations a batch of misses takes (those were 2.4% of a paced worker).
    """
    known = _positive_hashes
    missing = list(dict.fromkeys(key for key in keys if key not in known))
    if missing:
        if len(known) + len(missing) > REMEMBERED_KEYS:
            known.clear()
            missing = list(dict.fromkeys(keys))
        if len(missing) < FEW_KEYS:  # a paced worker's batches mostly miss a few keys
            hashes = [murmur2_of_one(key) & 0x7FFFFFFF for key in missing]
        else:
            hashes = (murmur2(missing) & np.uint32(0x7FFFFFFF)).tolist()
        known.update(zip(missing, hashes, strict=True))
    return [known[key] % partitions for key in keys]
