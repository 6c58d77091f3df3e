"""Unit tests for models.offpolicy: estimators on synthetic logs with a known target value."""

from __future__ import annotations

import numpy as np
import pytest

from models import offpolicy as op

N_ACTIONS = 4


def synthetic(n: int = 20_000, seed: int = 0) -> dict[str, np.ndarray | float]:
    """Two user kinds, 4 actions, a non-uniform logger, a stochastic target; true value known."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 2, n)
    means = np.array([[0.10, 0.30, 0.05, 0.20], [0.40, 0.05, 0.15, 0.10]])  # (kind, action)
    logger = np.array([[0.4, 0.1, 0.3, 0.2], [0.1, 0.5, 0.2, 0.2]])
    target = np.array([[0.05, 0.8, 0.05, 0.1], [0.7, 0.1, 0.1, 0.1]])
    cum = logger[kind].cumsum(axis=1)
    actions = (rng.random(n)[:, None] > cum).sum(axis=1)
    rewards = (rng.random(n) < means[kind, actions]).astype(float)
    truth = float(((target * means).sum(axis=1) * 0.5).sum())  # kinds are equally likely
    pi_all = target[kind]
    return {
        "rewards": rewards,
        "logged": logger[kind, actions],
        "target": pi_all[np.arange(n), actions],
        "pi_all": pi_all,
        "actions": actions,
        "kind": kind,
        "means": means,
        "truth": truth,
    }


def test_estimators_recover_the_known_value() -> None:
    s = synthetic()
    r, t, mu = s["rewards"], s["target"], s["logged"]
    truth = s["truth"]
    q_true = s["means"][s["kind"]]  # the exact reward model
    n = len(r)
    q_a, q_pi = q_true[np.arange(n), s["actions"]], (s["pi_all"] * q_true).sum(axis=1)
    est = op.evaluate(r, t, mu, predicted=q_a, expected_predicted=q_pi, n_resamples=300)
    for name in ("ips", "snips", "dr"):
        assert abs(est[name] - truth) < 0.015, (name, est[name], truth)
        lo, hi = est["ci95"][name]
        assert lo < truth < hi, (name, lo, hi, truth)
    # A good reward model shrinks the interval.
    width = {k: v[1] - v[0] for k, v in est["ci95"].items()}
    assert width["dr"] < width["ips"]
    assert abs(est["mean_weight"] - 1.0) < 0.03
    assert 0 < est["ess"] <= n
    assert est["ips"] == op.ips(r, t, mu) and est["snips"] == op.snips(r, t, mu)


def test_doubly_robust_survives_a_wrong_reward_model() -> None:
    s = synthetic(seed=1)
    n = len(s["rewards"])
    wrong = np.full((n, N_ACTIONS), 0.5)
    value = op.dr(
        s["rewards"], s["target"], s["logged"], wrong[:, 0], (s["pi_all"] * wrong).sum(axis=1)
    )
    assert abs(value - s["truth"]) < 0.02


def test_cross_fitted_action_means_never_see_their_own_round() -> None:
    s = synthetic(seed=2)
    q = op.cross_fit_action_means(s["actions"], s["rewards"], N_ACTIONS, folds=2, seed=3)
    assert q.shape == (len(s["rewards"]), N_ACTIONS)
    n = len(s["rewards"])
    value = op.dr(
        s["rewards"], s["target"], s["logged"],
        q[np.arange(n), s["actions"]], (s["pi_all"] * q).sum(axis=1),
    )  # fmt: skip
    assert abs(value - s["truth"]) < 0.015
    one = op.cross_fit_action_means([0, 1], [1.0, 0.0], 2, folds=2, seed=0)
    assert np.all((one >= 0) & (one <= 1))
    means = op.action_means([0, 0, 1], [1.0, 1.0, 0.0], 3, prior_weight=0.0)
    assert means[0] == 1.0 and means[1] == 0.0 and means[2] == pytest.approx(2 / 3)


def test_logging_policy_evaluated_on_itself_is_the_mean_reward() -> None:
    s = synthetic(seed=4)
    r, mu = s["rewards"], s["logged"]
    assert op.ips(r, mu, mu) == pytest.approx(r.mean())
    assert op.snips(r, mu, mu) == pytest.approx(r.mean())


def test_bootstrap_is_seeded_and_covers_the_mean() -> None:
    x = np.random.default_rng(5).random(1000)
    a = op.bootstrap_ci(x, n_resamples=200, seed=7)
    assert a == op.bootstrap_ci(x, n_resamples=200, seed=7)
    assert a != op.bootstrap_ci(x, n_resamples=200, seed=8)
    assert a[0] < x.mean() < a[1]
    lo, hi = op.bootstrap_ci(x, np.full(1000, 2.0), n_resamples=200)
    assert lo < x.mean() / 2 < hi
    assert op.bootstrap_ci([], n_resamples=10) == (0.0, 0.0)


def test_invalid_probabilities_are_refused() -> None:
    with pytest.raises(ValueError):
        op.ips([1.0], [0.5], [0.0])
    with pytest.raises(ValueError):
        op.snips([1.0], [1.5], [0.5])
    with pytest.raises(ValueError):
        op.ips([1.0, 0.0], [0.5], [0.5, 0.5])
    assert op.snips([1.0], [0.0], [0.5]) == 0.0
