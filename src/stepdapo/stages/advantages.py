"""`stepdapo advantages` (stage 4): an advantage for every candidate action.

At each labelled state s the M sampled first steps a_1..a_M (stage 2) are scored:

    v_j = reward of the finished solution            if a_j ends the solution
        = V_critic(s + a_j)                           otherwise (or, with source="mc", the pooled
                                                      Monte-Carlo value of s + a_j, for ablations)
    A(s, a_j) = v_j - (1/M) * sum_k v_k               (the mean over ALL M samples, duplicates
                                                      included: it estimates E_{a ~ pi_ref}[v])

Identical actions are then merged: `weighting="unique"` keeps each distinct action once (the
paper); `weighting="count"` gives it a weight equal to how often it was sampled, which keeps
sum_a w_a A(s, a) = 0 at every state, so tokens shared by near-miss actions start neutral. A state is
kept only if its advantage gap max A - min A reaches `min_gap`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from stepdapo.config import RunConfig, to_dict
from stepdapo.generation import delimiter_token_mask
from stepdapo.models import model_fingerprint
from stepdapo.stages.critic import critic_examples, critic_values, load_critic
from stepdapo.stages.labels import read_labels
from stepdapo.stages.states import IDS, read_summary
from stepdapo.store import ShardedStage, read_stage, stage_fingerprint

SCHEMA = pa.schema([
    ("state_index", pa.int32()),
    ("problem_id", pa.string()),
    ("state_ids", IDS),
    ("depth", pa.int32()),
    ("action_ids", IDS),
    ("action_text", pa.string()),
    ("terminal", pa.bool_()),
    ("value", pa.float64()),         # v(s + a): critic value, MC value or the verifier's reward
    ("advantage", pa.float64()),
    ("weight", pa.float64()),        # 1 ("unique") or the action's sample count ("count")
    ("count", pa.int32()),           # how often the action was sampled at the state
    ("outcome_rate", pa.float64()),  # fraction of the rollouts beginning with the action that ended correct
])


def state_advantages(values: list[float]) -> list[float]:
    """A_j = v_j - mean(v) over all sampled actions of one state (duplicates included)."""
    mean = sum(values) / len(values)
    return [v - mean for v in values]


def fingerprint(cfg: RunConfig, critic: str | Path | None, labels_dir: str | Path) -> dict:
    return {"critic": model_fingerprint(critic) if critic else None,
            "labels": stage_fingerprint(labels_dir, "labels"),
            "advantages": to_dict(cfg.advantages)}


def run_advantages(cfg: RunConfig, critic: str | Path | None, labels_dir: str | Path, out_dir: str | Path,
                   task, tokenizer=None, progress: bool = True) -> dict:
    """Score every candidate action; write the kept (state, action, advantage) rows to `out_dir`."""
    c = cfg.advantages
    stage = ShardedStage(out_dir, "advantages", SCHEMA, fingerprint(cfg, critic, labels_dir))
    if stage.is_complete():
        return read_summary(out_dir)
    stage.start()
    t0 = time.perf_counter()
    labels = read_labels(labels_dir)
    rows = labels.select(["state_index", "problem_id", "ids", "depth", "action_ids", "action_text",
                          "action_terminal", "outcome"]).to_pylist()

    # v(s + a) for every non-terminal sampled action
    if c.source == "critic":
        if critic is None:
            raise ValueError("advantages.source=critic needs a critic directory")
        model, tok = load_critic(critic)
        keys = sorted({tuple(r["ids"] + a) for r in rows
                       for a, term in zip(r["action_ids"], r["action_terminal"]) if not term})
        value_of = dict(zip(keys, critic_values(model, [list(k) for k in keys], tok.pad_token_id)))
    else:  # Monte-Carlo: pooled outcomes of every rollout through s + a
        if tokenizer is None:
            raise ValueError("advantages.source=mc needs the policy's tokenizer")
        pooled = critic_examples(labels, action_states=True, rollout_prefixes=True,
                                 is_delim=delimiter_token_mask(tokenizer, task.step_delimiter))
        value_of = {tuple(e["input_ids"]): e["target"] for e in pooled}

    out: dict[str, list] = {f: [] for f in SCHEMA.names}
    gaps, kept_states, n_actions = [], 0, 0
    for r in rows:
        vals = [float(ok) if term else value_of[tuple(r["ids"] + a)]
                for a, term, ok in zip(r["action_ids"], r["action_terminal"], r["outcome"])]
        adv = state_advantages(vals)
        gap = max(adv) - min(adv)
        gaps.append(gap)
        if gap < c.min_gap:
            continue
        kept_states += 1
        groups: dict[tuple, list[int]] = defaultdict(list)
        for j, a in enumerate(r["action_ids"]):
            groups[tuple(a)].append(j)
        for a, js in groups.items():  # first-seen order: deterministic
            j = js[0]
            n_actions += 1
            for k, v in (("state_index", r["state_index"]), ("problem_id", r["problem_id"]),
                         ("state_ids", r["ids"]), ("depth", r["depth"]), ("action_ids", list(a)),
                         ("action_text", r["action_text"][j]), ("terminal", r["action_terminal"][j]),
                         ("value", vals[j]), ("advantage", adv[j]),
                         ("weight", float(len(js)) if c.weighting == "count" else 1.0),
                         ("count", len(js)), ("outcome_rate", float(np.mean([r["outcome"][i] for i in js])))):
                out[k].append(v)
    stage.write_shard(0, out)
    adv = np.array(out["advantage"]) if out["advantage"] else np.zeros(1)
    summary = {
        "source": c.source,
        "weighting": c.weighting,
        "states": len(rows),
        "states_kept": kept_states,
        "fraction_kept": kept_states / max(len(rows), 1),
        "actions_kept": n_actions,
        "mean_gap": float(np.mean(gaps)) if gaps else 0.0,
        "advantage_mean": float(adv.mean()),
        "advantage_abs_mean": float(np.abs(adv).mean()),
        "advantage_std": float(adv.std()),
        "advantage_min": float(adv.min()),
        "advantage_max": float(adv.max()),
        "advantage_histogram": np.histogram(adv, bins=20, range=(-1, 1))[0].tolist(),
        "seconds": time.perf_counter() - t0,
    }
    stage.finish(1, summary)
    return summary


def read_advantages(directory: str | Path) -> pa.Table:
    return read_stage(directory, "advantages", SCHEMA)
