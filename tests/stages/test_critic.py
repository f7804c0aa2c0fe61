"""Stage 3, the critic: its check (intervals, calibration), what the run does when it fails, its
fingerprint, and a log-ratio critic that finds its reference after the run directory moves. The
behaviours every model stage shares are in test_model_stages.py."""

import json

import numpy as np
import pytest
from tiny_stages import CFG, DATA, TINY

from stepdapo import metrics, models
from stepdapo.config import load_config
from stepdapo.models import char_tokenizer
from stepdapo.stages import critic
from stepdapo.stages.labels import read_labels


def test_log_ratio_critic_finds_its_reference_after_the_run_directory_moves(inputs, tmp_path):
    """The critic stage writes a work directory and renames it: the reference is named relative to
    the published critic, so a moved run directory (policy and critic together) still loads."""
    import shutil

    shutil.copytree(inputs[0] / "policy", tmp_path / "run" / "policy")
    d, task, _ = inputs
    critic.run_critic(CFG, tmp_path / "run" / "policy", d / "labels", tmp_path / "run" / "iter-1" / "critic", task,
                      progress=False)
    meta = json.loads((tmp_path / "run" / "iter-1" / "critic" / models.LogRatioCritic.META).read_text())
    assert meta["reference"] == "../../policy"
    shutil.move(tmp_path / "run", tmp_path / "moved")
    loaded, _ = models.load_critic(tmp_path / "moved" / "iter-1" / "critic")
    assert isinstance(loaded, models.LogRatioCritic) and loaded.reference_path == tmp_path / "moved" / "policy"


def test_check_critic():
    """On point estimates (a summary without intervals): the Brier gain and the sibling ranking."""
    q = {"n": 100, "bce": 0.30, "bce_constant": 0.68, "brier": 0.10, "brier_constant": 0.24, "auc_mc0_vs_positive": 0.96}
    assert critic.check_critic(q, 0.05) is None
    assert critic.check_critic({**q, "brier": 0.20}, 0.05) is not None  # better, but not by enough
    failed = critic.check_critic({**q, "brier": 0.25, "bce": 0.71, "auc_mc0_vs_positive": 0.70}, 0.0)
    assert "0.2500" in failed and "0.2400" in failed and "0.710" in failed and "0.70" in failed
    assert critic.check_critic({"bce": None, "bce_constant": None}, 0.05) is None  # no held-out states
    # the sibling ranking: a good value does not pass a critic that cannot tell right steps from wrong
    ranked = {**q, "step_ranking": {"pairs": 22, "right_above_wrong": 0.50}}
    failed = critic.check_critic(ranked, 0.05, 0.65)
    assert "0.50 of 22" in failed and "right next step" in failed
    assert critic.check_critic(ranked, 0.05, 0.0) is None  # the ranking check off
    assert critic.check_critic({**ranked, "step_ranking": {"pairs": 22, "right_above_wrong": 0.70}}, 0.05, 0.65) is None
    assert critic.check_critic({**ranked, "step_ranking": {"pairs": 19, "right_above_wrong": 0.3}}, 0.05, 0.65) is None
    assert critic.check_critic({**q, "step_ranking": {"pairs": 0, "right_above_wrong": None}}, 0.05, 0.65) is None


def test_check_critic_judges_the_intervals():
    """The check passes a critic whose gain over the constant and sibling ranking are shown (95%
    interval) to be above their thresholds, however small the point estimates: issue 21's critic
    (BCE 0.603 vs 0.651, right>wrong 0.86) missed a fixed 0.05 margin by 0.002 and was thrown away."""
    issue21 = {"n": 300, "bce": 0.603, "bce_constant": 0.651, "brier": 0.190, "brier_constant": 0.215,
               "brier_gain": 0.025, "brier_gain_ci95": [0.016, 0.034], "auc_mc0_vs_positive": 0.82,
               "step_ranking": {"pairs": 60, "right_above_wrong": 0.86, "right_above_wrong_ci95": [0.76, 0.94]}}
    assert critic.check_critic(issue21, 0.0, 0.5) is None
    unsure = critic.check_critic({**issue21, "brier_gain_ci95": [-0.004, 0.05]}, 0.0, 0.5)
    assert "starts at -0.0040" in unsure and "not shown to beat a constant" in unsure
    assert critic.check_critic(issue21, 0.02, 0.5) is not None  # the interval must clear the margin too
    chance = {**issue21, "step_ranking": {"pairs": 60, "right_above_wrong": 0.62, "right_above_wrong_ci95": [0.48, 0.75]}}
    failed = critic.check_critic(chance, 0.0, 0.5)
    assert "interval from 0.48" in failed and "right next step" in failed


def test_grouped_bootstrap_interval_resamples_problems_not_states():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, 400)
    lo, hi = metrics.grouped_bootstrap_interval(x, np.ones(400), np.arange(400))
    half = 1.96 * 2.0 / np.sqrt(400)  # the normal interval of a mean of 400 independent values
    assert lo < x.mean() < hi and (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    # every problem's value repeated 10 times (10 states of one problem that agree): no more evidence,
    # so no narrower an interval; resampling the 4000 states one by one would make it ~3x narrower
    lo10, hi10 = metrics.grouped_bootstrap_interval(np.repeat(x, 10), np.ones(4000), np.repeat(np.arange(400), 10))
    assert (hi10 - lo10) == pytest.approx(hi - lo, rel=0.15)
    # a ratio of sums: pairs per problem weigh by their number
    lo, hi = metrics.grouped_bootstrap_interval([3, 0], [3, 1], ["a", "b"])
    assert 0 <= lo <= 0.75 <= hi <= 1


def test_quality_reports_the_bce_gain_with_its_interval():
    pred, target = [0.9, 0.8, 0.2, 0.1, 0.7, 0.3], [1.0, 1.0, 0.0, 0.0, 0.5, 0.5]
    q = metrics.quality(pred, target, 0.5, groups=["a", "a", "b", "b", "c", "c"])
    for name in ("bce", "brier"):
        assert q[f"{name}_gain"] == pytest.approx(q[f"{name}_constant"] - q[name])
        assert q[f"{name}_gain_ci95"][0] <= q[f"{name}_gain"] <= q[f"{name}_gain_ci95"][1]


def test_platt_calibration_recovers_a_known_map_and_keeps_the_ranking():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 3000)
    v = 1 / (1 + np.exp(-z))  # an overconfident critic: the true values are sigmoid(0.5 z - 0.3)
    truth = 1 / (1 + np.exp(-(0.5 * z - 0.3)))
    assert metrics.fit_platt(v, truth) == pytest.approx((0.5, -0.3), abs=1e-4)
    a, b = metrics.fit_platt(v, (rng.random(3000) < truth).astype(float))  # from 0/1 outcomes: close
    assert abs(a - 0.5) < 0.06 and abs(b + 0.3) < 0.12
    mapped = metrics.apply_platt(v, (a, b))
    assert np.array_equal(np.argsort(mapped, kind="stable"), np.argsort(v, kind="stable"))
    assert metrics.bce(mapped, truth) < metrics.bce(v, truth)
    assert metrics.fit_platt(v, 1 - truth) is None  # values ranked the wrong way: no increasing map helps
    # cross-fitted: each problem's values come from the map fitted on the other half of the problems
    groups = [f"p{i // 3}" for i in range(3000)]
    oof, ab = metrics.cross_fitted_calibration(v, truth, groups)
    assert ab == pytest.approx((0.5, -0.3), abs=1e-4) and metrics.bce(oof, truth) < metrics.bce(v, truth)
    assert metrics.cross_fitted_calibration(v[:10], truth[:10], groups[:10]) == (None, None)  # too few states


def test_a_critic_that_fails_its_check_is_reported_and_replaced_by_mc(tmp_path):
    """A whole tiny run whose critic cannot pass (min_brier_gain 100): the report leads with the
    warning, the advantages came from the Monte-Carlo values, not from the failed critic, and the
    next iteration's critic starts from the new policy (critic.epochs), not from the failed one
    (continue_epochs). The run starts from a given model fine-tuned first (bootstrap.finetune_model),
    to cover that path."""
    from stepdapo.config import TinyModelConfig
    from stepdapo.models import tiny_llama
    from stepdapo.pipeline import run as run_pipeline

    tok = char_tokenizer()
    tiny_llama(tok, TinyModelConfig(hidden_size=32, num_heads=2, num_layers=1, intermediate_size=64),
               seed=3).save_pretrained(tmp_path / "given")
    tok.save_pretrained(tmp_path / "given")
    cfg = load_config(None, TINY + [f"model={tmp_path / 'given'}", "bootstrap.finetune_model=true",
                                    "states.n_problems=30", "label.rollouts=8", "critic.epochs=1",
                                    "critic.heldout_fraction=0.3", "critic.min_brier_gain=1", "actor.epochs=1",
                                    "critic.continue_epochs=2", "eval.limit=40", "eval.samples=1", "eval.k=1",
                                    "iterations=2", "baselines=[]"])
    assert cfg.advantages.source == "critic"
    report = run_pipeline(cfg, tmp_path / "run", progress=False).model_dump(exclude_unset=True)
    assert report["iterations"][0]["model"] == str(tmp_path / "run" / "sft")  # DAPO starts from the fine-tuned model
    assert json.loads((tmp_path / "run" / "sft" / "stepdapo_bootstrap.json").read_text())["base"] == str(tmp_path / "given")
    it = report["iterations"][1]
    assert "not shown to beat a constant" in it["critic"]["warning"] and "Monte-Carlo" in it["critic"]["warning"]
    # a second try first: one more epoch (critic.recovery_epochs) from the failed critic, checked again
    rec = it["critic"]["recovery"]
    assert rec["passed"] is False and rec["epochs"] == 1 and "not shown to beat" in rec["first_check"]
    assert it["critic"]["dir"] == str(tmp_path / "run" / "iter-1" / "critic-more")
    assert it["critic"]["init"] == str(tmp_path / "run" / "iter-1" / "critic")
    assert "also after 1 more epoch" in it["critic"]["warning"]
    assert it["advantages"]["source"] == "mc"
    assert "starts afresh from the new policy" in it["critic"]["warning"]
    it2 = report["iterations"][2]
    first2 = json.loads((tmp_path / "run" / "iter-2" / "critic" / "stepdapo_critic.json").read_text())
    assert first2["init"] == str(tmp_path / "run" / "iter-1" / "actor") and first2["epochs"] == 1
    assert "starts afresh" not in it2["critic"]["warning"]  # no next iteration
    md = (tmp_path / "run" / "report.md").read_text()
    assert md.index("WARNING: critic check failed") < md.index("## Test accuracy")
    assert "## Critic check" in md and "| 1 |" in md


def test_critic_checks_are_not_part_of_its_fingerprint(monkeypatch):
    """Changing a check threshold or the fallback must not throw away a finished critic; changing
    what trains it must."""
    monkeypatch.setattr(critic, "model_fingerprint", lambda p: "init")
    monkeypatch.setattr(critic, "stage_fingerprint", lambda d, name: "labels")
    base = critic.fingerprint(load_config(None), "m", "l")
    for o in ("critic.min_brier_gain=0.2", "critic.min_step_ranking=0", "critic.fallback=critic", "critic.recovery_epochs=3"):
        assert critic.fingerprint(load_config(None, [o]), "m", "l") == base
    assert critic.fingerprint(load_config(None, ["critic.lr=1e-3"]), "m", "l") != base


def test_the_critic_is_judged_calibrated_and_the_map_is_reported(inputs, tmp_path, monkeypatch):
    """critic.calibrate: evaluate_critic fits sigmoid(a logit V + b) on the held-out states and reports
    it with the cross-fitted quality the check judges (`CriticSummary.judged`); the published critic is
    the raw one. Here an underconfident stand-in critic (values sigmoid(0.3 logit target)) makes the
    map's effect known: a slope well above 1, and a better Brier score after it."""
    from stepdapo.steps import delimiter_token_mask
    from stepdapo.summaries import CriticSummary

    d, task, _ = inputs
    cfg = load_config(None, TINY + DATA + ["critic.epochs=1", "critic.heldout_fraction=0.5"])
    labels = read_labels(d / "labels")
    tok = char_tokenizer()
    _, held, train_states = critic.critic_examples(labels, cfg.critic, delimiter_token_mask(tok, "\n"), 0)
    assert len(held) >= metrics.MIN_CALIBRATION_STATES
    target = {tuple(e.input_ids): e.target for e in held + train_states}

    def underconfident(model, sequences, pad_id, **kw):
        t = np.clip([target.get(tuple(x), 0.5) for x in sequences], 0.02, 0.98)
        return (1 / (1 + np.exp(-0.3 * np.log(t / (1 - t))))).tolist()

    monkeypatch.setattr(critic, "critic_values", underconfident)
    m = critic.evaluate_critic(None, tok, train_states, held, labels, task, calibrate=True)
    assert m["calibration"]["a"] > 2 and m["calibration"]["states"] == len(held)
    hc = m["heldout_calibrated"]
    assert hc["brier"] < m["heldout"]["brier"] and hc["brier_gain_ci95"][0] <= hc["brier_gain"] <= hc["brier_gain_ci95"][1]
    assert hc["step_ranking"] == m["heldout"]["step_ranking"]  # an increasing map keeps the ranking
    assert CriticSummary(**m).judged() == hc
    assert CriticSummary(**{**m, "heldout_calibrated": None}).judged() == m["heldout"]
    assert "calibration" not in critic.evaluate_critic(None, tok, train_states, held, labels, task, calibrate=False)
    # the stage reports both (None where no increasing map fits, as for this tiny critic) and
    # publishes the raw critic
    monkeypatch.undo()
    s = critic.run_critic(cfg, d / "policy", d / "labels", tmp_path / "critic", task, progress=False)
    assert "calibration" in s and "heldout_calibrated" in s
    assert not [f for f in (tmp_path / "critic").iterdir() if "calib" in f.name]
