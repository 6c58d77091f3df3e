"""Lead-score quality on UCI bank marketing, and the progressive-validation bookkeeping."""

from __future__ import annotations

import importlib.util
import math
import time

import numpy as np
import pytest
from river import drift

from models.evaluation import ProgressiveValidator, roc_auc
from models.lead import LeadModel
from models.lead_eval import evaluate_bank_marketing, load_bank_marketing
from tests.conftest import DATASETS

BANK = DATASETS / "uci_bank_marketing" / "bank-additional-full.csv"
needs_bank = pytest.mark.skipif(not BANK.exists(), reason=f"dataset not found: {BANK}")
needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None,
    reason="scikit-learn not installed (optional extra, needed for the gradient-boosting baseline)",
)


@needs_bank
@needs_sklearn
def test_online_lead_model_is_close_to_the_batch_baseline() -> None:
    start = time.perf_counter()
    r = evaluate_bank_marketing(BANK, seed=0)
    elapsed = time.perf_counter() - start
    print(
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, f"{elapsed:.1f}s"
    )
    assert r["rows"] == 41188 and r["positives"] == 4640
    assert r["online_auc"] >= 0.78
    assert r["baseline_auc_kfold"] - r["online_auc"] <= 0.03
    # A static model on the future is much worse than the online one on the same rows.
    assert r["online_auc_last20pct"] > r["baseline_auc_chrono"]
    assert elapsed < 120


@needs_bank
def test_loader_drops_the_leaking_column() -> None:
    rows, y = load_bank_marketing(BANK)
    assert "duration" not in rows[0] and "y" not in rows[0]
    assert rows[0]["age"] == 56.0 and rows[0]["job"] == "housemaid"
    assert len(rows) == len(y) == 41188


# --------------------------------------------------------------------------- evaluation


def test_roc_auc_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    p = np.round(rng.random(300), 1)  # many ties
    pos, neg = p[y], p[~y]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert math.isclose(roc_auc(y, p), pairs, rel_tol=1e-12)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_validator_windows_and_counts() -> None:
    v = ProgressiveValidator(window_size=100)
    assert v.snapshot()["rolling_auc"] is None and v.logloss is None
    rng = np.random.default_rng(1)
    y = (rng.random(1000) < 0.4).astype(int)
    p_bad = rng.random(1000)
    v.update_many(y[:900], p_bad[:900])
    good = np.where(y[900:] == 1, 0.9, 0.1)
    v.update_many(y[900:], good)  # the last window is perfectly ranked
    s = v.snapshot()
    assert s["examples"] == 1000 and s["positives"] == int(y.sum())
    assert s["rolling_auc"] == 1.0
    assert math.isclose(s["rolling_logloss"], -math.log(0.9), rel_tol=1e-9)
    assert s["logloss"] > s["rolling_logloss"]
    assert v.update(1, 0.9) is False and v.examples == 1001
    # A batch longer than the window keeps only its last window_size examples.
    v.update_many(np.ones(250), np.full(250, 0.6))
    assert v.rolling_auc is None


def test_validator_detects_a_drift_in_the_error_stream() -> None:
    v = ProgressiveValidator(drift_detector=drift.ADWIN())
    rng = np.random.default_rng(2)
    y = (rng.random(4000) < 0.5).astype(int)
    good = np.where(y == 1, 0.8, 0.2)
    v.update_many(y[:2000], good[:2000])
    assert v.drifts == 0
    detected = v.update_many(y[2000:], 1.0 - good[2000:])  # the model is suddenly wrong
    assert detected >= 1 and v.drifts == detected and v.drift_detected
    v.update_many([], [])
    assert v.drift_detected is False and v.snapshot()["drifts"] == detected


def test_score_then_learn_scores_before_learning() -> None:
    model = LeadModel()
    v = ProgressiveValidator()
    xs = [{"a": 1.0}, {"a": 0.0}] * 50
    ys = [1, 0] * 50
    first = v.score_then_learn(model, xs, ys)
    assert np.all(first == 0.5)  # an untrained model scored the batch
    assert model.examples_seen == 100
    second = v.score_then_learn(model, xs, ys)
    assert second[0] > 0.5 > second[1]
