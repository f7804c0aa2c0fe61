"""`stepdapo actor` (stage 5): train the policy with the DAPO loss against the frozen pi_ref.

    L(theta) = 1/2 * E_{s,a} [ (A(s,a)/beta - (log pi_theta(a|s) - log pi_ref(a|s)))^2 ]

- log pi(a|s) is summed over the action's tokens, computed on exactly the sampled token ids;
- log pi_ref(a|s) is computed ONCE, before training, with the same forward pass as the policy's and
  at the trainers' precision (bf16 autocast when `bf16`), so the log-ratio starts at 0 up to float
  noise; split over the processes by state, each process's share cached in the stage's work dir
  (`ref_logprobs.<rank>-of-<n>.json`, kept by a killed run) and handed to every process;
- a training item is a whole state: every action of a state lands in the same batch, where the
  state is computed once for all of them (`shared_prefix`: its keys/values reused by each action,
  its gradient the sum over them; stepdapo.logprobs.grouped_sequence_logprobs);
- AdamW with betas (0.9, 0.95) and no weight decay, linear schedule, gradient accumulation, all by
  `transformers.Trainer` (and so by accelerate: `accelerate launch` runs it multi-process);
- full fine-tuning or LoRA (peft); LoRA is merged into the saved model;
- the summary's final log-ratios and loss are measured on the saved model (split over the
  processes like the reference's).

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
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from stepdapo.config import ActorConfig, RunConfig, to_dict
from stepdapo.errors import StageInputError
from stepdapo.logprobs import LOGITS_CHUNK, batched_sequence_logprobs, group_pairs, sequence_logprobs
from stepdapo.losses import dapo_loss
from stepdapo.models import check_model_dir, load_policy, model_fingerprint
from stepdapo.precision import autocast, training_bf16
from stepdapo.runner import ModelStage, gather, is_main, on_main, rank, stage_fingerprint, world_size
from stepdapo.stages.advantages import read_advantages
from stepdapo.store import read_json, write_json
from stepdapo.training import MetricsTrainer, check_lora_supported, fit, release_memory, resume_step, train_steps, training_args


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


class DAPOTrainer(MetricsTrainer):
    """A Trainer whose loss is `dapo_loss` on summed action log-probs; it logs the module
    docstring's metrics (the Trainer itself logs loss, grad_norm and learning_rate)."""

    def __init__(self, *args, beta: float, pad_id: int, shared_prefix: bool = True, logits_chunk: int = LOGITS_CHUNK,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.pad_id = pad_id
        self.shared_prefix = shared_prefix  # each state (prompt) once per batch for all its actions
        self.logits_chunk = logits_chunk

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps = sequence_logprobs(model, inputs["prompts"], inputs["completions"], self.pad_id, self.shared_prefix,
                                  self.logits_chunk)
        ref, adv, w = (inputs[k].to(logps.device) for k in ("ref_logps", "advantages", "weights"))
        loss = dapo_loss(logps, ref, adv, self.beta, w)
        with torch.no_grad():
            ratio, target = (logps - ref).float(), adv / self.beta
            self.record(log_ratio=ratio.mean().item(), target=target.abs().mean().item(), corr=_corr(ratio, target))
        return loss


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


def ref_logprobs(stage: ModelStage, model, prompts: list[list[int]], completions: list[list[int]],
                  pad_id: int, dev, shared_prefix: bool, cfg: RunConfig, name: str = "ref_logprobs") -> list[float]:
    """log pi of each (prompt, completion) under the frozen `model` (pi_ref before any update, or the
    saved model), split over the processes by prompt: each scores its share in batches of
    `cfg.max_batch_tokens` tokens at the trainers' precision and caches it in the work dir
    (`<name>.<rank>-of-<n>.json`: a killed run keeps what finished); every rank gets them all."""
    n, r = world_size(), rank()
    _, members = group_pairs(prompts)  # whole prompts to a process: a shared prefix stays shared
    mine = [i for g, m in enumerate(members) if g % n == r for i in m]
    cache = stage.work_dir / f"{name}.{r}-of-{n}.json"  # the work dir is this fingerprint's
    if cache.is_file():
        part = read_json(cache)
    else:
        with autocast(training_bf16(cfg.bf16), dev):
            part = batched_sequence_logprobs(model.to(dev), [prompts[i] for i in mine],
                                             [completions[i] for i in mine], pad_id, shared_prefix=shared_prefix,
                                             max_batch_tokens=cfg.max_batch_tokens,
                                             logits_chunk=cfg.logits_chunk_tokens)
        write_json(cache, part)
    out = [0.0] * len(prompts)
    for idx, values in gather((mine, part)):
        for i, v in zip(idx, values):
            out[i] = v
    return out


def run_actor(cfg: RunConfig, policy: str | Path, adv_dir: str | Path, out_dir: str | Path,
              progress: bool = True) -> dict:
    """Train pi_theta from pi_ref = `policy` on the advantages; save the new policy to `out_dir`
    (skipped when done; a killed run resumes from its last checkpoint). Every process of a
    data-parallel run calls this; the reference and final log-probs are split over them."""
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
                             gradient_checkpointing=cfg.gradient_checkpointing,
                             progress=progress, run_name=str(stage.dir))
        ref = ref_logprobs(stage, model, prompts, actions, tok.pad_token_id, args.device, c.shared_prefix, cfg)
        for r, lp in zip(rows, ref):
            r["ref_logprob"] = lp
        items = group_by_state(rows)
        model.train()
        trainer = DAPOTrainer(model=_with_lora(model, c), args=args, train_dataset=items,
                              data_collator=_StateCollator(), beta=c.beta, pad_id=tok.pad_token_id,
                              shared_prefix=c.shared_prefix, logits_chunk=cfg.logits_chunk_tokens)
        check_lora_supported(trainer, c.lora_r > 0)
        resume = stage.last_checkpoint()
        if is_main():  # measured on a model an earlier, killed attempt saved: not this one's
            for f in stage.work_dir.glob("final_logprobs.*"):
                f.unlink()
        result = fit(trainer, tok, stage.model_dir, cfg.report_to, resume)
        log, processes = trainer.state.log_history, trainer.args.world_size
        del trainer, model
        release_memory()

        # where the log-ratios ended, against their targets A/beta: on the saved model (what is published,
        # however training was sharded), every process its share
        final = ref_logprobs(stage, load_policy(stage.model_dir)[0], prompts, actions, tok.pad_token_id, args.device,
                             c.shared_prefix, cfg, name="final_logprobs")
        release_memory()

        def final_summary() -> dict:
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
            # tokens trained: each state once per pass with its actions (unpadded), times the passes
            "tokens": c.epochs * sum(len(it["state_ids"]) + sum(len(a["action_ids"]) for a in it["actions"])
                                     for it in items),
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
