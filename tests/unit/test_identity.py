"""Identity stitching rules (models.identity) and the link the parser reads (linked_id)."""

from __future__ import annotations

import orjson
import pytest

from connectors.segment import BAD_FIELD, Rejection, parse_event
from models.dedupe import as_digests
from models.features import new_profile
from models.identity import MAX_MERGED_IDS, already_merged, merge_profiles

NOW = 1_800_000_000.0


def profile(user_id: str, **values: object) -> dict:
    p = new_profile(user_id)
    p.update(values)
    return p


def test_counts_add_and_times_widen() -> None:
    known = profile("u", events=3, views=2, orders=1, revenue=10.1, first_seen=50.0, last_seen=90.0)
    anon = profile("a", events=4, views=4, revenue=0.2, first_seen=10.0, last_seen=60.0)
    merged = merge_profiles(known, anon)
    assert (merged["events"], merged["views"], merged["orders"]) == (7, 6, 1)
    assert merged["revenue"] == pytest.approx(10.3)
    assert (merged["first_seen"], merged["last_seen"]) == (10.0, 90.0)
    assert known["events"] == 3 and anon["events"] == 4  # inputs untouched


def test_a_cart_bought_since_is_not_resurrected() -> None:
    known = profile("u", cart_cleared_at=200.0)
    stale = profile("a", cart={"p": {"qty": 1, "price": 5.0}}, cart_updated_at=150.0)
    fresh = profile("a", cart={"p": {"qty": 1, "price": 5.0}}, cart_updated_at=250.0)
    assert merge_profiles(known, stale)["cart"] == {}
    merged = merge_profiles(known, fresh)
    assert merged["cart"] == {"p": {"qty": 1, "price": 5.0}} and merged["cart_value"] == 5.0
    assert merged["cart_updated_at"] == 250.0


def test_same_product_in_both_carts_adds_quantities() -> None:
    known = profile("u", cart={"p": {"qty": 1, "price": 5.0}}, cart_updated_at=1.0)
    anon = profile("a", cart={"p": {"qty": 2, "price": 5.0}}, cart_updated_at=2.0)
    assert merge_profiles(known, anon)["cart"]["p"]["qty"] == 3


def test_consent_known_user_first_and_unsubscribe_sticks() -> None:
    known = profile("u", consent={"email": None, "advertising": False})
    anon = profile("a", consent={"email": True, "advertising": True}, unsubscribed=True)
    anon["consent_at"] = {"email": 5.0, "advertising": 6.0}
    merged = merge_profiles(known, anon)
    assert merged["consent"] == {"email": True, "advertising": False}
    assert merged["consent_at"]["email"] == 5.0
    assert merged["unsubscribed"] is True


def test_affinities_decay_to_a_common_time() -> None:
    day = 86400.0
    known = profile("u", affinity={"shoes": 4.0}, affinity_at=10 * day)
    anon = profile("a", affinity={"shoes": 2.0, "hats": 2.0}, affinity_at=0.0)
    merged = merge_profiles(known, anon, affinity_half_life_s=10 * day)
    assert merged["affinity_at"] == 10 * day
    assert merged["affinity"] == pytest.approx({"shoes": 5.0, "hats": 1.0})


def test_seen_ids_and_merged_ids_are_kept_bounded() -> None:
    known = profile("u", seen=as_digests(["m1", "m2"]))
    anon = profile("a", seen=["m2", "m3"])  # stored before digests
    merged = merge_profiles(known, anon, dedupe_window=3)
    assert merged["seen"] == as_digests(["m1", "m2", "m3"])
    assert already_merged(merged, "a") and not already_merged(merged, "b")
    for i in range(MAX_MERGED_IDS + 5):
        merged = merge_profiles(merged, profile(f"a{i}"))
    assert len(merged["merged_from"]) == MAX_MERGED_IDS


def test_no_known_profile_yet() -> None:
    merged = merge_profiles(None, profile("a", events=2), user_id="u")
    assert merged["user_id"] == "u" and merged["events"] == 2
    with pytest.raises(ValueError, match="user_id"):
        merge_profiles(None, profile("a"))


def parse(payload: dict) -> object:
    base = {"messageId": "m", "timestamp": "2024-01-01T00:00:00Z"}
    return parse_event(orjson.dumps({**base, **payload}), now=NOW)


@pytest.mark.parametrize(
    ("payload", "linked"),
    [
        ({"type": "identify", "userId": "u", "anonymousId": "a"}, "a"),
        ({"type": "alias", "userId": "u", "previousId": "a"}, "a"),
        ({"type": "identify", "userId": "u", "anonymousId": "u"}, None),
        ({"type": "identify", "anonymousId": "a"}, None),  # nobody known yet
        ({"type": "track", "event": "X", "userId": "u", "anonymousId": "a"}, None),
    ],
)
def test_linked_id(payload: dict, linked: str | None) -> None:
    event = parse(payload)
    assert isinstance(event, dict)
    assert event.get("linked_id") == linked


@pytest.mark.parametrize("previous", [["a"], "a\x00b", "x" * 201])
def test_a_bad_linked_id_is_rejected(previous: object) -> None:
    rejected = parse({"type": "alias", "userId": "u", "previousId": previous})
    assert isinstance(rejected, Rejection) and rejected.reason == BAD_FIELD
