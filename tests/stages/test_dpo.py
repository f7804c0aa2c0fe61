"""The outcome-level DPO baseline (stages/dpo.py): its pairs, and a changed input detected. The
behaviours every model stage shares are in test_model_stages.py."""

from pathlib import Path

import pytest
from tiny_stages import CFG, DATA, TINY, run

from stepdapo.config import load_config
from stepdapo.errors import ArtifactError
from stepdapo.stages import dpo
from stepdapo.stages.states import read_solutions, run_states


def test_dpo_baseline_detects_changed_states_with_the_same_pair_count(inputs, tmp_path):
    d, task, scripted = inputs
    n_pairs = len(dpo.dpo_pairs(read_solutions(d / "states"), CFG.dpo.pairs_per_problem))

    def other_states(seed: int) -> Path:  # the same settings and policy, another seed: other solutions
        cfg = load_config(None, TINY + DATA + [f"seed={seed}"])
        run_states(cfg, "scripted", tmp_path / f"iter-{seed}" / "states", task, progress=False, generator=scripted)
        return tmp_path / f"iter-{seed}"
    changed = next(s for s in map(other_states, range(1, 30))
                   if len(dpo.dpo_pairs(read_solutions(s / "states"), CFG.dpo.pairs_per_problem)) == n_pairs)
    assert read_solutions(changed / "states").column("text") != read_solutions(d / "states").column("text")

    run("dpo", inputs, tmp_path / "dpo")
    with pytest.raises(ArtifactError, match=r"dpo/stepdapo_dpo.json: .*differs in: states.seed"):
        dpo.train(CFG, d / "policy", changed, tmp_path / "dpo", progress=False)
