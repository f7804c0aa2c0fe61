"""Stage 5, the actor: training moves log pi_theta(a|s) - log pi_ref(a|s) toward A(s,a)/beta, the
minimum of the DAPO loss. The behaviours every model stage shares (skip, refuse, resume, LoRA, two
processes) are in test_model_stages.py; the loss itself against a hand-derived reference is in
tests/test_losses.py."""

import numpy as np
import pytest
from tiny_stages import DATA, TINY, run

from stepdapo.config import load_config
from stepdapo.stages.advantages import read_advantages


def test_training_moves_the_log_ratios_toward_their_targets(inputs, tmp_path):
    """At the start every log-ratio is 0, so the loss is 1/2 mean(w (A/beta)^2). After training it is
    much lower and the log-ratios follow A/beta: a sign error (log-ratio pushed against A) or a
    loss that ignored the advantages would leave the loss where it started and the correlation at
    or below 0."""
    cfg = load_config(None, TINY + DATA + ["actor.epochs=30", "actor.lr=3e-3"])
    summary = run("actor", inputs, tmp_path / "actor", cfg)
    rows = read_advantages(inputs[0] / "advantages").to_pylist()
    target = np.array([r["advantage"] for r in rows]) / cfg.actor.beta
    w = np.array([r["weight"] for r in rows])
    start = 0.5 * float(np.sum(w * target ** 2) / np.sum(w))
    assert summary["actions"] == len(rows) > 20
    assert summary["final_loss"] < 0.5 * start, (summary["final_loss"], start)
    assert summary["final_corr_log_ratio_target"] > 0.5
    # the log-ratios moved by the targets' scale, not a rounding error away from 0
    assert summary["final_log_ratio_mean"] == pytest.approx(float(np.mean(summary["scatter"]["log_ratio"])), abs=1e-3)
    assert np.abs(summary["scatter"]["log_ratio"]).mean() > 0.2 * np.abs(target).mean()
