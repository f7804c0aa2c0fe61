from collections import defaultdict

import pytest
from scripted import ScriptedArithmeticPolicy

from stepdapo.config import load_config
from stepdapo.models import char_tokenizer
from stepdapo.stages.advantages import read_advantages, run_advantages
from stepdapo.stages.labels import read_labels, run_labels
from stepdapo.stages.states import run_states
from stepdapo.tasks.arithmetic import ArithmeticTask


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    d = tmp_path_factory.mktemp("adv")
    cfg = load_config(None, ["states.n_problems=30", "label.rollouts=16"])
    task = ArithmeticTask(cfg.task.arithmetic)
    tok = char_tokenizer()
    policy = ScriptedArithmeticPolicy(task, tok, 0.3)
    run_states(cfg, "scripted", d / "s", task, progress=False, generator=policy)
    run_labels(cfg, "scripted", d / "s", d / "l", task, progress=False, generator=policy)
    return d, task, tok, policy


@pytest.mark.parametrize("weighting", ["count", "unique"])
def test_mc_advantages(labelled, weighting):
    d, task, tok, policy = labelled
    cfg = load_config(None, ["advantages.source=mc", f"advantages.weighting={weighting}", "advantages.min_gap=0.1"])
    out = d / f"a-{weighting}"
    summary = run_advantages(cfg, None, d / "l", out, task, tokenizer=tok, progress=False)
    rows = read_advantages(out).to_pylist()
    labels = {r["state_index"]: r for r in read_labels(d / "l").to_pylist()}
    by_state = defaultdict(list)
    for r in rows:
        by_state[r["state_index"]].append(r)
    assert summary["states_kept"] == len(by_state) > 0
    for si, acts in by_state.items():
        lab = labels[si]
        assert sum(a["count"] for a in acts) == len(lab["action_ids"])  # every sample accounted for
        assert len({tuple(a["action_ids"]) for a in acts}) == len(acts)  # distinct actions
        assert max(a["advantage"] for a in acts) - min(a["advantage"] for a in acts) >= 0.1
        # the sibling mean is over all samples: count-weighted advantages sum to zero
        assert abs(sum(a["advantage"] * a["count"] for a in acts)) < 1e-9
        for a in acts:
            assert a["weight"] == (a["count"] if weighting == "count" else 1.0)
            if a["terminal"]:
                assert a["value"] in (0.0, 1.0) and a["value"] == a["outcome_rate"]
            prefix = tok.decode(a["state_ids"][lab["prompt_len"]:], skip_special_tokens=True)
            problem = next(p for p in task.problems("train") if p.id == a["problem_id"])
            right = task.step_is_correct(problem, prefix, a["action_text"])
            wrongs = [b for b in acts if not task.step_is_correct(problem, prefix, b["action_text"])]
            # with exact step semantics, a right step never has a lower MC advantage than a wrong one
            if right and policy.value(tok.decode(a["state_ids"], skip_special_tokens=True)) > 0:
                assert all(a["advantage"] > b["advantage"] for b in wrongs)


def test_critic_source_needs_a_critic(labelled):
    d, task, tok, _ = labelled
    with pytest.raises(ValueError, match="needs a critic"):
        run_advantages(load_config(None), None, d / "l", d / "a-none", task, progress=False)
