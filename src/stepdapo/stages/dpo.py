"""The outcome-level DPO baseline: DPO (Rafailov et al. 2023) on (correct, incorrect) pairs of the
solutions pi_ref sampled in iteration 1's states stage, from the same pi_ref, to compare with DAPO at
equal data. Its config section is `dpo` (`DPOConfig`); it runs when `baselines` lists "dpo".

    L(theta) = -E [ log sigmoid( beta * ((log pi_theta(y+|x) - log pi_ref(y+|x))
                                         - (log pi_theta(y-|x) - log pi_ref(y-|x))) ) ]

log pi is summed over the solution's tokens (stepdapo.logprobs), log pi_ref computed once before
training, split over the processes (as the actor's); the optimizer and schedule are the actor's, without warmup.

Logged training metrics (in the summary's `log`, and to the trackers in `report_to`):
  loss              the DPO loss;
  log_ratio_margin  mean chosen minus rejected log-ratio to pi_ref;
  grad_norm         the gradient norm before clipping, of the logged step;
  learning_rate     the scheduled learning rate of the logged step.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from stepdapo.config import RunConfig, to_dict
from stepdapo.errors import StageInputError
from stepdapo.logprobs import LOGITS_CHUNK, sequence_logprobs
from stepdapo.losses import dpo_loss
from stepdapo.models import check_model_dir, load_policy, model_fingerprint
from stepdapo.precision import training_bf16
from stepdapo.runner import ModelStage, stage_fingerprint
from stepdapo.stages.actor import ref_logprobs
from stepdapo.stages.states import read_solutions
from stepdapo.training import MetricsTrainer, fit, resume_step, train_steps, training_args

TITLE = "DPO baseline"  # its rows in the report


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


class OutcomeDPOTrainer(MetricsTrainer):
    """A Trainer whose loss is `dpo_loss` on (chosen, rejected) solutions' summed log-probs; it logs
    the module docstring's metrics."""

    def __init__(self, *args, beta: float, pad_id: int, shared_prefix: bool = True, logits_chunk: int = LOGITS_CHUNK,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.beta, self.pad_id, self.shared_prefix, self.logits_chunk = beta, pad_id, shared_prefix, logits_chunk

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps = sequence_logprobs(model, inputs["prompts"], inputs["completions"], self.pad_id, self.shared_prefix,
                                  self.logits_chunk)
        ref = inputs["ref_logps"].to(logps.device)
        n = len(logps) // 2
        loss = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.beta)
        with torch.no_grad():
            margin = ((logps[:n] - ref[:n]) - (logps[n:] - ref[n:])).mean().item()
        self.record(log_ratio_margin=margin)
        return loss


def train(cfg: RunConfig, policy: str | Path, iteration: str | Path, out_dir: str | Path,
          progress: bool = True) -> dict:
    """Train the outcome-level DPO baseline from `policy` on pairs of the solutions that iteration
    directory `iteration`'s states stage sampled (skipped when done; a killed run resumes from its
    last checkpoint)."""
    b, states_dir = cfg.dpo, Path(iteration) / "states"
    stage = ModelStage(out_dir, "dpo", {"policy": model_fingerprint(policy), "dpo": to_dict(b),
                                        "seed": cfg.seed, "states": stage_fingerprint(states_dir, "states")})
    if (done := stage.done()) is not None:  # before reading the solutions
        return done
    check_model_dir(policy)  # a broken model is an error before the stage claims its directory
    pairs = dpo_pairs(read_solutions(states_dir), b.pairs_per_problem)
    if not pairs:
        raise StageInputError(f"{states_dir}: no (correct, incorrect) solution pairs for the DPO baseline")
    return train_pairs(cfg, b, policy, pairs, stage, progress)


def train_pairs(cfg: RunConfig, b, policy: str | Path, pairs: list[dict], stage: ModelStage,
                progress: bool = True) -> dict:
    """DPO from `policy` on `pairs` ({"prompt", "chosen", "rejected"} token ids) with the settings `b`
    (beta, lr, epochs, batch_size, shared_prefix: the `dpo` or `step_dpo` section), through `stage`:
    log pi_ref once before training (split over the processes), the actor's optimizer and schedule without warmup.
    The caller has checked `policy` (models.check_model_dir) before reading its data."""
    t0 = time.perf_counter()
    prompts = [p["prompt"] for p in pairs] * 2
    completions = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]

    def work() -> dict:
        model, tok = load_policy(policy)
        args = training_args(stage.checkpoints, steps=train_steps(len(pairs), b.batch_size, b.epochs),
                             batch_size=b.batch_size, batch_key=f"{stage.name}.batch_size", lr=b.lr,
                             adam_betas=(0.9, 0.95), checkpoints=4, bf16=training_bf16(cfg.bf16), seed=cfg.seed,
                             report_to=cfg.report_to, gradient_checkpointing=cfg.gradient_checkpointing,
                             progress=progress, run_name=str(stage.dir))
        ref = ref_logprobs(stage, model, prompts, completions, tok.pad_token_id, args.device, b.shared_prefix, cfg)
        for p, chosen, rejected in zip(pairs, ref[:len(pairs)], ref[len(pairs):]):
            p["ref_chosen"], p["ref_rejected"] = chosen, rejected
        model.train()
        trainer = OutcomeDPOTrainer(model=model, args=args, train_dataset=pairs, data_collator=_PairCollator(),
                                    beta=b.beta, pad_id=tok.pad_token_id, shared_prefix=b.shared_prefix,
                                    logits_chunk=cfg.logits_chunk_tokens)
        resume = stage.last_checkpoint()
        result = fit(trainer, tok, stage.model_dir, cfg.report_to, resume)
        return {"pairs": len(pairs), "steps": args.max_steps,
                # tokens trained: each pair's prompt once and both completions (unpadded), times the passes
                "tokens": b.epochs * sum(len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs), "resumed_from_step": resume_step(resume),
                "processes": trainer.args.world_size, "train_loss": result.training_loss,
                "log": trainer.state.log_history, "seconds": time.perf_counter() - t0, "config": to_dict(b)}

    return stage.run(work)


def cannot_train(cfg: RunConfig, iteration: Path) -> str | None:
    """Why there is no pair in the iteration's states (no correct solution among the sampled ones), or None."""
    if not any(read_solutions(iteration / "states").column("correct").to_pylist()):
        return "no correct solution among the sampled ones: no (correct, incorrect) pair"
    return None


def work(cfg: RunConfig, train: list, n_problems: int, a):
    """Its cost for `stepdapo plan` (plan.Work), from the solutions' shapes `train`."""
    from stepdapo.plan import Work, mean, optimizer_steps, padded_length

    b, S = cfg.dpo, cfg.states
    # a problem with both correct and incorrect kept solutions gives at most keep - 1 pairs
    pairs = n_problems * min(b.pairs_per_problem, S.keep_per_problem - 1) * a.dpo_pairs
    cut = [s.cut(S.max_new_tokens) for s in train]
    lengths = [(s.prompt + s.ends[-1], 1.0) for s in cut]
    steps = optimizer_steps(pairs / b.batch_size * b.epochs)
    rows = 2 * steps * b.batch_size  # chosen and rejected
    if b.shared_prefix:  # the prompt once per pair (or fewer: pairs of one problem in one batch share it)
        trained = (steps * b.batch_size * padded_length([(s.prompt, 1.0) for s in cut], b.batch_size)
                   + rows * padded_length([(s.ends[-1], 1.0) for s in cut], 2 * b.batch_size))
        forward = pairs * mean(s.prompt + 2 * s.ends[-1] for s in cut)
    else:
        trained = rows * padded_length(lengths, 2 * b.batch_size)
        forward = 2 * pairs * mean(v for v, _ in lengths)
    return Work("iter-1/dpo", sequences_trained=rows, trained_tokens=trained, forward_tokens=forward,
                upper_bound=a.dpo_pairs == 1.0, notes=[f"{pairs:,.0f} pairs x {b.epochs:g} epochs"
                                                       + (", each prompt once per pair (shared_prefix)" if b.shared_prefix else "")],
                counts={"pairs": pairs, "steps": steps})
