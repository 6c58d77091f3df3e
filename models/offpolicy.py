"""Off-policy estimators: the value of a target policy from rounds logged by another policy.

What: given logged rounds (reward ``r_t`` of the logged action ``a_t``, the logging policy's
propensity ``mu_t = mu(a_t | x_t)``, the target policy's probability ``pi_t = pi(a_t | x_t)``),
estimate the target's mean reward per round:

- :func:`ips`: inverse propensity scoring, ``mean(w r)`` with ``w = pi / mu``; unbiased.
- :func:`snips`: self-normalized IPS, ``sum(w r) / sum(w)``; slightly biased, much less variance.
- :func:`dr`: doubly robust, ``mean(q_pi + w (r - q_a))`` with a reward model ``q`` (``q_a`` its
  prediction for the logged action, ``q_pi`` its expectation under the target policy); unbiased
  when either the propensities or the model are right, lower variance when the model is good.
- :func:`bootstrap_ci`: seeded percentile bootstrap over rounds (default 500 resamples).

Why: every offer decision logs its exact propensity, so any candidate policy (or the live bandit
against its control group) can be scored on past traffic without showing it to anyone.

>>> import numpy as np
>>> rewards = np.array([1.0, 0.0, 0.0, 1.0])
>>> logged = np.full(4, 0.5)                # uniform logging over two offers
>>> target = np.array([1.0, 0.0, 1.0, 1.0])  # the target policy's probability of a_t
>>> ips(rewards, target, logged), snips(rewards, target, logged)
(1.0, 0.6666666666666666)
>>> est = evaluate(rewards, target, logged, n_resamples=200)
>>> est["snips"], len(est["ci95"]["snips"])
(0.6666666666666666, 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "action_means",
    "bootstrap_ci",
    "cross_fit_action_means",
    "dr",
    "dr_terms",
    "evaluate",
    "importance_weights",
    "ips",
    "snips",
]

ArrayLike = Sequence[float] | np.ndarray


def importance_weights(target_probs: ArrayLike, logged_probs: ArrayLike) -> np.ndarray:
    """``pi(a_t | x_t) / mu(a_t | x_t)`` per round; logged propensities must be > 0."""
    pi = np.asarray(target_probs, dtype=float)
    mu = np.asarray(logged_probs, dtype=float)
    if pi.shape != mu.shape:
        raise ValueError("target_probs and logged_probs must have the same shape")
    if np.any(mu <= 0) or np.any(mu > 1) or np.any(pi < 0) or np.any(pi > 1):
        raise ValueError("probabilities must be in [0, 1], logged ones > 0")
    return pi / mu


def ips(rewards: ArrayLike, target_probs: ArrayLike, logged_probs: ArrayLike) -> float:
    """Inverse propensity scoring estimate of the target policy's mean reward."""
    w = importance_weights(target_probs, logged_probs)
    return float(np.mean(w * np.asarray(rewards, dtype=float)))


def snips(rewards: ArrayLike, target_probs: ArrayLike, logged_probs: ArrayLike) -> float:
    """Self-normalized IPS: ``sum(w r) / sum(w)`` (0.0 when every weight is 0)."""
    w = importance_weights(target_probs, logged_probs)
    total = w.sum()
    return float((w * np.asarray(rewards, dtype=float)).sum() / total) if total > 0 else 0.0


def dr_terms(
    rewards: ArrayLike,
    target_probs: ArrayLike,
    logged_probs: ArrayLike,
    predicted: ArrayLike,
    expected_predicted: ArrayLike,
) -> np.ndarray:
    """Per-round doubly robust terms ``q_pi + w (r - q_a)`` (their mean is :func:`dr`).

    ``predicted`` is the reward model's prediction for the logged action, ``expected_predicted``
    its expectation under the target policy, ``sum_a pi(a | x_t) q(x_t, a)``.
    """
    w = importance_weights(target_probs, logged_probs)
    r = np.asarray(rewards, dtype=float)
    q_a = np.asarray(predicted, dtype=float)
    q_pi = np.asarray(expected_predicted, dtype=float)
    return q_pi + w * (r - q_a)


def dr(
    rewards: ArrayLike,
    target_probs: ArrayLike,
    logged_probs: ArrayLike,
    predicted: ArrayLike,
    expected_predicted: ArrayLike,
) -> float:
    """Doubly robust estimate of the target policy's mean reward (see :func:`dr_terms`)."""
    return float(
        np.mean(dr_terms(rewards, target_probs, logged_probs, predicted, expected_predicted))
    )


def action_means(
    actions: ArrayLike, rewards: ArrayLike, n_actions: int, *, prior_weight: float = 1.0
) -> np.ndarray:
    """The simplest reward model: each action's mean reward, shrunk toward the overall mean.

    ``(sum of rewards + prior_weight * overall mean) / (count + prior_weight)`` per action (the
    overall mean for an action never taken).
    """
    a = np.asarray(actions, dtype=int)
    r = np.asarray(rewards, dtype=float)
    overall = float(r.mean()) if len(r) else 0.0
    sums = np.bincount(a, weights=r, minlength=n_actions)
    counts = np.bincount(a, minlength=n_actions)
    den = counts + prior_weight
    num = sums + prior_weight * overall
    return np.divide(num, den, out=np.full(n_actions, overall), where=den > 0)


def cross_fit_action_means(
    actions: ArrayLike,
    rewards: ArrayLike,
    n_actions: int,
    *,
    folds: int = 2,
    seed: int = 0,
    prior_weight: float = 1.0,
) -> np.ndarray:
    """Per-round :func:`action_means` predictions (n, n_actions), each fitted on the OTHER folds.

    Cross-fitting keeps a round's own reward out of its model, so :func:`dr` stays unbiased.
    """
    a = np.asarray(actions, dtype=int)
    r = np.asarray(rewards, dtype=float)
    fold = np.random.default_rng(seed).integers(0, folds, size=len(a))
    out = np.empty((len(a), n_actions))
    for f in range(folds):
        test = fold == f
        out[test] = action_means(a[~test], r[~test], n_actions, prior_weight=prior_weight)
    return out


def bootstrap_ci(
    numerator: ArrayLike,
    denominator: ArrayLike | None = None,
    *,
    n_resamples: int = 500,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(numerator) / sum(denominator)`` over rounds.

    With ``denominator`` None it is the mean of ``numerator`` (IPS: ``w r``; DR: its terms);
    SNIPS passes ``w r`` and ``w``. Rounds are resampled with replacement, seeded.
    """
    num = np.asarray(numerator, dtype=float)
    den = np.ones_like(num) if denominator is None else np.asarray(denominator, dtype=float)
    n = len(num)
    if n == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_resamples, chunk):
        m = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(m, n))
        top = num[idx].sum(axis=1)
        bottom = den[idx].sum(axis=1)
        stats[start : start + m] = np.divide(top, bottom, out=np.zeros(m), where=bottom != 0)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(stats, [tail, 100.0 - tail])
    return (float(lo), float(hi))


def evaluate(
    rewards: ArrayLike,
    target_probs: ArrayLike,
    logged_probs: ArrayLike,
    *,
    predicted: ArrayLike | None = None,
    expected_predicted: ArrayLike | None = None,
    n_resamples: int = 500,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """IPS, SNIPS (and DR when a reward model is given) with bootstrap intervals.

    Returns ``n``, ``ips``, ``snips``, ``dr`` (None without a model), ``ci95`` (a dict of
    [lo, hi] per estimator, at ``level``), ``mean_weight`` (near 1 when the propensities are
    right) and ``ess`` (effective sample size ``sum(w)^2 / sum(w^2)``).
    """
    r = np.asarray(rewards, dtype=float)
    w = importance_weights(target_probs, logged_probs)
    wr = w * r
    kw = {"n_resamples": n_resamples, "level": level, "seed": seed}
    out: dict[str, Any] = {
        "n": len(r),
        "ips": float(wr.mean()) if len(r) else 0.0,
        "snips": snips(r, target_probs, logged_probs) if len(r) else 0.0,
        "dr": None,
        "ci95": {"ips": list(bootstrap_ci(wr, **kw)), "snips": list(bootstrap_ci(wr, w, **kw))},
        "mean_weight": float(w.mean()) if len(r) else 0.0,
        "ess": float(w.sum() ** 2 / (w**2).sum()) if (w**2).sum() > 0 else 0.0,
    }
    if predicted is not None and expected_predicted is not None:
        terms = dr_terms(r, target_probs, logged_probs, predicted, expected_predicted)
        out["dr"] = float(terms.mean())
        out["ci95"]["dr"] = list(bootstrap_ci(terms, **kw))
    return out
