"""Progressive validation of a probabilistic classifier, with drift detection on its errors.

What: :class:`ProgressiveValidator` keeps the bookkeeping of "predict, then learn": every
example is scored by the model BEFORE the model learns it, and the (label, probability) pair
updates the metrics: ROC AUC and log loss over the last ``window_size`` examples, log loss
since the start, counts. Each example's log loss also feeds a drift detector (River's
``drift.ADWIN`` by default); ``drifts`` counts detections and ``drift_detected`` says whether
the last update found one. :meth:`ProgressiveValidator.snapshot` returns the metrics as a flat
dict for Prometheus and model snapshots. :func:`roc_auc` is the exact (tie-aware) AUC.

Why: delayed labels make a held-out set stale by construction; progressive validation measures
the model on the traffic it actually scores, and a jump in its error is the drift signal that
can reset the model to the last good snapshot.

>>> v = ProgressiveValidator(window_size=4)
>>> v.update_many([0, 1, 0, 1], [0.1, 0.8, 0.3, 0.6])
0
>>> s = v.snapshot()
>>> s["examples"], s["positives"], s["rolling_auc"], round(s["logloss"], 4)
(4, 2, 1.0, 0.299)
>>> roc_auc([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9])
0.875
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import river

__all__ = ["LOGLOSS_EPS", "ProgressiveValidator", "adwin_class", "roc_auc"]

LOGLOSS_EPS = 1e-15
"""Probabilities are clipped to [eps, 1 - eps] before the log loss (max loss ~34.5)."""


class _Model(Protocol):
    def predict_many(self, xs: Sequence[Any]) -> np.ndarray: ...
    def learn_many(self, xs: Sequence[Any], ys: Sequence[Any]) -> None: ...


class _Detector(Protocol):
    drift_detected: bool

    def update(self, x: float) -> Any: ...


@functools.cache
def adwin_class() -> type:
    """River's ``ADWIN`` class, without importing the rest of ``river.drift``.

    Why: the ``river.drift`` package imports every detector and River's datasets when it is
    imported, and they import scipy.stats (and scikit-learn where it is installed): about
    100 MiB resident in every worker, a tenth of its budget for a million profiles, and a
    second of start-up, for one class. River's ``drift/adwin.py`` itself imports only River's
    base classes and its compiled window, so it is loaded alone, under its own module name:
    a later ``import river.drift`` finds it there and serves the same class. Where that file
    is not (another River layout), or ``river.drift`` is already imported, the package's
    class is used.

    >>> adwin_class().__module__, adwin_class().__name__
    ('river.drift.adwin', 'ADWIN')
    """
    name = "river.drift.adwin"
    if "river.drift" not in sys.modules and name not in sys.modules:
        path = Path(river.__file__).parent / "drift" / "adwin.py"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is not None and spec.loader is not None and path.is_file():
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
                return module.ADWIN
            except Exception:
                del sys.modules[name]
    from river.drift import ADWIN

    return ADWIN


def roc_auc(y_true: Sequence[Any] | np.ndarray, y_prob: Sequence[float] | np.ndarray) -> float:
    """Exact ROC AUC (ties count one half); NaN when only one class is present."""
    y = np.asarray(y_true, dtype=np.float64).reshape(-1) > 0.5
    p = np.asarray(y_prob, dtype=np.float64).reshape(-1)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each tie group
    rank_sum = float(avg_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


class ProgressiveValidator:
    """Predict-then-learn metrics and drift detection for a binary probabilistic model.

    Parameters:
        window_size: examples in the rolling ROC AUC and rolling log loss.
        drift_detector: any River drift detector fed each example's log loss, divided by the
            maximum log loss so it stays in [0, 1]; default River's ``ADWIN()`` (see
            :func:`adwin_class`).
    """

    def __init__(self, *, window_size: int = 1000, drift_detector: _Detector | None = None):
        if window_size < 1:
            raise ValueError("window_size must be >= 1")
        self.window_size = window_size
        self.drift_detector: _Detector = (
            adwin_class()() if drift_detector is None else drift_detector
        )
        self.examples = 0
        self.positives = 0
        self.drifts = 0
        self.drift_detected = False
        self._logloss_sum = 0.0
        self._y = np.zeros(window_size)
        self._p = np.zeros(window_size)
        self._loss = np.zeros(window_size)

    def update(self, y_true: bool | int | float, y_prob: float) -> bool:
        """Record one (label, probability predicted before learning it); True on drift."""
        return self.update_many([y_true], [y_prob]) > 0

    def update_many(
        self, y_true: Sequence[Any] | np.ndarray, y_prob: Sequence[float] | np.ndarray
    ) -> int:
        """Record a batch in order; returns the number of drifts detected in it."""
        y = np.asarray(y_true, dtype=np.float64).reshape(-1)
        p = np.asarray(y_prob, dtype=np.float64).reshape(-1)
        if len(y) != len(p):
            raise ValueError(f"{len(y)} labels but {len(p)} probabilities")
        if len(y) == 0:
            self.drift_detected = False
            return 0
        pc = np.clip(p, LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
        loss = -(y * np.log(pc) + (1.0 - y) * np.log1p(-pc))
        detected = 0
        detector = self.drift_detector
        scale = -math.log(LOGLOSS_EPS)
        for value in (loss / scale).tolist():
            detector.update(value)
            if detector.drift_detected:
                detected += 1
        self.drifts += detected
        self.drift_detected = detected > 0
        self._logloss_sum += float(loss.sum())
        self.positives += int((y > 0.5).sum())
        # ring buffers: position of example k is k % window_size
        w = self.window_size
        idx = (self.examples + np.arange(len(y))) % w
        take = slice(-w, None)  # only the last window_size of a long batch matter
        self._y[idx[take]] = y[take]
        self._p[idx[take]] = p[take]
        self._loss[idx[take]] = loss[take]
        self.examples += len(y)
        return detected

    def score_then_learn(
        self, model: _Model, xs: Sequence[Any], ys: Sequence[Any] | np.ndarray
    ) -> np.ndarray:
        """Score ``xs`` with ``model``, record the scores against ``ys``, then let it learn."""
        probs = np.asarray(model.predict_many(xs), dtype=np.float64)
        self.update_many(ys, probs)
        model.learn_many(xs, ys)
        return probs

    @property
    def logloss(self) -> float | None:
        """Mean log loss since the start (None before any example)."""
        return self._logloss_sum / self.examples if self.examples else None

    @property
    def rolling_auc(self) -> float | None:
        """ROC AUC over the last ``window_size`` examples (None until both classes are in)."""
        n = min(self.examples, self.window_size)
        auc = roc_auc(self._y[:n], self._p[:n])
        return None if math.isnan(auc) else auc

    @property
    def rolling_logloss(self) -> float | None:
        """Mean log loss over the last ``window_size`` examples (None before any example)."""
        n = min(self.examples, self.window_size)
        return float(self._loss[:n].mean()) if n else None

    def snapshot(self) -> dict[str, Any]:
        """The metrics as a flat JSON-friendly dict (None where undefined yet)."""
        return {
            "examples": self.examples,
            "positives": self.positives,
            "logloss": self.logloss,
            "rolling_auc": self.rolling_auc,
            "rolling_logloss": self.rolling_logloss,
            "window_size": self.window_size,
            "drifts": self.drifts,
            "drift_detected": self.drift_detected,
        }
