"""Unit tests for models.lead: the online lead-score model."""

from __future__ import annotations

import math
import pickle
import random
import time
from typing import Any

import numpy as np
import pytest

from models.evaluation import roc_auc
from models.features import FEATURE_NAMES
from models.lead import LeadModel


def logistic_data(n: int, seed: int, flip: bool = False) -> tuple[list[dict[str, Any]], list[int]]:
    """y ~ Bernoulli(sigmoid(2 a - 1.5 b + 1[plan = premium])); ``flip`` negates the concept."""
    rng = random.Random(seed)
    xs, ys = [], []
    for _ in range(n):
        a, b = rng.gauss(0, 1), rng.gauss(5, 3)
        plan = rng.choice(["free", "plus", "premium"])
        logit = 2 * a - 1.5 * (b - 5) / 3 + (1.0 if plan == "premium" else 0.0)
        if flip:
            logit = -logit
        xs.append({"a": a, "b": b, "plan": plan, "noise": rng.random()})
        ys.append(int(rng.random() < 1 / (1 + math.exp(-logit))))
    return xs, ys


def fit(model: LeadModel, xs: list[dict[str, Any]], ys: list[int], batch: int = 100) -> None:
    for lo in range(0, len(xs), batch):
        model.learn_many(xs[lo : lo + batch], ys[lo : lo + batch])


def profile_like(n: int, seed: int) -> list[dict[str, float]]:
    rng = random.Random(seed)
    return [{k: rng.random() * 10 for k in FEATURE_NAMES} for _ in range(n)]


def test_untrained_model_is_neutral() -> None:
    model = LeadModel()
    assert model.predict_one({"a": 1.0}) == 0.5
    assert model.predict_many([]).shape == (0,)
    assert model.explain({"a": 1.0}) == []
    assert model.examples_seen == 0 and model.version == 0


def test_learns_a_logistic_concept_with_numbers_and_categories() -> None:
    model = LeadModel()
    xs, ys = logistic_data(5000, seed=1)
    fit(model, xs, ys)
    test_x, test_y = logistic_data(3000, seed=2)
    auc = roc_auc(test_y, model.predict_many(test_x))
    assert auc > 0.8
    w = model.weights
    assert w["a"] > 0 > w["b"]
    assert w["plan=premium"] > w["plan=free"]
    assert abs(w["noise"]) < 0.2 * w["a"]
    assert model.examples_seen == 5000
    assert {"a", "b", "noise", "plan=free", "plan=plus", "plan=premium"} == set(model.feature_names)


def test_batch_size_barely_matters_for_what_is_learned() -> None:
    xs, ys = logistic_data(4000, seed=3)
    test_x, test_y = logistic_data(2000, seed=4)
    aucs = []
    for batch in (10, 1000):
        model = LeadModel()
        fit(model, xs, ys, batch)
        aucs.append(roc_auc(test_y, model.predict_many(test_x)))
    assert abs(aucs[0] - aucs[1]) < 0.02


def test_deterministic() -> None:
    xs, ys = logistic_data(2000, seed=5)
    a, b = LeadModel(), LeadModel()
    fit(a, xs, ys)
    fit(b, xs, ys)
    assert a.weights == b.weights
    assert np.array_equal(a.predict_many(xs[:50]), b.predict_many(xs[:50]))


def test_predict_one_many_and_key_order_agree() -> None:
    model = LeadModel()
    xs, ys = logistic_data(1000, seed=6)
    fit(model, xs, ys)
    many = model.predict_many(xs[:20])
    one = [model.predict_one(x) for x in xs[:20]]
    assert np.allclose(many, one, rtol=0, atol=1e-12)
    # A batch whose dicts have different key orders goes through the row-by-row path.
    shuffled = [dict(reversed(list(x.items()))) if i % 2 else x for i, x in enumerate(xs[:20])]
    assert np.allclose(model.predict_many(shuffled), many, rtol=0, atol=1e-12)


def test_missing_unknown_and_non_finite_values_are_neutral() -> None:
    model = LeadModel()
    xs, ys = logistic_data(1000, seed=7)
    fit(model, xs, ys)
    base = {"a": 0.5, "b": 2.0, "plan": "plus"}
    p = model.predict_one(base)
    assert model.predict_one({**base, "unknown": 3.0, "other": "x"}) == p
    assert model.predict_one({**base, "plan": "never-seen"}) == model.predict_one(
        {"a": 0.5, "b": 2.0}
    )
    # A missing number counts as the mean: None, NaN, inf and an absent key all agree.
    absent = model.predict_one({"a": 0.5, "plan": "plus"})
    for bad in (None, math.nan, math.inf, [1, 2]):
        assert model.predict_one({**base, "b": bad}) == absent
    # Unknown names are not learned at scoring time.
    assert "unknown" not in model.feature_names


def test_values_far_outside_what_was_seen_are_clipped() -> None:
    model = LeadModel(clip=3.0)
    xs, ys = logistic_data(2000, seed=8)
    fit(model, xs, ys)
    sd = float(np.std([x["a"] for x in xs]))
    mean = float(np.mean([x["a"] for x in xs]))
    at_clip = model.predict_one({"a": mean + 3.5 * sd})
    assert model.predict_one({"a": 1e9}) == at_clip
    assert model.predict_one({"a": mean + 2 * sd}) < at_clip


def test_explain_sums_to_the_logit() -> None:
    model = LeadModel()
    xs, ys = logistic_data(2000, seed=9)
    fit(model, xs, ys)
    x = {"a": 1.2, "b": 8.0, "plan": "premium", "noise": 0.3}
    everything = model.explain(x, top_k=100)
    p = model.predict_one(x)
    logit = math.log(p / (1 - p))
    assert math.isclose(model.intercept + sum(c for _, c in everything), logit, abs_tol=1e-9)
    # Sorted by absolute contribution; absent one-hot columns contribute nothing.
    mags = [abs(c) for _, c in everything]
    assert mags == sorted(mags, reverse=True)
    names = [n for n, _ in everything]
    assert "plan=premium" in names and "plan=free" not in names
    top2 = model.explain(x, top_k=2)
    assert top2 == everything[:2] and top2[0][0] == "a"


def test_explain_many_explains_each_row_as_explain_does() -> None:
    model = LeadModel()
    xs, ys = logistic_data(2000, seed=12)
    fit(model, xs, ys)
    batch = [*xs[:40], {"a": 0.5, "plan": "free"}, {"b": 3.0, "plan": "premium", "new": 1.0}]
    full = model.explain_many(batch, top_k=100)
    p = model.predict_many(batch)
    logits = np.log(p / (1 - p))
    for x, everything, logit in zip(batch, full, logits, strict=True):
        assert math.isclose(model.intercept + sum(c for _, c in everything), logit, abs_tol=1e-9)
        mags = [abs(c) for _, c in everything]
        assert mags == sorted(mags, reverse=True) and 0.0 not in mags
        assert model.explain(x, top_k=100) == everything
    top3 = model.explain_many(batch, top_k=3)
    assert top3 == [everything[:3] for everything in full]
    assert [len(row) for row in top3] == [min(3, len(everything)) for everything in full]
    assert len(full[-2]) == 2  # "a" and "plan=free": a missing number contributes nothing
    assert model.explain_many([], top_k=3) == []
    scores, explanations = model.predict_explain_many(batch, top_k=3)
    assert np.array_equal(scores, p) and explanations == top3
    untrained = LeadModel()
    untrained.learn_many([], [])
    assert untrained.explain_many(batch[:3], top_k=3) == [[], [], []]


def test_forgetting_follows_a_concept_flip() -> None:
    model = LeadModel(forget_half_life=2000)
    xs, ys = logistic_data(6000, seed=10)
    fit(model, xs, ys)
    flipped_x, flipped_y = logistic_data(6000, seed=11, flip=True)
    fit(model, flipped_x, flipped_y)
    test_x, test_y = logistic_data(2000, seed=12, flip=True)
    assert roc_auc(test_y, model.predict_many(test_x)) > 0.8


def test_bool_and_numpy_values_are_numbers() -> None:
    model = LeadModel()
    model.learn_many([{"f": True, "g": np.float32(2.0)}, {"f": False, "g": np.int64(1)}], [1, 0])
    assert model.feature_names == ["f", "g"]
    assert model.predict_one({"f": True, "g": 2.0}) > model.predict_one({"f": False, "g": 1.0})


def test_max_features_caps_the_columns() -> None:
    model = LeadModel(max_features=3)
    model.learn_many([{f"c{i}": float(i) for i in range(10)}, {"c0": 1.0, "k": "v"}], [1, 0])
    assert model.feature_names == ["c0", "c1", "c2"]


def test_rejects_bad_labels_and_parameters() -> None:
    model = LeadModel()
    with pytest.raises(ValueError, match="0 or 1"):
        model.learn_many([{"a": 1.0}], [2])
    with pytest.raises(ValueError, match="labels"):
        model.learn_many([{"a": 1.0}, {"a": 2.0}], [1])
    model.learn_many([], [])
    assert model.examples_seen == 0
    for bad in ({"l2": 0}, {"forget_half_life": 0}, {"clip": 0}, {"newton_steps": 0}):
        with pytest.raises(ValueError):
            LeadModel(**bad)


def test_bytes_round_trip_keeps_everything() -> None:
    model = LeadModel(horizon_s=3 * 86400.0)
    xs, ys = logistic_data(500, seed=13)
    fit(model, xs, ys)
    model.version = 7
    clone = LeadModel.from_bytes(model.to_bytes())
    assert clone.version == 7 and clone.examples_seen == 500 and clone.horizon_s == 3 * 86400.0
    assert np.array_equal(clone.predict_many(xs), model.predict_many(xs))
    fit(clone, xs, ys)  # keeps learning where it stopped
    assert clone.examples_seen == 1000
    with pytest.raises(TypeError):
        LeadModel.from_bytes(pickle.dumps({"not": "a model"}))


def test_fast_enough_for_engine_batches() -> None:
    """Target: < 20 us/example to learn, less to score, on batches of 1000 feature vectors."""
    model = LeadModel()
    xs = profile_like(1000, seed=14)
    ys = [int(x["log_orders"] > 5) for x in xs]
    model.learn_many(xs, ys)

    def best(fn: Any) -> float:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times) / len(xs) * 1e6

    learn_us = best(lambda: model.learn_many(xs, ys))
    score_us = best(lambda: model.predict_many(xs))
    print(f"learn {learn_us:.1f} us/example, score {score_us:.1f} us/example")
    assert learn_us < 20
    assert score_us < learn_us
