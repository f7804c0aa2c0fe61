"""`stepdapo actor` (stage 5): train the policy with the DAPO loss against the frozen pi_ref.

    L(theta) = 1/2 * E_{s,a} [ (A(s,a)/beta - (log pi_theta(a|s) - log pi_ref(a|s)))^2 ]

- log pi(a|s) is summed over the action's tokens, computed on exactly the sampled token ids;
- log pi_ref(a|s) is computed ONCE, before training, with the same batched forward pass as the
  policy's (so the log-ratio is exactly 0 at the start), on rank 0, cached in the stage's work dir
  (`ref_logprobs.json`, kept by a killed run) and handed to every process;
- a training item is a whole state: every action of a state lands in the same batch, where the
  state is computed once for all of them (`shared_prefix`: its keys/values reused by each action,
  its gradient the sum over them; stepdapo.logprobs.grouped_sequence_logprobs);
- AdamW with betas (0.9, 0.95) and no weight decay, linear schedule, gradient accumulation, all by
  `transformers.Trainer` (and so by accelerate: `accelerate launch` runs it multi-process);
- full fine-tuning or LoRA (peft); LoRA is merged into the saved model;
- the summary's final log-ratios and loss are measured on rank 0 on the saved model.

Logged training metrics (in the summary's `log`, and to the trackers in `report_to`, which show them
as `train/<name>`), means since the previous log except grad_norm and learning_rate:
  loss              the DAPO loss (weighted by the actions' weights);
  log_ratio         mean log pi_theta(a|s) - log pi_ref(a|s) (0 at the start; grows toward A/beta);
  target            mean |A/beta| (the scale the log-ratios are regressed onto);
  corr              Pearson correlation between log-ratio and A/beta across a batch (rises from 0 as
                    the policy moves mass toward high-advantage steps);
  grad_norm         the gradient norm before clipping, of the logged step;
  learning_rate     the scheduled learning rate of the logged step.
On several processes loss and grad_norm cover all of them; log_ratio, target and corr only rank 0's
share of each batch.
The outcome-level DPO baseline (`train_dpo`, `OutcomeDPOTrainer`) logs, likewise:
  loss              the DPO loss;
  log_ratio_margin  mean chosen minus rejected log-ratio to pi_ref;
  grad_norm         the gradient norm before clipping, of the logged step;
  learning_rate     the scheduled learning rate of the logged step.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer

from stepdapo.config import ActorConfig, RunConfig, to_dict
from stepdapo.errors import StageInputError
from stepdapo.logprobs import batched_sequence_logprobs, sequence_logprobs
from stepdapo.losses import dapo_loss, dpo_loss
from stepdapo.models import check_model_dir, load_policy, model_fingerprint
from stepdapo.precision import training_bf16
from stepdapo.runner import ModelStage, is_main, on_main, stage_fingerprint
from stepdapo.stages.advantages import read_advantages
from stepdapo.stages.states import read_solutions
from stepdapo.store import read_json, write_json
from stepdapo.training import (
    check_lora_supported,
    keep_tensorboard_logs,
    release_memory,
    resume_step,
    save_trained,
    train_steps,
    train_then_finish_trackers,
    training_args,
)


def group_by_state(adv_rows: list[dict]) -> list[dict]:
    """One training item per state: its prefix and all its kept actions."""
    items: dict[int, dict] = {}
    for r in adv_rows:
        it = items.setdefault(r["state_index"], {"state_ids": r["state_ids"], "actions": []})
        it["actions"].append({k: r[k] for k in ("action_ids", "advantage", "weight", "ref_logprob")})
    return list(items.values())


class _StateCollator:
    """Flattens a batch of states into (state, action) rows, keeping each state's actions together."""

    def __call__(self, states: list[dict]) -> dict:
        rows = [(s["state_ids"], a) for s in states for a in s["actions"]]
        return {
            "prompts": [p for p, _ in rows],
            "completions": [a["action_ids"] for _, a in rows],
            "advantages": torch.tensor([a["advantage"] for _, a in rows], dtype=torch.float),
            "weights": torch.tensor([a["weight"] for _, a in rows], dtype=torch.float),
            "ref_logps": torch.tensor([a["ref_logprob"] for _, a in rows], dtype=torch.float),
        }


class DAPOTrainer(Trainer):
    """A Trainer whose loss is `dapo_loss` on summed action log-probs; it logs the module
    docstring's metrics (the Trainer itself logs loss, grad_norm and learning_rate)."""

    def __init__(self, *args, beta: float, pad_id: int, shared_prefix: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.pad_id = pad_id
        self.shared_prefix = shared_prefix  # each state (prompt) once per batch for all its actions
        self._metrics: dict[str, list[float]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps = sequence_logprobs(model, inputs["prompts"], inputs["completions"], self.pad_id, self.shared_prefix)
        ref, adv, w = (inputs[k].to(logps.device) for k in ("ref_logps", "advantages", "weights"))
        loss = dapo_loss(logps, ref, adv, self.beta, w)
        with torch.no_grad():
            ratio, target = (logps - ref).float(), adv / self.beta
            self._record(log_ratio=ratio.mean().item(), target=target.abs().mean().item(), corr=_corr(ratio, target))
        return loss

    def _record(self, **kw):
        for k, v in kw.items():
            if v is not None and not math.isnan(v):
                self._metrics.setdefault(k, []).append(v)

    def log(self, logs: dict, *args, **kwargs):
        for k, v in self._metrics.items():  # the means since the last log, like TRL's trainers
            logs[k] = float(np.mean(v))
        self._metrics = {}
        super().log(logs, *args, **kwargs)


def _corr(x: torch.Tensor, y: torch.Tensor) -> float | None:
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def _with_lora(model, c: ActorConfig):
    if c.lora_r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def fingerprint(cfg: RunConfig, policy: str | Path, adv_dir: str | Path) -> dict:
    return {"policy": model_fingerprint(policy), "advantages": stage_fingerprint(adv_dir, "advantages"),
            "actor": to_dict(cfg.actor), "seed": cfg.seed}


def _ref_logprobs(stage: ModelStage, model, prompts: list[list[int]], completions: list[list[int]],
                  pad_id: int, dev, shared_prefix: bool) -> list[float]:
    """log pi_ref of each (prompt, completion), computed once, before any update, on rank 0 and cached
    in the work dir (a killed run keeps it); every rank gets them."""
    def compute() -> list[float]:
        cache = stage.work_dir / "ref_logprobs.json"  # the work dir is this fingerprint's
        if not cache.is_file():
            write_json(cache, batched_sequence_logprobs(model.to(dev), prompts, completions, pad_id,
                                                        shared_prefix=shared_prefix))
        return read_json(cache)

    return on_main(compute)


def _final_logprobs(model_dir: Path, prompts: list[list[int]], completions: list[list[int]], dev,
                    shared_prefix: bool) -> list[float]:
    """log pi_theta of each pair under the saved model (what is published, however training was sharded)."""
    model, tok = load_policy(model_dir)
    return batched_sequence_logprobs(model.to(dev), prompts, completions, tok.pad_token_id,
                                     shared_prefix=shared_prefix)


def run_actor(cfg: RunConfig, policy: str | Path, adv_dir: str | Path, out_dir: str | Path,
              progress: bool = True) -> dict:
    """Train pi_theta from pi_ref = `policy` on the advantages; save the new policy to `out_dir`
    (skipped when done; a killed run resumes from its last checkpoint). Every process of a
    data-parallel run calls this; rank 0 alone computes the reference and final log-probs."""
    stage = ModelStage(out_dir, "actor", fingerprint(cfg, policy, adv_dir))
    if (done := stage.done()) is not None:  # before reading the advantages
        return done
    check_model_dir(policy)  # a broken model is an error before the stage claims its directory
    t0 = time.perf_counter()
    c = cfg.actor
    rows = read_advantages(adv_dir).to_pylist()
    if not rows:
        raise StageInputError(f"{adv_dir}: no state passed the advantage-gap filter; nothing to train on "
                              f"(lower advantages.min_gap or check the critic)")
    prompts, actions = [r["state_ids"] for r in rows], [r["action_ids"] for r in rows]
    n_states = len({r["state_index"] for r in rows})  # the training items

    def work() -> dict:
        model, tok = load_policy(policy)
        # AdamW(0.9, 0.95), no weight decay, linear schedule; 4 checkpoints (a killed actor resumes)
        args = training_args(stage.checkpoints, steps=train_steps(n_states, c.states_per_batch, c.epochs, c.grad_accum),
                             batch_size=c.states_per_batch,
                             batch_key="actor.states_per_batch", grad_accum=c.grad_accum, lr=c.lr,
                             warmup_ratio=c.warmup_ratio, adam_betas=(0.9, 0.95), max_grad_norm=c.max_grad_norm,
                             checkpoints=4, bf16=training_bf16(cfg.bf16), seed=cfg.seed, report_to=cfg.report_to,
                             progress=progress, run_name=str(stage.dir))
        ref = _ref_logprobs(stage, model, prompts, actions, tok.pad_token_id, args.device, c.shared_prefix)
        for r, lp in zip(rows, ref):
            r["ref_logprob"] = lp
        items = group_by_state(rows)
        model.train()
        trainer = DAPOTrainer(model=_with_lora(model, c), args=args, train_dataset=items,
                              data_collator=_StateCollator(), beta=c.beta, pad_id=tok.pad_token_id,
                              shared_prefix=c.shared_prefix)
        check_lora_supported(trainer, c.lora_r > 0)
        resume = stage.last_checkpoint()
        result = train_then_finish_trackers(trainer, cfg.report_to, resume)
        save_trained(trainer, tok, stage.model_dir)
        log, processes = trainer.state.log_history, trainer.args.world_size
        del trainer, model
        release_memory()

        def final_summary() -> dict:  # where the log-ratios ended, against their targets A/beta
            keep_tensorboard_logs(stage.checkpoints, stage.model_dir)
            final = _final_logprobs(stage.model_dir, prompts, actions, args.device, c.shared_prefix)
            adv, weights = [r["advantage"] for r in rows], [r["weight"] for r in rows]
            ratio = np.array(final) - np.array(ref)
            target = np.array(adv) / c.beta
            f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
            final_loss = dapo_loss(f64(final), f64(ref), f64(adv), c.beta, f64(weights))  # weighted, as in training
            return {
                "final_log_ratio_mean": float(ratio.mean()),
                "final_corr_log_ratio_target": (float(np.corrcoef(ratio, target)[0, 1])
                                                if len(rows) > 1 and ratio.std() > 0 else None),
                "final_loss": float(final_loss),
                "scatter": {"target": target.round(4).tolist()[:5000], "log_ratio": ratio.round(4).tolist()[:5000]},
            }

        return {
            "policy": str(policy),
            "states": n_states,
            "actions": len(rows),
            "steps": args.max_steps,
            "resumed_from_step": resume_step(resume),
            "processes": processes,
            "train_loss": result.training_loss,
            **on_main(final_summary),
            "log": log,
            "lora": c.lora_r > 0,
            "seconds": time.perf_counter() - t0,
        }

    return stage.run(work)


# -- the outcome-level DPO baseline ----------------------------------------------------------------

def dpo_pairs(solutions, max_per_problem: int) -> list[dict]:
    """(correct, incorrect) pairs of kept solutions of the same problem, in a fixed order."""
    by_problem: dict[str, dict[bool, list]] = {}
    for r in solutions.to_pylist():
        by_problem.setdefault(r["problem_id"], {True: [], False: []})[r["correct"]].append(r)
    pairs = []
    for groups in by_problem.values():
        good, bad = groups[True], groups[False]
        n = 0
        for i in range(max(len(good), len(bad))):
            if n >= max_per_problem or not good or not bad:
                break
            g, b = good[i % len(good)], bad[i % len(bad)]
            pairs.append({"prompt": g["prompt_ids"], "chosen": g["solution_ids"], "rejected": b["solution_ids"]})
            n += 1
    return pairs


class _PairCollator:
    def __call__(self, pairs: list[dict]) -> dict:
        return {"prompts": [p["prompt"] for p in pairs] * 2,
                "completions": [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                "ref_logps": torch.tensor([p["ref_chosen"] for p in pairs] + [p["ref_rejected"] for p in pairs])}


class OutcomeDPOTrainer(DAPOTrainer):
    """The same trainer with the outcome-level DPO loss on (chosen, rejected) solutions."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps = sequence_logprobs(model, inputs["prompts"], inputs["completions"], self.pad_id, self.shared_prefix)
        ref = inputs["ref_logps"].to(logps.device)
        n = len(logps) // 2
        loss = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.beta)
        with torch.no_grad():
            margin = ((logps[:n] - ref[:n]) - (logps[n:] - ref[n:])).mean().item()
        self._record(log_ratio_margin=margin)
        return loss


def train_dpo(cfg: RunConfig, policy: str | Path, states_dir: str | Path, out_dir: str | Path,
              progress: bool = True) -> dict:
    """Train the outcome-level DPO baseline from `policy` on pairs of the states stage's solutions
    (skipped when done; a killed run resumes from its last checkpoint)."""
    b = cfg.baseline
    stage = ModelStage(out_dir, "dpo", {"policy": model_fingerprint(policy), "baseline": to_dict(b),
                                        "seed": cfg.seed, "states": stage_fingerprint(states_dir, "states")})
    if (done := stage.done()) is not None:  # before reading the solutions
        return done
    check_model_dir(policy)  # a broken model is an error before the stage claims its directory
    t0 = time.perf_counter()
    pairs = dpo_pairs(read_solutions(states_dir), b.pairs_per_problem)
    if not pairs:
        raise StageInputError(f"{states_dir}: no (correct, incorrect) solution pairs for the DPO baseline")
    prompts = [p["prompt"] for p in pairs] * 2
    completions = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]

    def work() -> dict:
        model, tok = load_policy(policy)
        # the actor's optimizer and schedule, no warmup
        args = training_args(stage.checkpoints, steps=train_steps(len(pairs), b.batch_size, b.epochs),
                             batch_size=b.batch_size, batch_key="baseline.batch_size", lr=b.lr,
                             adam_betas=(0.9, 0.95), checkpoints=4, bf16=training_bf16(cfg.bf16), seed=cfg.seed,
                             report_to=cfg.report_to, progress=progress, run_name=str(stage.dir))
        ref = _ref_logprobs(stage, model, prompts, completions, tok.pad_token_id, args.device, b.shared_prefix)
        for p, chosen, rejected in zip(pairs, ref[:len(pairs)], ref[len(pairs):]):
            p["ref_chosen"], p["ref_rejected"] = chosen, rejected
        model.train()
        trainer = OutcomeDPOTrainer(model=model, args=args, train_dataset=pairs, data_collator=_PairCollator(),
                                    beta=b.beta, pad_id=tok.pad_token_id, shared_prefix=b.shared_prefix)
        resume = stage.last_checkpoint()
        result = train_then_finish_trackers(trainer, cfg.report_to, resume)
        save_trained(trainer, tok, stage.model_dir)
        if is_main():
            keep_tensorboard_logs(stage.checkpoints, stage.model_dir)
        return {"pairs": len(pairs), "steps": args.max_steps, "resumed_from_step": resume_step(resume),
                "processes": trainer.args.world_size, "train_loss": result.training_loss,
                "log": trainer.state.log_history, "seconds": time.perf_counter() - t0, "config": to_dict(b)}

    return stage.run(work)
