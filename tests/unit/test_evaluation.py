"""Progressive validation's drift detector: River's ADWIN, without the rest of river.drift."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

from models.evaluation import ProgressiveValidator

WORKER_IMPORTS = textwrap.dedent(
    """
    import json, sys
    import streams.app, streams.cli, streams.worker
    from models.evaluation import ProgressiveValidator, adwin_class

    validator = ProgressiveValidator()
    detector = type(validator.drift_detector)
    heavy = [m for m in ("river.drift", "scipy.stats", "sklearn") if m in sys.modules]
    import river.base
    import river.drift  # a later import of the package serves the class already loaded

    print(json.dumps({
        "heavy": heavy,
        "class": f"{detector.__module__}.{detector.__qualname__}",
        "river_detector": issubclass(detector, river.base.DriftDetector),
        "same_class": river.drift.ADWIN is detector is adwin_class(),
    }))
    """
)


def test_the_worker_gets_rivers_adwin_without_scipy_or_sklearn() -> None:
    """river.drift's package imports scipy.stats and scikit-learn (about 100 MiB resident in
    every worker); the worker's modules and a validator load River's ADWIN alone."""
    done = subprocess.run(
        [sys.executable, "-c", WORKER_IMPORTS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {
        "heavy": [],
        "class": "river.drift.adwin.ADWIN",
        "river_detector": True,
        "same_class": True,
    }


def test_the_validator_detects_a_jump_in_its_errors() -> None:
    """A model right for 2,000 examples and then wrong: the detector fires after the flip."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 4000)
    p = np.where(y == 1, 0.9, 0.1)
    p[2000:] = 1.0 - p[2000:]
    validator = ProgressiveValidator()
    before = sum(validator.update_many(y[i : i + 100], p[i : i + 100]) for i in range(0, 2000, 100))
    after = sum(
        validator.update_many(y[i : i + 100], p[i : i + 100]) for i in range(2000, 4000, 100)
    )
    assert before == 0 and after >= 1 and validator.drifts == after
