"""The baselines beside DAPO (stages/step_dpo.py, rft.py, mc_dapo.py): what each trains on, checked
against hand-made tables, and that training moves each model the way its loss says. Skip, refuse,
resume and 2-process behaviour are in test_model_stages.py (step_dpo, rft); the DPO loss itself in
tests/test_losses.py."""

import pyarrow as pa
import pytest
import torch
from tiny_stages import CFG, DATA, TINY, run

from stepdapo.config import load_config
from stepdapo.logprobs import batched_sequence_logprobs
from stepdapo.models import load_policy
from stepdapo.stages import mc_dapo, rft, step_dpo
from stepdapo.stages.advantages import read_advantages
from stepdapo.stages.baselines import BASELINES
from stepdapo.stages.states import read_solutions


def row(state, action, value, state_ids=(1, 2)):
    return {"state_index": state, "state_ids": list(state_ids), "action_ids": list(action), "value": value}


def test_step_pairs_take_the_best_and_the_worst_step_of_each_state():
    rows = [row(0, [5], 0.2), row(0, [6], 0.9), row(0, [7], 0.0), row(0, [8], 0.9),  # best: the first 0.9
            row(1, [5], 0.5), row(1, [6], 0.5),                                      # all equal: no pair
            row(2, [9], 1.0, (3,)), row(2, [4], 0.25, (3,))]
    pairs = step_dpo.step_pairs(rows)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [([1, 2], [6], [7]), ([3], [9], [4])]
    assert [p["gap"] for p in pairs] == pytest.approx([0.9, 0.75])


def test_rft_takes_each_distinct_correct_finished_solution_once():
    table = pa.Table.from_pylist([
        {"problem_id": "a", "prompt_ids": [1], "solution_ids": [4, 2], "correct": True, "finish": "eos"},
        {"problem_id": "a", "prompt_ids": [1], "solution_ids": [4, 2], "correct": True, "finish": "eos"},  # repeat
        {"problem_id": "a", "prompt_ids": [1], "solution_ids": [5, 2], "correct": False, "finish": "eos"},
        {"problem_id": "a", "prompt_ids": [1], "solution_ids": [6, 6], "correct": True, "finish": "length"},  # cut
        {"problem_id": "b", "prompt_ids": [1], "solution_ids": [4, 2], "correct": True, "finish": "eos"},  # other problem
    ])
    assert [(e["input_ids"], e["prompt_len"], e["problem_id"]) for e in rft.rft_examples(table)] == [
        ([1, 4, 2], 1, "a"), ([1, 4, 2], 1, "b")]
    assert len(rft.rft_examples(table, distinct=False)) == 3


def test_mc_dapo_uses_the_same_monte_carlo_advantages_as_the_ablation(inputs, tmp_path):
    """The baseline's advantages are exactly `advantages.source: mc` on the same labels (the inputs'
    advantages were made that way), and its actor takes mc_dapo's beta and lr where given."""
    d = inputs[0]
    cfg = load_config(None, TINY + DATA[:-1] + ["actor.epochs=1", "mc_dapo.beta=0.7"])  # DAPO itself: critic
    assert BASELINES["mc_dapo"].cannot_train(cfg, d) is None
    assert "same run" in BASELINES["mc_dapo"].cannot_train(CFG, d)  # CFG's DAPO already uses MC advantages
    adv = mc_dapo.mc_advantages(cfg, d / "policy", d)
    assert adv == d / "mc-advantages"
    assert read_advantages(adv).to_pylist() == read_advantages(d / "advantages").to_pylist()
    assert mc_dapo.actor_config(cfg).actor.beta == 0.7 and mc_dapo.actor_config(cfg).actor.lr == cfg.actor.lr
    summary = mc_dapo.train(cfg, d / "policy", d, tmp_path / "mc_dapo", progress=False)
    assert summary["actions"] == len(read_advantages(adv))


def logprobs(model_dir, pairs, key):
    model, tok = load_policy(model_dir)
    with torch.no_grad():
        return torch.tensor(batched_sequence_logprobs(model, [p["prompt"] for p in pairs], [p[key] for p in pairs],
                                                      tok.pad_token_id))


def test_step_dpo_training_raises_the_chosen_step_over_the_rejected(inputs, tmp_path):
    """After Step-DPO the margin (log-ratio of the chosen step - that of the rejected one) is positive
    on most pairs: a swapped pair or sign would make it negative."""
    d = inputs[0]
    cfg = load_config(None, TINY + DATA + ["step_dpo.epochs=20", "step_dpo.lr=3e-3", "step_dpo.beta=1.0"])
    summary = run("step_dpo", inputs, tmp_path / "step_dpo", cfg)
    pairs = step_dpo.step_pairs(read_advantages(d / "mc-advantages").to_pylist())
    assert summary["pairs"] == len(pairs) > 10
    margin = ((logprobs(tmp_path / "step_dpo", pairs, "chosen") - logprobs(d / "policy", pairs, "chosen"))
              - (logprobs(tmp_path / "step_dpo", pairs, "rejected") - logprobs(d / "policy", pairs, "rejected")))
    assert (margin > 0).float().mean() > 0.8 and margin.mean() > 1.0, margin


def test_rft_training_raises_the_likelihood_of_the_correct_samples(inputs, tmp_path):
    d = inputs[0]
    cfg = load_config(None, TINY + DATA + ["rft.epochs=5", "rft.lr=3e-3"])
    summary = run("rft", inputs, tmp_path / "rft", cfg)
    examples = rft.rft_examples(read_solutions(d / "states"))
    assert summary["solutions"] == len(examples) > 5
    pairs = [{"prompt": e["input_ids"][:e["prompt_len"]], "solution": e["input_ids"][e["prompt_len"]:]}
             for e in examples]
    gain = logprobs(tmp_path / "rft", pairs, "solution") - logprobs(d / "policy", pairs, "solution")
    assert gain.mean() > 0.5 and (gain > 0).float().mean() > 0.8, gain


def test_a_baseline_with_nothing_to_learn_says_why(inputs, monkeypatch):
    d = inputs[0]
    assert step_dpo.cannot_train(CFG, d) is None and rft.cannot_train(CFG, d) is None
    labels, solutions = step_dpo.read_labels(d / "labels"), read_solutions(d / "states")
    # every rollout ended alike (all wrong): no state has a right and a wrong step; no correct solution
    monkeypatch.setattr(step_dpo, "read_labels", lambda _: labels.set_column(
        labels.schema.get_field_index("outcome"), "outcome",
        pa.array([[False] * len(o) for o in labels.column("outcome").to_pylist()], pa.list_(pa.bool_()))))
    monkeypatch.setattr(rft, "read_solutions", lambda _: solutions.set_column(
        solutions.schema.get_field_index("correct"), "correct", pa.array([False] * len(solutions))))
    assert "no (right, wrong) step pair" in step_dpo.cannot_train(CFG, d)
    assert "nothing to fine-tune on" in rft.cannot_train(CFG, d)
