"""Unit tests for models.triggers: abandoned carts in event time, hot leads, segments, offers."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from models.config import load_config
from models.events import (
    CART_VIEWED,
    CHECKOUT_STARTED,
    EMAIL_OPENED,
    ORDER_COMPLETED,
    PRODUCT_ADDED,
    PRODUCT_REMOVED,
    PRODUCT_VIEWED,
    UNSUBSCRIBED,
)
from models.features import apply_event, new_profile
from models.triggers import (
    CAPPED,
    ERASED,
    NO_CONSENT,
    SUPPRESSION_REASONS,
    AbandonedCart,
    Suppressed,
    TriggerConfig,
    abandoned_cart_key,
    deadline,
    fire_due,
    hot_lead_transition,
    idempotency_key,
    new_state,
    offer_changed,
    on_event,
    segment_transition,
)

UNSUBSCRIBED_REASON = "unsubscribed"  # models.triggers.UNSUBSCRIBED (the event has that name)
T0 = 1_700_000_000.0
MIN = 60.0
HOUR = 3600.0
TIMEOUT = 30 * MIN
_ids = itertools.count()


class User:
    """One user's profile and trigger state, driven the way the engine drives them."""

    def __init__(self, user_id: str = "u-1", *, consent_default: bool = True) -> None:
        self.user_id = user_id
        self.profile = new_profile(user_id)
        self.state = new_state()
        self.consent_default = consent_default

    def send(self, name: str, ts: float, **props: Any) -> User:
        event = {
            "message_id": f"m-{next(_ids)}",
            "user_id": self.user_id,
            "type": "track",
            "event": name,
            "ts": ts,
            "properties": props,
            "traits": {},
            "consent": props.pop("_consent", None),
        }
        apply_event(self.profile, event)  # type: ignore[arg-type]
        on_event(self.state, self.profile, name, ts)
        return self

    def add(self, ts: float, product_id: str = "p1", price: float = 10.0, qty: int = 1) -> User:
        return self.send(PRODUCT_ADDED, ts, product_id=product_id, price=price, quantity=qty)

    def order(self, ts: float, *products: str) -> User:
        items = [{"product_id": p, "quantity": 1} for p in products]
        return self.send(ORDER_COMPLETED, ts, revenue=10.0, products=items)

    def fire(self, watermark: float, **kwargs: Any) -> AbandonedCart | Suppressed | None:
        kwargs.setdefault("consent_default", self.consent_default)
        return fire_due(
            self.state, self.profile, watermark=watermark, user_id=self.user_id, **kwargs
        )

    def fire_all(self, watermark: float, **kwargs: Any) -> list[AbandonedCart | Suppressed]:
        out = []
        while (result := self.fire(watermark, **kwargs)) is not None:
            out.append(result)
        return out


# --------------------------------------------------------------------------- timing


def test_fires_when_the_watermark_reaches_the_deadline_in_event_time() -> None:
    u = User().add(T0, "p1", price=12.5, qty=2).add(T0 + 60, "p2", price=5.0)
    assert deadline(u.state) == T0 + 60 + TIMEOUT
    assert u.fire(T0 + 60 + TIMEOUT - 0.001) is None
    fired = u.fire(T0 + 60 + TIMEOUT)
    assert isinstance(fired, AbandonedCart)
    assert fired.abandoned_at == T0 + 60 + TIMEOUT
    assert fired.episode_start == T0
    assert fired.cart_value == 30.0
    assert fired.cart_updated_at == T0 + 60
    assert fired.checkout_started is False
    assert [(i["product_id"], i["quantity"], i["price"]) for i in fired.items] == [
        ("p1", 2, 12.5),
        ("p2", 1, 5.0),
    ]
    assert fired.idempotency_key == abandoned_cart_key("u-1", T0)
    assert deadline(u.state) is None


def test_key_is_sha256_of_kind_user_and_start_in_ms() -> None:
    import hashlib

    raw = b'["abandoned-cart","u-1",1700000000123]'
    assert abandoned_cart_key("u-1", T0 + 0.123) == hashlib.sha256(raw).hexdigest()
    assert idempotency_key("a", None, 1) != idempotency_key("a", "None", 1)  # unambiguous


@pytest.mark.parametrize(
    "parts",
    [
        ("ascii", "".join(map(chr, range(128))), 0, -1, None, True, 2**63 - 1),
        ("offer", "ünïcødé-ü\u2028\U0001f600", 'quote"back\\slash', 1_700_000_000_000),
        ("tombstone", "", None),
        ("big", 2**64, -(2**70)),
        (),
    ],
)
def test_key_bytes_are_compact_json_with_every_non_ascii_character_escaped(parts) -> None:
    """Keys already sent must stay the same: the hashed text is ``json.dumps`` with
    ``ensure_ascii``, whichever encoder builds it."""
    import hashlib
    import json

    text = json.dumps(list(parts), separators=(",", ":")).encode("ascii")
    assert idempotency_key(*parts) == hashlib.sha256(text).hexdigest()


def test_custom_timeout() -> None:
    u = User()
    u.profile = new_profile("u-1")
    apply_event(
        u.profile,
        {
            "message_id": "m",
            "user_id": "u-1",
            "type": "track",
            "event": PRODUCT_ADDED,
            "ts": T0,
            "properties": {"product_id": "p"},
            "traits": {},
            "consent": None,
        },
    )
    on_event(u.state, u.profile, PRODUCT_ADDED, T0, abandon_after_minutes=5)
    assert deadline(u.state) == T0 + 300
    with pytest.raises(ValueError):
        on_event(u.state, u.profile, PRODUCT_ADDED, T0, abandon_after_minutes=0)


@pytest.mark.parametrize(
    ("name", "props"),
    [
        (PRODUCT_ADDED, {"product_id": "p2", "price": 1.0}),
        (PRODUCT_REMOVED, {"product_id": "p1", "quantity": 1}),  # 2 -> 1: cart still holds items
        (CART_VIEWED, {}),
        (CHECKOUT_STARTED, {}),
    ],
)
def test_cart_activity_moves_the_deadline(name: str, props: dict[str, Any]) -> None:
    u = User().add(T0, qty=2)
    u.send(name, T0 + 20 * MIN, **props)
    assert deadline(u.state) == T0 + 20 * MIN + TIMEOUT
    assert u.fire(T0 + TIMEOUT) is None
    fired = u.fire(T0 + 50 * MIN)
    assert isinstance(fired, AbandonedCart)
    assert fired.episode_start == T0  # activity moves the deadline, not the episode


@pytest.mark.parametrize("name", [PRODUCT_VIEWED, EMAIL_OPENED, "Page Viewed"])
def test_other_events_do_not_move_the_deadline(name: str) -> None:
    u = User().add(T0)
    u.send(name, T0 + 20 * MIN, product_id="p9")
    assert deadline(u.state) == T0 + TIMEOUT


def test_activity_on_an_empty_cart_opens_no_episode() -> None:
    u = User().send(CART_VIEWED, T0).send(CHECKOUT_STARTED, T0 + 1)
    u.send(PRODUCT_REMOVED, T0 + 2, product_id="p1")
    assert deadline(u.state) is None
    assert u.fire(T0 + 10 * HOUR) is None


def test_order_before_the_deadline_cancels() -> None:
    u = User().add(T0).send(CHECKOUT_STARTED, T0 + 5 * MIN).order(T0 + 10 * MIN, "p1")
    assert deadline(u.state) is None
    assert u.fire(T0 + 100 * HOUR) is None


def test_order_at_or_after_the_deadline_does_not_cancel() -> None:
    """The lapse happened in event time before the order, so firing does not depend on
    whether the engine fired before or after it applied the order (batching)."""
    u = User().add(T0, "p1", price=7.0).order(T0 + TIMEOUT, "p1")
    assert u.profile["cart"] == {}
    assert deadline(u.state) == T0 + TIMEOUT
    fired = u.fire(T0 + TIMEOUT)
    assert isinstance(fired, AbandonedCart)
    assert [i["product_id"] for i in fired.items] == ["p1"]  # the cart as of the lapse
    assert fired.cart_value == 7.0


def test_emptying_the_cart_ends_the_episode() -> None:
    u = User().add(T0).send(PRODUCT_REMOVED, T0 + MIN, product_id="p1")
    assert deadline(u.state) is None
    u.add(T0 + 2 * MIN, "p2")
    fired = u.fire(T0 + 2 * MIN + TIMEOUT)
    assert isinstance(fired, AbandonedCart)
    assert fired.episode_start == T0 + 2 * MIN  # a new episode


def test_checkout_started_without_order_is_abandoned_with_flag() -> None:
    u = User().add(T0).send(CHECKOUT_STARTED, T0 + MIN)
    fired = u.fire(T0 + MIN + TIMEOUT)
    assert isinstance(fired, AbandonedCart)
    assert fired.checkout_started is True


def test_checkout_after_the_deadline_does_not_flag_the_lapsed_episode() -> None:
    u = User().add(T0).send(CHECKOUT_STARTED, T0 + TIMEOUT + MIN)
    fired = u.fire(T0 + 2 * HOUR)
    assert isinstance(fired, AbandonedCart)
    assert fired.checkout_started is False


# --------------------------------------------------------------------------- once, cap


def test_at_most_once_per_episode() -> None:
    u = User().add(T0)
    assert isinstance(u.fire(T0 + TIMEOUT), AbandonedCart)
    u.add(T0 + 3 * HOUR, "p2")  # same episode: the cart was never emptied nor bought
    assert deadline(u.state) is None
    assert u.fire_all(T0 + 100 * HOUR) == []


def test_new_episode_after_order_fires_again_with_a_new_key() -> None:
    u = User().add(T0)
    first = u.fire(T0 + TIMEOUT)
    u.order(T0 + 2 * HOUR, "p1").add(T0 + 30 * HOUR, "p2")
    second = u.fire(T0 + 30 * HOUR + TIMEOUT)
    assert isinstance(first, AbandonedCart) and isinstance(second, AbandonedCart)
    assert first.idempotency_key != second.idempotency_key
    assert second.episode_start == T0 + 30 * HOUR


def test_cap_one_per_24h_of_event_time() -> None:
    u = User().add(T0)
    assert isinstance(u.fire(T0 + TIMEOUT), AbandonedCart)
    u.order(T0 + HOUR, "p1").add(T0 + 2 * HOUR)
    capped = u.fire(T0 + 2 * HOUR + TIMEOUT)
    assert isinstance(capped, Suppressed) and capped.reason == CAPPED
    assert u.fire(T0 + 100 * HOUR) is None  # not retried
    u.order(T0 + 3 * HOUR, "p1").add(T0 + 24 * HOUR)  # abandoned at 24.5 h >= 24 h after 0.5 h
    assert isinstance(u.fire(T0 + 25 * HOUR), AbandonedCart)
    u.order(T0 + 26 * HOUR, "p1").add(T0 + 27 * HOUR)
    assert isinstance(u.fire(T0 + 28 * HOUR, cap_hours=0), AbandonedCart)


def test_only_emitted_triggers_count_for_the_cap() -> None:
    u = User(consent_default=False).add(T0)
    assert u.fire(T0 + TIMEOUT).reason == NO_CONSENT  # type: ignore[union-attr]
    u.send("Segment Consent Preference Updated", T0 + HOUR, _consent={"email": True})
    u.order(T0 + HOUR, "p1").add(T0 + 2 * HOUR)
    assert isinstance(u.fire(T0 + 3 * HOUR), AbandonedCart)


# --------------------------------------------------------------------------- gates


@pytest.mark.parametrize(
    ("default", "stated", "expected"),
    [
        (False, None, NO_CONSENT),  # never stated, PERSONA_CONSENT_DEFAULT=deny
        (True, None, "fired"),  # never stated, default allow
        (True, False, NO_CONSENT),  # a refusal beats the default
        (False, True, "fired"),  # an explicit grant beats the default
    ],
)
def test_email_consent_gate(default: bool, stated: bool | None, expected: str) -> None:
    u = User(consent_default=default)
    if stated is not None:
        u.send("Segment Consent Preference Updated", T0 - 1, _consent={"email": stated})
    u.add(T0)
    result = u.fire(T0 + TIMEOUT)
    got = "fired" if isinstance(result, AbandonedCart) else result.reason  # type: ignore[union-attr]
    assert got == expected


def test_advertising_consent_is_not_email_consent() -> None:
    u = User(consent_default=False)
    u.send("Segment Consent Preference Updated", T0 - 1, _consent={"advertising": True})
    u.add(T0)
    assert u.fire(T0 + TIMEOUT).reason == NO_CONSENT  # type: ignore[union-attr]


def test_unsubscribed_suppresses_even_when_it_arrives_after_the_deadline() -> None:
    u = User().add(T0)
    u.send(UNSUBSCRIBED, T0 + TIMEOUT + 5 * MIN)  # processed before the engine fired
    result = u.fire(T0 + 2 * HOUR)
    assert isinstance(result, Suppressed) and result.reason == UNSUBSCRIBED_REASON
    assert result.idempotency_key == abandoned_cart_key("u-1", T0)
    u.send("Segment Consent Preference Updated", T0 + 3 * HOUR, _consent={"email": True})
    u.order(T0 + 3 * HOUR, "p1").add(T0 + 4 * HOUR)
    assert u.fire(T0 + 50 * HOUR).reason == UNSUBSCRIBED_REASON  # type: ignore[union-attr]


def test_never_after_erasure() -> None:
    u = User().add(T0)
    result = u.fire(T0 + TIMEOUT, erased=True)
    assert isinstance(result, Suppressed) and result.reason == ERASED
    assert u.fire(T0 + TIMEOUT) is None  # a suppressed lapse is not retried


def test_gate_order_and_reasons() -> None:
    assert SUPPRESSION_REASONS == (ERASED, UNSUBSCRIBED_REASON, NO_CONSENT, CAPPED)
    u = User(consent_default=False).add(T0).send(UNSUBSCRIBED, T0 + 1)
    assert u.fire(T0 + TIMEOUT + 1, erased=True).reason == ERASED  # type: ignore[union-attr]


# --------------------------------------------------------------------------- late events


def test_late_events_after_the_trigger_fired_are_final() -> None:
    """A trigger fired is final. A late add older than the deadline does not re-arm the episode,
    and a late order older than it does not retract the trigger. Keys stay deterministic."""
    u = User().add(T0)
    fired = u.fire(T0 + TIMEOUT + 10 * MIN)
    assert isinstance(fired, AbandonedCart)
    u.add(T0 + 20 * MIN, "p2")  # late: would have moved the deadline, had it come in time
    assert deadline(u.state) is None
    assert u.fire_all(T0 + 10 * HOUR) == []
    u.order(T0 + 25 * MIN, "p1", "p2")  # late order: bought before the deadline, yet final
    assert u.fire_all(T0 + 10 * HOUR) == []
    assert u.state["cart"] is None  # the order ended the episode
    u.add(T0 + 30 * HOUR, "p3")
    again = u.fire(T0 + 31 * HOUR)
    assert isinstance(again, AbandonedCart)
    assert again.idempotency_key == abandoned_cart_key("u-1", T0 + 30 * HOUR)


def test_late_activity_before_firing_moves_the_deadline_forward_only() -> None:
    u = User().add(T0 + 10 * MIN)
    u.add(T0, "p2")  # late, older than the last activity: the deadline stays
    assert deadline(u.state) == T0 + 10 * MIN + TIMEOUT
    u.add(T0 + 15 * MIN, "p3")  # late but newer: moves it
    assert deadline(u.state) == T0 + 15 * MIN + TIMEOUT
    fired = u.fire(T0 + 2 * HOUR)
    assert fired.episode_start == T0 + 10 * MIN  # type: ignore[union-attr]


def test_late_order_before_firing_cancels() -> None:
    u = User().add(T0).add(T0 + 5 * MIN, "p2")
    u.order(T0 + 2 * MIN, "p1", "p2")  # late (arrives after p2) but before the deadline
    assert u.profile["cart"] == {}
    assert deadline(u.state) is None


def test_late_partial_order_opens_a_new_episode_at_the_order() -> None:
    u = User().add(T0, "p1").add(T0 + 10 * MIN, "p2")
    u.order(T0 + 5 * MIN, "p1")  # bought p1 only; p2 was added after the order
    assert list(u.profile["cart"]) == ["p2"]
    assert deadline(u.state) == T0 + 10 * MIN + TIMEOUT
    fired = u.fire(T0 + HOUR)
    assert isinstance(fired, AbandonedCart)
    assert fired.episode_start == T0 + 5 * MIN
    assert [i["product_id"] for i in fired.items] == ["p2"]


def test_order_older_than_the_episode_is_ignored() -> None:
    u = User().order(T0, "p0").add(T0 + 10 * MIN, "p1")
    u.order(T0 - HOUR, "px")  # a very late order of an earlier cart
    assert deadline(u.state) == T0 + 10 * MIN + TIMEOUT


def test_stale_cart_event_at_or_before_the_last_order_opens_nothing() -> None:
    u = User().order(T0, "p1").add(T0, "p1").add(T0 - MIN, "p1")
    assert u.profile["cart"] == {}
    assert deadline(u.state) is None


def test_several_lapses_pending_fire_in_order() -> None:
    u = User().add(T0)
    u.order(T0 + HOUR, "p1").add(T0 + 30 * HOUR).order(T0 + 31 * HOUR, "p1")
    assert deadline(u.state) == T0 + TIMEOUT
    results = u.fire_all(T0 + 40 * HOUR)
    assert [type(r) for r in results] == [AbandonedCart, AbandonedCart]
    assert [r.episode_start for r in results] == [T0, T0 + 30 * HOUR]
    assert deadline(u.state) is None


def test_due_lapses_wait_for_the_watermark() -> None:
    u = User().add(T0).order(T0 + HOUR, "p1")  # lapse seen via the order
    assert u.fire(T0 + TIMEOUT - 1) is None
    assert isinstance(u.fire(T0 + TIMEOUT), AbandonedCart)


# --------------------------------------------------------------------------- determinism


def _random_log(seed: int, users: int = 6, n: int = 400) -> list[tuple[str, str, float, str]]:
    rng = random.Random(seed)
    names = [PRODUCT_ADDED] * 5 + [PRODUCT_REMOVED, CART_VIEWED, CHECKOUT_STARTED, PRODUCT_VIEWED]
    names += [ORDER_COMPLETED, UNSUBSCRIBED if seed % 2 else PRODUCT_VIEWED]
    ts = T0
    log = []
    for _ in range(n):
        ts += rng.choice([1.0, 30.0, 5 * MIN, 20 * MIN, 31 * MIN, 3 * HOUR, 13 * HOUR])
        log.append((f"u-{rng.randrange(users)}", rng.choice(names), ts, f"p{rng.randrange(3)}"))
    return log


def _replay(
    log: list[tuple[str, str, float, str]], *, fire_every: int, restart_every: int | None = None
) -> list[tuple[str, str, float, str]]:
    users: dict[str, User] = {}
    out = []
    watermark = -math.inf

    def fire_all() -> None:
        for u in users.values():
            for r in u.fire_all(watermark, consent_default=True):
                reason = r.reason if isinstance(r, Suppressed) else "fired"
                out.append((r.user_id, r.idempotency_key, r.abandoned_at, reason))

    for i, (user_id, name, ts, product) in enumerate(log, 1):
        u = users.setdefault(user_id, User(user_id))
        watermark = max(watermark, ts)
        if name == ORDER_COMPLETED:
            u.order(ts, product)
        else:
            u.send(name, ts, product_id=product, price=3.0)
        if i % fire_every == 0:
            fire_all()
        if restart_every and i % restart_every == 0:  # crash: state only survives as JSON
            for u in users.values():
                u.profile = orjson.loads(orjson.dumps(u.profile))
                u.state = orjson.loads(orjson.dumps(u.state))
    fire_all()
    return sorted(out)


@pytest.mark.parametrize("seed", range(8))
def test_same_log_in_any_batching_gives_the_same_triggers_and_keys(seed: int) -> None:
    """Which lapses happen, their keys and times never depend on batching nor restarts. The
    gates read the profile when emitting, so an Unsubscribed processed before a later emission
    wins. That is the only difference batching can make, and it is always towards not sending
    (odd seeds contain Unsubscribed events)."""
    log = _random_log(seed)
    reference = _replay(log, fire_every=1)
    assert reference  # the log is not trivial
    for kwargs in (
        {"fire_every": 7},
        {"fire_every": 50, "restart_every": 33},
        {"fire_every": len(log) + 1},
    ):
        other = _replay(log, **kwargs)  # type: ignore[arg-type]
        assert [r[:3] for r in other] == [r[:3] for r in reference]
        for got, ref in zip(other, reference, strict=True):
            assert got[3] == ref[3] or (seed % 2 and got[3] == UNSUBSCRIBED_REASON)


def test_same_log_without_consent_changes_gives_identical_outcomes() -> None:
    for seed in (0, 2, 4):
        log = _random_log(seed)
        reference = _replay(log, fire_every=1)
        assert _replay(log, fire_every=len(log) + 1, restart_every=40) == reference


def test_state_is_json_serializable() -> None:
    u = User().add(T0).send(CHECKOUT_STARTED, T0 + 1)
    hot_lead_transition(u.state, 0.9)
    segment_transition(u.state, "vip")
    offer_changed(u.state, "o-1", ts=T0)
    assert orjson.loads(orjson.dumps(u.state)) == u.state
    assert fire_due({}, u.profile, watermark=T0, user_id="u-1", consent_default=True) is None
    assert deadline({}) is None


# --------------------------------------------------------------------------- hot leads


def test_hot_lead_hysteresis_never_flaps() -> None:
    state: dict[str, Any] = {}
    scores = [0.69, 0.71, 0.65, 0.61, 0.6, 0.62, 0.59, 0.6, 0.68, 0.69, 0.7, 0.75]
    got = [hot_lead_transition(state, s) for s in scores]
    entered, left = "entered", "left"
    assert got == [None, entered, None, None, None, None, left, None, None, None, entered, None]


def test_hot_lead_noise_around_the_line() -> None:
    rng = random.Random(1)
    for line in (0.7, 0.6):
        state: dict[str, Any] = {"hot": line == 0.6}
        got = [hot_lead_transition(state, line + rng.uniform(-0.04, 0.04)) for _ in range(1000)]
        assert sum(g is not None for g in got) <= 1


def test_hot_lead_bad_arguments() -> None:
    state: dict[str, Any] = {}
    assert hot_lead_transition(state, math.nan) is None
    with pytest.raises(ValueError):
        hot_lead_transition(state, 0.5, enter=0.5, exit=0.6)
    assert hot_lead_transition(state, 0.5, enter=0.5, exit=0.5) == "entered"


# --------------------------------------------------------------------------- segments, offers


def test_segment_transition() -> None:
    state: dict[str, Any] = {}
    assert segment_transition(state, "new") == (None, "new")
    assert segment_transition(state, "new") is None
    assert segment_transition(state, "vip") == ("new", "vip")
    assert segment_transition(state, None) == ("vip", None)
    assert segment_transition(state, None) is None


def test_offer_changed_on_change_or_refresh() -> None:
    state: dict[str, Any] = {}
    assert offer_changed(state, "a", ts=T0)
    assert not offer_changed(state, "a", ts=T0 + 23 * HOUR)
    assert offer_changed(state, "b", ts=T0 + 23 * HOUR)
    assert not offer_changed(state, "b", ts=T0 + 46 * HOUR)
    assert offer_changed(state, "b", ts=T0 + 47 * HOUR)
    assert not offer_changed(state, "b", ts=T0)  # late: never moves the clock back
    assert offer_changed(state, "b", ts=T0 + 49 * HOUR, refresh_hours=2)


# --------------------------------------------------------------------------- config


def test_default_config_file_matches_defaults() -> None:
    assert TriggerConfig.from_config(load_config(None)) == TriggerConfig()


def test_custom_config(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        "[triggers.abandoned_cart]\nabandon_after_minutes = 45\n[triggers.hot_lead]\nexit = 0.5\n"
    )
    config = TriggerConfig.from_config(load_config(path))
    assert config.abandon_after_minutes == 45.0 and config.hot_exit == 0.5
    assert config.cap_hours == 24.0
    path.write_text("[triggers.hot_lead]\nenter = 0.5\nexit = 0.6\n")
    with pytest.raises(ValueError):
        TriggerConfig.from_config(load_config(path))
