"""The one place that turns a stage's settings into `transformers.TrainingArguments`.

Every trainer (bootstrap SFT, critic, actor, DPO baseline) trains for a fixed number of optimizer
steps with AdamW, seeded (`seed` and `data_seed`), no dataloader workers, and our own collators (so
`remove_unused_columns=False`); what differs between them is a parameter here.

Metrics go to the trackers listed in the run config's `report_to` (e.g. ["tensorboard"], ["wandb"];
[] = none), one tracker run per stage named after its output directory. The trackers prefix every
training metric with "train/" (the Trainer's `loss` shows as `train/loss`); each trainer's module
docstring lists its metrics. TensorBoard's event files end up in `runs/` inside the stage's saved
model directory.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from transformers import TrainingArguments


def train_steps(n_items: int, batch_size: int, epochs: float, grad_accum: int = 1) -> int:
    """Optimizer steps for `epochs` passes over `n_items` (at least one)."""
    return max(1, math.ceil(n_items / (batch_size * grad_accum) * epochs))


def training_args(output_dir: Path, *, steps: int, batch_size: int, lr: float, seed: int,
                  report_to: list[str], progress: bool, run_name: str,
                  bf16: bool = False, use_cpu: bool | None = None, grad_accum: int = 1,
                  lr_scheduler: str = "linear", warmup_ratio: float = 0.0, weight_decay: float = 0.0,
                  adam_betas: tuple[float, float] = (0.9, 0.999), max_grad_norm: float = 1.0,
                  logs: int = 20, checkpoints: int = 0) -> TrainingArguments:
    """TrainingArguments for `steps` optimizer steps of `batch_size` x `grad_accum` items.

    warmup: int(warmup_ratio * steps) steps; a log every max(1, steps // logs) steps; with
    `checkpoints` > 0 a checkpoint every max(1, steps // checkpoints) steps (only the last one kept,
    to resume a killed stage), else none. `use_cpu` None: the CPU when there is no CUDA device.
    """
    return TrainingArguments(
        output_dir=str(output_dir), run_name=run_name,
        report_to=list(report_to) or "none", disable_tqdm=not progress,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum, max_steps=steps,
        learning_rate=lr, lr_scheduler_type=lr_scheduler, warmup_steps=int(warmup_ratio * steps),
        weight_decay=weight_decay, adam_beta1=adam_betas[0], adam_beta2=adam_betas[1],
        max_grad_norm=max_grad_norm, logging_steps=max(1, steps // logs),
        save_strategy="steps" if checkpoints else "no", save_steps=max(1, steps // max(checkpoints, 1)),
        save_total_limit=1, bf16=bf16, use_cpu=(not torch.cuda.is_available()) if use_cpu is None else use_cpu,
        seed=seed, data_seed=seed, remove_unused_columns=False, dataloader_num_workers=0)


def finish_tracker_run(report_to: list[str]) -> None:
    """End the stage's tracker run. wandb keeps one run open per process across Trainers, so without
    this the critic, the actor and the next iteration would all log into the first stage's run."""
    if "wandb" in report_to:
        import wandb

        wandb.finish()


def keep_tensorboard_logs(output_dir: Path, model_dir: Path) -> None:
    """TensorBoard writes under the Trainer's `output_dir/runs/`, which the stages delete once the
    model is saved: move it into the saved model directory."""
    if (Path(output_dir) / "runs").is_dir():
        shutil.move(str(Path(output_dir) / "runs"), str(Path(model_dir) / "runs"))
