"""The Step-DPO baseline (Lai et al. 2024, "Step-DPO: Step-wise Preference Optimization for
Long-chain Reasoning of LLMs"): DPO on pairs of next steps after the same state.

Step-DPO prefers a right step to a wrong one after a shared correct prefix. Its pairs here come from
the run's own labels, as DAPO's advantages do: at every labelled state s of iteration 1, each sampled
next step a is valued by the Monte-Carlo rollouts through s + a (the verifier's reward if a ends the
solution), the state is kept when those values differ by at least `advantages.min_gap` (the table
`iter-1/mc-advantages/`, shared with the Monte-Carlo DAPO baseline), and the pair is (the highest-
valued step, the lowest-valued one). The loss is DPO's on the two steps' summed log-probabilities
given s, from the same pi_ref:

    L(theta) = -E [ log sigmoid( beta * ((log pi_theta(a+|s) - log pi_ref(a+|s))
                                         - (log pi_theta(a-|s) - log pi_ref(a-|s))) ) ]

So DAPO and Step-DPO see the same states and values; they differ in what they do with them: DAPO
regresses every sampled step's log-ratio onto its advantage / beta, Step-DPO only orders the best
and the worst step. Config section `step_dpo`; logged metrics as the DPO baseline's (stages/dpo.py).
"""

from __future__ import annotations

from pathlib import Path

from stepdapo.config import RunConfig, to_dict
from stepdapo.errors import StageInputError
from stepdapo.models import check_model_dir, model_fingerprint
from stepdapo.runner import ModelStage, stage_fingerprint
from stepdapo.stages import dpo
from stepdapo.stages.advantages import read_advantages
from stepdapo.stages.labels import read_labels
from stepdapo.stages.mc_dapo import mc_advantages

TITLE = "Step-DPO"


def step_pairs(adv_rows: list[dict]) -> list[dict]:
    """One (highest-valued, lowest-valued) pair of distinct sampled steps per kept state, in the
    table's order; a state whose steps all have one value gives none."""
    by_state: dict[int, list[dict]] = {}
    for r in adv_rows:
        by_state.setdefault(r["state_index"], []).append(r)
    pairs = []
    for rows in by_state.values():
        best = max(rows, key=lambda r: r["value"])  # the first of equals: a fixed order
        worst = min(rows, key=lambda r: r["value"])
        if best["value"] > worst["value"]:
            pairs.append({"prompt": best["state_ids"], "chosen": best["action_ids"], "rejected": worst["action_ids"],
                          "gap": best["value"] - worst["value"]})
    return pairs


def train(cfg: RunConfig, policy: str | Path, iteration: str | Path, out_dir: str | Path,
          progress: bool = True) -> dict:
    """Step-DPO from `policy` on step pairs of the iteration's labels (skipped when done, resumable)."""
    check_model_dir(policy)  # a broken model is an error before anything is read or written
    adv = mc_advantages(cfg, policy, Path(iteration), progress)
    stage = ModelStage(out_dir, "step_dpo", {"policy": model_fingerprint(policy), "step_dpo": to_dict(cfg.step_dpo),
                                             "seed": cfg.seed, "advantages": stage_fingerprint(adv, "advantages")})
    if (done := stage.done()) is not None:
        return done
    pairs = step_pairs(read_advantages(adv).to_pylist())
    if not pairs:
        raise StageInputError(f"{adv}: no state with a right and a wrong sampled step for Step-DPO "
                              f"(none passed advantages.min_gap = {cfg.advantages.min_gap})")
    return dpo.train_pairs(cfg, cfg.step_dpo, policy, pairs, stage, progress)


def cannot_train(cfg: RunConfig, iteration: Path) -> str | None:
    """Why no state can give a pair: no sampled next step ever ends differently from another at the same state."""
    outcomes = read_labels(Path(iteration) / "labels").column("outcome").to_pylist()
    if not any(len(set(o)) > 1 for o in outcomes if o):
        return "no state has sampled next steps whose rollouts end differently: no (right, wrong) step pair"
    return None


def work(cfg: RunConfig, train_shapes: list, n_problems: int, a):
    """A pair per state that passes the gap filter (plan's advantages counts), each pair the state once
    (shared_prefix) and its two steps."""
    from stepdapo.plan import Work, iteration_work, optimizer_steps

    b = cfg.step_dpo
    adv = next(w for w in iteration_work(1, cfg, train_shapes, n_problems, a) if w.stage.endswith("/advantages"))
    pairs = adv.counts["states_kept"]
    # a pair's state and step lengths, averaged over the states as the states stage makes them: the
    # prompt once per problem, each later step prefix once per kept solution (plan.iteration_work)
    weight = tokens_state = tokens_step = 0.0
    for s in train_shapes:
        s = s.cut(cfg.states.max_new_tokens)
        for d in range(len(s.ends)):
            w, e = (1.0 if d == 0 else a.distinct_states * cfg.states.keep_per_problem), (s.ends[d - 1] if d else 0)
            weight, tokens_state, tokens_step = weight + w, tokens_state + w * (s.prompt + e), tokens_step + w * (s.ends[d] - e)
    state, step = tokens_state / weight, tokens_step / weight
    steps = optimizer_steps(pairs / b.batch_size * b.epochs)
    rows = 2 * steps * b.batch_size
    per_pair = (state + 2 * step) if b.shared_prefix else 2 * (state + step)
    return Work("iter-1/step_dpo", sequences_trained=rows, trained_tokens=steps * b.batch_size * per_pair,
                forward_tokens=pairs * per_pair, upper_bound=a.gap_kept == 1.0,
                notes=[f"{pairs:,.0f} step pairs (a state that passes advantages.min_gap each) x {b.epochs:g} epochs"],
                counts={"pairs": pairs, "steps": steps})
