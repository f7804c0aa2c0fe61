"""`stepdapo bootstrap`: make the "SFT model" that DAPO improves, when the user brings none.

A tiny Llama with a character tokenizer (or, with `bootstrap.finetune_model`, the user's own HF
model, fully or with LoRA) is trained by supervised fine-tuning (loss on the solution tokens only) on
the task's flawed demonstrations, with `transformers.Trainer`, and saved with
`save_pretrained`, through `runner.ModelStage`: the output directory appears only when the model is
complete, and a finished one is skipped.

Logged training metrics (to the trackers in `report_to`, which show them as `train/<name>`): `loss`
(cross-entropy on the solution tokens), `grad_norm`, `learning_rate`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import Trainer

from stepdapo.config import RunConfig, to_dict
from stepdapo.errors import StageInputError
from stepdapo.generation import encode_prompts
from stepdapo.models import char_tokenizer, load_policy, model_fingerprint, tiny_llama
from stepdapo.runner import ModelStage, is_main
from stepdapo.tasks import get_task
from stepdapo.training import (
    check_lora_supported,
    finish_tracker_run,
    keep_tensorboard_logs,
    save_trained,
    train_steps,
    training_args,
)


class _SFTCollator:
    """Right-pads (prompt + solution + EOS) and masks the prompt and padding out of the loss."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), T), -100, dtype=torch.long)
        attn = torch.zeros((len(examples), T), dtype=torch.long)
        for i, e in enumerate(examples):
            n, p = len(e["input_ids"]), e["prompt_len"]
            ids[i, :n] = torch.tensor(e["input_ids"])
            attn[i, :n] = 1
            labels[i, p:n] = ids[i, p:n]
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def sft_examples(task, tokenizer, n: int | None = None, seed: int | None = None) -> list[dict]:
    out = []
    for problem, solution in task.demonstrations(n, seed):
        prompt = encode_prompts(tokenizer, [task.prompt(problem, tokenizer)])[0]  # as the sampling stages do
        completion = tokenizer(solution, add_special_tokens=False)["input_ids"]
        out.append({"input_ids": prompt + completion + [tokenizer.eos_token_id], "prompt_len": len(prompt)})
    return out


def bootstrap(cfg: RunConfig, out_dir: str | Path, progress: bool = True, base: str | Path | None = None) -> dict:
    """Train the SFT model and save it to `out_dir`: the tiny model, or `base` (an HF directory)
    fine-tuned; returns a summary (also saved there). Skipped when done; every process of a
    data-parallel run calls this."""
    if cfg.task.name != "arithmetic":
        raise StageInputError(f"bootstrap trains the tiny model on the built-in task only; task "
                              f"{cfg.task.name!r} needs a starting model (set model=PATH)")
    b = cfg.bootstrap
    # the arithmetic task's settings only: another task's settings do not change this model
    stage = ModelStage(out_dir, "bootstrap", {"bootstrap": to_dict(b), "arithmetic": to_dict(cfg.task.arithmetic),
                                              "seed": cfg.seed, "bf16": cfg.bf16,
                                              **({"base": model_fingerprint(base)} if base is not None else {})})

    def work() -> dict:
        t0 = time.perf_counter()
        if base is None:
            tokenizer = char_tokenizer()
            model = tiny_llama(tokenizer, b.model, seed=cfg.seed)
        else:  # the task's plain prompt format: the SFT teaches it, no chat template needed
            model, tokenizer = load_policy(base)
            model.train()
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            if b.lora_r > 0:
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(model, LoraConfig(r=b.lora_r, lora_alpha=b.lora_alpha,
                                                         target_modules="all-linear", task_type="CAUSAL_LM"))
        train = sft_examples(get_task(cfg.task), tokenizer)
        # cosine schedule, AdamW(0.9, 0.98); the tiny model always trains on the CPU
        args = training_args(stage.checkpoints, steps=train_steps(len(train), b.batch_size, b.epochs),
                             batch_size=b.batch_size, batch_key="bootstrap.batch_size", lr=b.lr,
                             lr_scheduler="cosine", warmup_ratio=b.warmup_ratio, weight_decay=b.weight_decay,
                             adam_betas=(0.9, 0.98), use_cpu=True if base is None else None,
                             bf16=cfg.bf16 and base is not None, seed=cfg.seed, report_to=cfg.report_to,
                             progress=progress, run_name=str(stage.dir))
        trainer = Trainer(model=model, args=args, train_dataset=train,
                          data_collator=_SFTCollator(tokenizer.pad_token_id))
        check_lora_supported(trainer, base is not None and b.lora_r > 0)
        result = trainer.train()
        finish_tracker_run(cfg.report_to)
        save_trained(trainer, tokenizer, stage.model_dir)
        if is_main():
            keep_tensorboard_logs(stage.checkpoints, stage.model_dir)
        return {
            "seconds": time.perf_counter() - t0,
            "train_loss": result.training_loss,
            "steps": args.max_steps,
            "processes": trainer.args.world_size,
            "demonstrations": len(train),
            "parameters": sum(p.numel() for p in model.parameters()),
            "base": None if base is None else str(base),
            "config": to_dict(b),
            "task": to_dict(cfg.task),
            "seed": cfg.seed,
        }

    return stage.run(work)
