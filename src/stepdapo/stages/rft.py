"""The rejection-sampling fine-tuning baseline (RFT; Yuan et al. 2023, "Scaling Relationship on
Learning Mathematical Reasoning with Large Language Models"): supervised fine-tuning of pi_ref on its
own correct samples.

The solutions are those iteration 1's states stage sampled and kept (the same samples DAPO's states
come from); the correct ones that ended on EOS train the model with the bootstrap's SFT loss
(cross-entropy on the solution tokens, the prompt masked), each distinct solution of a problem once
with `rft.distinct` (RFT's deduplication). AdamW with betas (0.9, 0.95) and a linear schedule, as the
actor. Config section `rft`.

Logged training metrics (to the trackers in `report_to`): the Trainer's loss (cross-entropy on the
solution tokens), grad_norm and learning_rate.
"""

from __future__ import annotations

import time
from pathlib import Path

from transformers import Trainer

from stepdapo.config import RunConfig, to_dict
from stepdapo.errors import StageInputError
from stepdapo.models import check_model_dir, load_policy, model_fingerprint
from stepdapo.precision import training_bf16
from stepdapo.runner import ModelStage, stage_fingerprint
from stepdapo.stages.bootstrap import SFTCollator
from stepdapo.stages.states import read_solutions
from stepdapo.training import fit, resume_step, train_steps, training_args

TITLE = "RFT (SFT on pi_ref's correct samples)"


def rft_examples(solutions, distinct: bool = True) -> list[dict]:
    """prompt + solution of every correct kept solution that ended on EOS (each distinct one of a
    problem once with `distinct`), in the table's order; the prompt is masked out of the loss."""
    out, seen = [], set()
    for r in solutions.select(["problem_id", "prompt_ids", "solution_ids", "correct", "finish"]).to_pylist():
        if not r["correct"] or r["finish"] != "eos":
            continue
        key = (r["problem_id"], tuple(r["solution_ids"]))
        if distinct and key in seen:
            continue
        seen.add(key)
        out.append({"input_ids": r["prompt_ids"] + r["solution_ids"], "prompt_len": len(r["prompt_ids"]),
                    "problem_id": r["problem_id"]})
    return out


def train(cfg: RunConfig, policy: str | Path, iteration: str | Path, out_dir: str | Path,
          progress: bool = True) -> dict:
    """Fine-tune `policy` on its correct samples (skipped when done; a killed run resumes from its last
    checkpoint)."""
    b, states_dir = cfg.rft, Path(iteration) / "states"
    stage = ModelStage(out_dir, "rft", {"policy": model_fingerprint(policy), "rft": to_dict(b), "seed": cfg.seed,
                                        "states": stage_fingerprint(states_dir, "states")})
    if (done := stage.done()) is not None:
        return done
    check_model_dir(policy)
    t0 = time.perf_counter()
    examples = rft_examples(read_solutions(states_dir), b.distinct)
    if not examples:
        raise StageInputError(f"{states_dir}: no correct sampled solution ending on EOS for the RFT baseline")

    def work() -> dict:
        model, tok = load_policy(policy)
        args = training_args(stage.checkpoints, steps=train_steps(len(examples), b.batch_size, b.epochs),
                             batch_size=b.batch_size, batch_key="rft.batch_size", lr=b.lr, adam_betas=(0.9, 0.95),
                             checkpoints=4, bf16=training_bf16(cfg.bf16), seed=cfg.seed, report_to=cfg.report_to,
                             gradient_checkpointing=cfg.gradient_checkpointing,
                             progress=progress, run_name=str(stage.dir))
        model.train()
        trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=SFTCollator(tok.pad_token_id))
        resume = stage.last_checkpoint()
        result = fit(trainer, tok, stage.model_dir, cfg.report_to, resume)
        return {"solutions": len(examples), "problems": len({e["problem_id"] for e in examples}),
                "tokens": b.epochs * sum(len(e["input_ids"]) for e in examples),  # unpadded, times the passes
                "steps": args.max_steps, "resumed_from_step": resume_step(resume),
                "processes": trainer.args.world_size, "train_loss": result.training_loss,
                "log": trainer.state.log_history, "seconds": time.perf_counter() - t0, "config": to_dict(b)}

    return stage.run(work)


def cannot_train(cfg: RunConfig, iteration: Path) -> str | None:
    if not any(read_solutions(Path(iteration) / "states").column("correct").to_pylist()):
        return "no correct solution among the sampled ones: nothing to fine-tune on"
    return None


def work(cfg: RunConfig, train_shapes: list, n_problems: int, a):
    """At most every kept solution (all correct: an upper bound), prompt + solution each."""
    from stepdapo.plan import Work, optimizer_steps, padded_length

    b, S = cfg.rft, cfg.states
    n = n_problems * S.keep_per_problem
    cut = [s.cut(S.max_new_tokens) for s in train_shapes]
    steps = optimizer_steps(n / b.batch_size * b.epochs)
    rows = steps * b.batch_size
    return Work("iter-1/rft", sequences_trained=rows,
                trained_tokens=rows * padded_length([(s.prompt + s.ends[-1], 1.0) for s in cut], b.batch_size),
                upper_bound=True, notes=[f"at most {n:,.0f} correct solutions x {b.epochs:g} epochs (every kept "
                                         f"solution counted as correct: an upper bound)"],
                counts={"solutions": n, "steps": steps})
