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

With `shared_prefix` (the default) the critic runs each state s once and its actions a_j on the
state's keys/values: a value-head critic once, the log-ratio critic (the default one) once through
each of its two language models, its log-ratio sum over the solution split into the state's part
(from the prompt's end to the state's end, once per state) and each action's; the values are the
whole sequences' to float rounding. A model whose keys/values cannot be reused (gradient
checkpointing drops them) is refused with an error that says to turn `advantages.shared_prefix` off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from stepdapo.algorithms import advantage_gap, distinct_actions, keeps_state, state_advantages, value_examples
from stepdapo.config import LabelConfig, RunConfig, to_dict
from stepdapo.errors import StageInputError
from stepdapo.steps import delimiter_token_mask, split_steps
from stepdapo.models import check_critic, critic_values, is_log_ratio_critic, load_critic, model_fingerprint
from stepdapo.logprobs import LOGITS_CHUNK, MAX_BATCH_TOKENS
from stepdapo.precision import autocast, training_bf16
from stepdapo.runner import ShardedStage, device, read_stage, stage_fingerprint
from stepdapo.stages.labels import read_labels
from stepdapo.stages.states import IDS

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


def fingerprint(cfg: RunConfig, critic: str | Path | None, labels_dir: str | Path) -> dict:
    return {"critic": model_fingerprint(critic) if critic else None,
            "labels": stage_fingerprint(labels_dir, "labels"),
            "advantages": to_dict(cfg.advantages)}


def action_values(labels: pa.Table, source: str, critic, tokenizer, task, shared_prefix: bool = True,
                  bf16: bool = False, max_batch_tokens: int = MAX_BATCH_TOKENS,
                  logits_chunk: int = LOGITS_CHUNK) -> dict:
    """v(s + a) for every non-terminal sampled action s + a: the critic's value (with `shared_prefix`,
    each state s computed once for all its actions, by both language models of a log-ratio critic:
    `models.critic_values`; in batches of `max_batch_tokens`, under bf16 autocast with `bf16`), or
    (source="mc") the pooled Monte-Carlo value of every rollout through s + a. `critic`: its
    directory, or (model, tokenizer) already loaded."""
    if source == "critic":
        if critic is None:
            raise StageInputError("advantages.source=critic needs a critic directory")
        model, tok = load_critic(critic) if isinstance(critic, (str, Path)) else critic
        model.to(device())
        if is_log_ratio_critic(model):
            model.logits_chunk = logits_chunk
        cols = labels.select(["ids", "action_ids", "action_terminal"]).to_pydict()
        # the log-ratio critic sums over the solution's tokens: it needs where each prompt ends (the
        # state's part of that sum, from there to the state's end, is then computed once per state)
        log_ratio = is_log_ratio_critic(model)
        plens = labels.column("prompt_len").to_pylist() if log_ratio else [None] * len(cols["ids"])
        state_len: dict[tuple, int] = {}  # each distinct s + a -> the length of (the first) s it extends
        prompt_len: dict[tuple, int | None] = {}
        for s, plen, acts, terms in zip(cols["ids"], plens, cols["action_ids"], cols["action_terminal"]):
            for a, term in zip(acts, terms):
                if not term:
                    state_len.setdefault(tuple(s + a), len(s))
                    prompt_len.setdefault(tuple(s + a), plen)
        keys = sorted(state_len)
        with autocast(bf16, device()):
            values = critic_values(model, [list(k) for k in keys], tok.pad_token_id,
                                   prefix_lens=[state_len[k] for k in keys] if shared_prefix else None,
                                   prompt_lens=[prompt_len[k] for k in keys] if log_ratio else None,
                                   max_batch_tokens=max_batch_tokens)
        return dict(zip(keys, values))
    if tokenizer is None:
        raise StageInputError("advantages.source=mc needs the policy's tokenizer")
    is_delim = delimiter_token_mask(tokenizer, task.step_delimiter)
    c = labels.select(["problem_id", "ids", "n_correct", "outcome", "action_ids", "action_terminal",
                       "rollout_ids"]).to_pydict()
    pooled = value_examples(c["problem_id"], c["ids"], c["n_correct"], c["outcome"], c["action_ids"],
                            c["action_terminal"], c["rollout_ids"], step_ends=lambda ids: split_steps(ids, is_delim),
                            action_states=True, rollout_prefixes=True)
    return {e.input_ids: e.target for e in pooled}


def advantage_rows(labels: pa.Table, value_of: dict, c) -> tuple[dict[str, list], dict]:
    """The kept (state, distinct action) rows and the statistics of the labels table (`summarize`
    combines those of several shards)."""
    out: dict[str, list] = {f: [] for f in SCHEMA.names}
    gaps, kept_states = [], 0
    rows = labels.select(["state_index", "problem_id", "ids", "depth", "action_ids", "action_text",
                          "action_terminal", "outcome"]).to_pylist()
    for r in rows:
        # a finishing action is scored by the verifier's reward, never by the critic
        vals = [float(ok) if term else value_of[tuple(r["ids"] + a)]
                for a, term, ok in zip(r["action_ids"], r["action_terminal"], r["outcome"])]
        adv = state_advantages(vals)
        gaps.append(advantage_gap(adv))
        if not keeps_state(adv, c.min_gap):
            continue
        kept_states += 1
        for d in distinct_actions(r["action_ids"], vals, adv, r["outcome"], c.weighting):
            for k, v in (("state_index", r["state_index"]), ("problem_id", r["problem_id"]),
                         ("state_ids", r["ids"]), ("depth", r["depth"]), ("action_ids", list(d.action_ids)),
                         ("action_text", r["action_text"][d.first]), ("terminal", r["action_terminal"][d.first]),
                         ("value", d.value), ("advantage", d.advantage), ("weight", d.weight),
                         ("count", d.count), ("outcome_rate", d.outcome_rate)):
                out[k].append(v)
    return out, {"states": len(rows), "states_kept": kept_states, "gap_sum": float(np.sum(gaps))}


def summarize(table: pa.Table, infos: list[dict], c) -> dict:
    """The statistics of the whole stage from its rows and its shards' counts."""
    states, kept = sum(i["states"] for i in infos), sum(i["states_kept"] for i in infos)
    adv = np.array(table.column("advantage").to_pylist()) if table.num_rows else np.zeros(1)
    return {
        "source": c.source,
        "weighting": c.weighting,
        "shards": len(infos),
        "states": states,
        "states_kept": kept,
        "fraction_kept": kept / max(states, 1),
        "actions_kept": table.num_rows,
        "mean_gap": sum(i["gap_sum"] for i in infos) / states if states else 0.0,
        "advantage_mean": float(adv.mean()),
        "advantage_abs_mean": float(np.abs(adv).mean()),
        "advantage_std": float(adv.std()),
        "advantage_min": float(adv.min()),
        "advantage_max": float(adv.max()),
        "advantage_histogram": np.histogram(adv, bins=20, range=(-1, 1))[0].tolist(),
    }


def run_advantages(cfg: RunConfig, critic: str | Path | None, labels_dir: str | Path, out_dir: str | Path,
                   task, tokenizer=None, progress: bool = True) -> dict:
    """Score every candidate action; write the kept (state, action, advantage) rows to `out_dir`, in
    shards of the labels' own shard size (`label.shard_size` of the run that made them, so the layout
    is fixed by the labels' fingerprint) dealt to the processes: a killed run resumes at the missing
    shards; each process loads the critic once."""
    c = cfg.advantages
    stage = ShardedStage(out_dir, "advantages", SCHEMA, fingerprint(cfg, critic, labels_dir))
    if (done := stage.done()) is not None:
        return done
    labels = read_labels(labels_dir)
    if c.source == "critic" and critic is None:  # checked before the stage is marked started
        raise StageInputError("advantages.source=critic needs a critic directory")
    if c.source == "critic":
        check_critic(critic)  # a broken critic is an error before the stage is marked started
    if c.source == "mc" and tokenizer is None:
        raise StageInputError("advantages.source=mc needs the policy's tokenizer")
    if not any(labels.column("action_ids").to_pylist()):  # e.g. `stepdapo prm import`'s labels: values only
        raise StageInputError(f"{labels_dir}: these labels have no sampled actions (a labels directory from "
                              f"`stepdapo prm import` has values only): the advantages need the label stage's "
                              f"candidate actions")

    labels_fp = stage_fingerprint(labels_dir, "labels")
    made_with = (labels_fp.get("label") if isinstance(labels_fp, dict) else None) or {}
    shard_states = made_with.get("shard_size") or LabelConfig().shard_size
    loaded = []  # this process's critic, loaded for its first shard

    def make_shard(i: int) -> tuple[dict, dict]:
        part = labels.slice(i * shard_states, shard_states)
        if c.source == "critic" and not loaded:
            loaded.append(load_critic(critic))
        values = action_values(part, c.source, loaded[0] if loaded else None, tokenizer, task, c.shared_prefix,
                               training_bf16(cfg.bf16), cfg.max_batch_tokens, cfg.logits_chunk_tokens)
        return advantage_rows(part, values, c)

    n_shards = max(1, -(-labels.num_rows // shard_states))
    return stage.run(n_shards, make_shard, lambda table, infos: summarize(table, infos, c))


def read_advantages(directory: str | Path) -> pa.Table:
    return read_stage(directory, "advantages", SCHEMA)
