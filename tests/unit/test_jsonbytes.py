"""Encoded JSON kept for long must not carry orjson's spare buffer capacity."""

import tracemalloc

import orjson

from models import jsonbytes


def _allocated_per_value(encode, document, n: int = 200) -> float:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [encode(document) for _ in range(n)]
        return (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()


def test_dumps_allocates_about_its_length() -> None:
    profile = {"user_id": "u1", "seen": [f"sim-7-{i}" for i in range(120)], "orders": 3}
    encoded = jsonbytes.dumps(profile)
    assert encoded == orjson.dumps(profile)
    # bytes header (33) + list slot (8) + allocator rounding; orjson's own output carries KBs.
    assert _allocated_per_value(jsonbytes.dumps, profile) < len(encoded) + 128


def test_dumps_passes_options() -> None:
    assert jsonbytes.dumps({"b": 1, "a": 2}, option=orjson.OPT_SORT_KEYS) == b'{"a":2,"b":1}'
