"""Stored profiles: zstd frames with a shipped dictionary, and plain JSON from before."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import orjson
import pytest
import zstandard

from models import profile_codec
from models.config import load_config
from streams.engine import Engine, EngineOptions
from tests.unit.test_engine import run, shopper

CONFIG = Path(profile_codec.__file__).with_name("config")


def scored_profiles() -> dict[str, dict]:
    """Profiles as the engine leaves them: features, lead snapshot, offer decisions."""
    engine = Engine(load_config(None), EngineOptions(consent_default=True))
    changed, _ = run(engine, [v for u in ("a", "b", "c") for v in shopper(u)])
    return changed


def test_a_scored_profile_round_trips_in_a_fraction_of_its_json() -> None:
    for profile in scored_profiles().values():
        raw = profile_codec.encode(profile)
        assert raw.startswith(profile_codec.ZSTD_MAGIC)
        assert profile_codec.decode(raw) == profile
        # run_due compares this with orjson.dumps of the profile to skip unchanged writes
        assert profile_codec.json_of(raw) == orjson.dumps(profile)
        assert len(raw) * 3 < len(orjson.dumps(profile)), "the dictionary should do most of it"


def test_a_stored_profile_allocates_about_its_length() -> None:
    profile = next(iter(scored_profiles().values()))
    encoded = profile_codec.encode(profile)
    tracemalloc.start()
    try:
        kept = [profile_codec.encode(profile) for _ in range(200)]
        per_value = tracemalloc.get_traced_memory()[0] / len(kept)
    finally:
        tracemalloc.stop()
    # bytes header (33) + list slot (8) + allocator rounding; zstandard's output: the JSON's size
    assert per_value < len(encoded) + 128


def test_profiles_stored_as_json_before_the_codec_still_load() -> None:
    profile = next(iter(scored_profiles().values()))
    assert profile_codec.decode(orjson.dumps(profile)) == profile


def test_a_frame_without_a_dictionary_loads() -> None:
    raw = zstandard.ZstdCompressor().compress(b'{"user_id":"u1"}')
    assert profile_codec.decode(raw) == {"user_id": "u1"}


def test_a_frame_needing_an_unknown_dictionary_says_so() -> None:
    other = zstandard.train_dictionary(
        1024, [orjson.dumps({"k": i, "v": "x" * i}) for i in range(400)]
    )
    raw = zstandard.ZstdCompressor(dict_data=other).compress(b'{"user_id":"u1"}')
    with pytest.raises(ValueError, match=f"dictionary {other.dict_id()}, which is not shipped"):
        profile_codec.decode(raw)


@pytest.mark.parametrize("raw", [b"", b"\x00\x01", b"[1,2]"])
def test_bytes_that_are_not_a_stored_profile_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError, match="neither JSON nor a zstd frame"):
        profile_codec.decode(raw)


def test_a_damaged_frame_is_refused() -> None:
    raw = bytearray(profile_codec.encode({"user_id": "u1", "cart": {}}))
    del raw[-3:]
    with pytest.raises(ValueError, match="damaged zstd frame"):
        profile_codec.decode(bytes(raw))


def test_every_shipped_dictionary_is_listed_and_distinct() -> None:
    """Stored values need their dictionary forever: a file must not disappear from the list."""
    shipped = sorted(path.name for path in CONFIG.glob("*.zdict"))
    assert sorted(profile_codec.DICTIONARY_FILES) == shipped
    ids = [zstandard.ZstdCompressionDict(path.read_bytes()).dict_id() for path in
           sorted(CONFIG.glob("*.zdict"))]  # fmt: skip
    assert len(set(ids)) == len(ids) and 0 not in ids
