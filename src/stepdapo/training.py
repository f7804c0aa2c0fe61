"""The one place that turns a stage's settings into `transformers.TrainingArguments`.

Every trainer (bootstrap SFT, critic, actor, DPO baseline) trains for a fixed number of optimizer
steps with AdamW, seeded (`seed` and `data_seed`), no dataloader workers, and our own collators (so
`remove_unused_columns=False`); what differs between them is a parameter here.

Data parallel (`torchrun` / `accelerate launch`): every process runs the same stage code and the
Trainer does DDP (or FSDP / DeepSpeed from an accelerate config). The batch sizes in the config are
GLOBAL, summed over the processes: each process takes `batch_size // world_size` items per
micro-batch (a batch size that the number of processes does not divide is a StageInputError), so
one process and N take the same number of optimizer steps over the same global batches. With our
seeded sampler and accelerate's batch sharding the global batches are the same items as on one
process, except the last, partial batch of an epoch, which the shards fill by wrapping around to
the epoch's first items. The gradient is the mean over the processes of each one's mean loss: the
same as on one process for the critic's and the DPO baseline's per-item means (equal-sized shards)
and for SFT (the Trainer counts the tokens over all processes); the actor's weighted mean over a
process's actions equals the one-process mean only when the processes' weights sum alike.

Every trainer is a `transformers.Trainer` (the bootstrap's plain; the critic's, the actor's and the
DPO baseline's a `MetricsTrainer`, which logs the means of what its loss records) and ends with
`fit` (or, trained in rounds, `publish`): train, end the tracker run, save the model, keep its logs.

`save_trained` writes the trained model: `trainer.save_model` gathers FSDP (FULL_STATE_DICT) and
ZeRO-3 weights and writes on rank 0; LoRA adapters are merged on rank 0 and the plain model saved.
LoRA with FSDP or ZeRO-3 is not supported yet (the adapters would have to be gathered before
merging): `check_lora_supported` refuses it before training.

Metrics go to the trackers listed in the run config's `report_to` (e.g. ["tensorboard"], ["wandb"];
[] = none), one tracker run per stage named after its output directory (the bootstrap: one per
round, `<dir>/round-<r>`). The trackers prefix every training metric with "train/" (the Trainer's
`loss` shows as `train/loss`); each trainer's module docstring lists its metrics. Besides those the
Trainer logs `epoch` with each log and, once at the end, `train_loss`, `train_runtime`,
`train_samples_per_second`, `train_steps_per_second` and `total_flos` (wandb keeps these five in the
run's summary, not its history). TensorBoard's event files end up in `runs/<date>_<host>/` inside
the stage's saved model directory; wandb's runs go to the project $WANDB_PROJECT (transformers'
default: "huggingface"). tests/test_trackers.py reads both back.
"""

from __future__ import annotations

import gc
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from stepdapo.errors import StageInputError
from stepdapo.runner import is_main, world_size


def train_steps(n_items: int, batch_size: int, epochs: float, grad_accum: int = 1) -> int:
    """Optimizer steps for `epochs` passes over `n_items` (at least one)."""
    return max(1, math.ceil(n_items / (batch_size * grad_accum) * epochs))


def per_device_batch(global_batch: int, key: str) -> int:
    """This process's share of the global batch `global_batch` (the config's `key`)."""
    n = world_size()
    if global_batch % n:
        raise StageInputError(f"{key} = {global_batch} is the global batch, split evenly over the {n} "
                              f"processes: set it to a multiple of {n}")
    return global_batch // n


def training_args(output_dir: Path, *, steps: int, batch_size: int, lr: float, seed: int,
                  report_to: list[str], progress: bool, run_name: str, batch_key: str = "batch_size",
                  bf16: bool = False, use_cpu: bool | None = None, grad_accum: int = 1,
                  lr_scheduler: str = "linear", warmup_ratio: float = 0.0, weight_decay: float = 0.0,
                  adam_betas: tuple[float, float] = (0.9, 0.999), max_grad_norm: float = 1.0,
                  logs: int = 20, checkpoints: int = 0, gradient_checkpointing: bool = False) -> TrainingArguments:
    """TrainingArguments for `steps` optimizer steps of `batch_size` x `grad_accum` items, `batch_size`
    being the global micro-batch (the config's `batch_key`, named in the error if the number of
    processes does not divide it).

    warmup: int(warmup_ratio * steps) steps; a log every max(1, steps // logs) steps; with
    `checkpoints` > 0 a checkpoint every max(1, steps // checkpoints) steps (only the last one kept,
    to resume a killed stage), else none. `use_cpu` None: the CPU when there is no CUDA device.
    `gradient_checkpointing`: every layer's activations recomputed in the backward pass
    (non-reentrant torch.utils.checkpoint). The DDP timeout is the synchronisation timeout
    (STEPDAPO_SYNC_TIMEOUT_S, `runner.sync_timeout`), so a rank waiting on rank 0's work inside a
    Trainer collective waits as long as at our own synchronisation points.
    """
    from stepdapo.runner import sync_timeout

    return TrainingArguments(
        **_checkpointing_args(gradient_checkpointing), ddp_timeout=int(sync_timeout()),
        output_dir=str(output_dir), run_name=run_name,
        report_to=list(report_to) or "none", disable_tqdm=not progress,
        per_device_train_batch_size=per_device_batch(batch_size, batch_key),
        gradient_accumulation_steps=grad_accum, max_steps=steps,
        learning_rate=lr, lr_scheduler_type=lr_scheduler, warmup_steps=int(warmup_ratio * steps),
        weight_decay=weight_decay, adam_beta1=adam_betas[0], adam_beta2=adam_betas[1],
        max_grad_norm=max_grad_norm, logging_steps=max(1, steps // logs),
        save_strategy="steps" if checkpoints else "no", save_steps=max(1, steps // max(checkpoints, 1)),
        save_total_limit=1, bf16=bf16, use_cpu=(not torch.cuda.is_available()) if use_cpu is None else use_cpu,
        seed=seed, data_seed=seed, remove_unused_columns=False, dataloader_num_workers=0)


def _checkpointing_args(on: bool) -> dict:
    """TrainingArguments' activation checkpointing under its name in the installed transformers
    (`activation_checkpointing` since 5.2x; `gradient_checkpointing` before, now a deprecated alias)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


def sharded_launch() -> str | None:
    """How `accelerate launch` set up this run's training, from the environment it gives the
    processes: "FSDP", "ZeRO-3" (parameters sharded), "DeepSpeed" (ZeRO-1/2) or None (DDP, one process)."""
    import os

    on = lambda name: os.environ.get(name, "").lower() in ("1", "true")  # noqa: E731
    if on("ACCELERATE_USE_FSDP"):
        return "FSDP"
    if on("ACCELERATE_USE_DEEPSPEED"):
        return "ZeRO-3" if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" else "DeepSpeed"
    return None


def check_run_supported(cfg) -> None:
    """The refusals the trainers would make when their stage starts, hours into a run (after the
    sampling stages), made before it starts: LoRA with sharded parameters, the log-ratio critic with
    FSDP or DeepSpeed. A ConfigError naming every setting to change."""
    from stepdapo.errors import ConfigError

    how = sharded_launch()
    if how is None:
        return
    problems = []
    if how in ("FSDP", "ZeRO-3"):
        sections = [("actor", cfg.actor.lora_r), ("critic", cfg.critic.lora_r)]
        if cfg.model is not None and cfg.bootstrap.finetune_model:
            sections.append(("bootstrap", cfg.bootstrap.lora_r))
        problems += [f"{name}.lora_r={r}: LoRA with {how} is not supported yet (use {name}.lora_r=0, or DDP)"
                     for name, r in sections if r > 0]
    if cfg.iterations > 0 and cfg.critic.log_ratio_beta > 0 and cfg.advantages.source == "critic":
        problems.append(f"critic.log_ratio_beta={cfg.critic.log_ratio_beta}: the log-ratio critic holds two models in "
                        f"one module and is not supported with {how} yet (use DDP, or critic.log_ratio_beta=0)")
    if problems:
        raise ConfigError(f"this run is launched with {how}: " + "; ".join(problems))


def check_lora_supported(trainer: Trainer, lora: bool) -> None:
    """LoRA is merged on rank 0 from its whole weights: not possible yet when they are sharded."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if lora and (trainer.is_fsdp_enabled or is_deepspeed_zero3_enabled()):
        raise StageInputError("LoRA (lora_r > 0) with FSDP or DeepSpeed ZeRO-3 is not supported yet: use "
                              "full fine-tuning (lora_r=0) or data parallel (DDP, ZeRO-1/2)")


def resume_step(checkpoint: str | None) -> int | None:
    """The optimizer step at which the Trainer checkpoint `.../checkpoint-N` was saved."""
    return int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else None


class MetricsTrainer(Trainer):
    """A Trainer whose `compute_loss` records metrics of its own (`record(name=value)`, per batch):
    each log gets their means since the previous log, beside the Trainer's loss, grad_norm and
    learning_rate (as TRL's trainers do). The trainers' module docstrings list what they record."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, list[float]] = {}

    def record(self, **values: float | None) -> None:
        for k, v in values.items():
            if v is not None and not math.isnan(v):
                self._metrics.setdefault(k, []).append(v)

    def log(self, logs: dict, *args, **kwargs):
        for k, v in self._metrics.items():
            logs[k] = float(np.mean(v))
        self._metrics = {}
        super().log(logs, *args, **kwargs)


def fit(trainer: Trainer, tokenizer, model_dir: Path, report_to: list[str], resume: str | None = None,
        published: Path | None = None):
    """The end of every stage that trains: `trainer.train()` (from the checkpoint `resume`), its
    tracker run ended, the model saved to `model_dir` and its TensorBoard logs kept (`publish`).
    Returns the TrainOutput; every rank calls this."""
    result = train_then_finish_trackers(trainer, report_to, resume)
    publish(trainer, tokenizer, model_dir, published)
    return result


def publish(trainer: Trainer, tokenizer, model_dir: Path, published: Path | None = None) -> None:
    """Save the trained model (`save_trained`) and move the stage's TensorBoard logs into it."""
    save_trained(trainer, tokenizer, model_dir, published)
    if is_main():
        keep_tensorboard_logs(Path(trainer.args.output_dir), model_dir)


def save_trained(trainer: Trainer, tokenizer, model_dir: Path, published: Path | None = None) -> None:
    """Save the trained model and its tokenizer as a plain HF directory; every rank calls this. A
    log-ratio critic saves its own way (its pi_ref named relative to `published`, the directory the
    stage will publish to)."""
    from stepdapo.models import LogRatioCritic

    if isinstance(trainer.model, LogRatioCritic):
        if is_main():
            trainer.model.save_pretrained(model_dir, published=published)
            tokenizer.save_pretrained(model_dir)
        return
    if hasattr(trainer.model, "merge_and_unload"):  # LoRA: merge, then save a plain model
        if is_main():  # unsharded (check_lora_supported), so rank 0 holds every weight
            trainer.model.merge_and_unload().save_pretrained(model_dir)
    else:
        trainer.save_model(str(model_dir))  # all ranks join the FSDP / ZeRO-3 gather; rank 0 writes
    if is_main():
        tokenizer.save_pretrained(model_dir)


def release_memory() -> None:
    """Free what a deleted Trainer held (the model, the optimizer state: reference cycles keep them
    until a collection), before rank 0 loads the saved model to measure it."""
    gc.collect()
    torch.cuda.empty_cache()  # a no-op without CUDA


def finish_tracker_run(report_to: list[str]) -> None:
    """End the stage's tracker run. wandb keeps one run open per process across Trainers, so without
    this the critic, the actor and the next iteration would all log into the first stage's run."""
    if "wandb" in report_to:
        import wandb

        wandb.finish()


def train_then_finish_trackers(trainer, report_to: list[str], resume: str | None = None):
    """`trainer.train()`, its tracker run ended even when training raises: a later stage in the same
    process (a test, a notebook, the pipeline's recovery) must not log into a failed stage's run."""
    try:
        return trainer.train(resume_from_checkpoint=resume)
    finally:
        finish_tracker_run(report_to)


def keep_tensorboard_logs(output_dir: Path, model_dir: Path) -> None:
    """TensorBoard writes under the Trainer's `output_dir/runs/`, in the stage's work dir, which is
    removed once the model is published: move it into the saved model directory (rank 0)."""
    if (Path(output_dir) / "runs").is_dir():
        shutil.move(str(Path(output_dir) / "runs"), str(Path(model_dir) / "runs"))
