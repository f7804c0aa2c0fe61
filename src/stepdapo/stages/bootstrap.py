"""`stepdapo bootstrap`: make the "SFT model" that DAPO improves, when the user brings none.

A tiny Llama with a character tokenizer (or, with `bootstrap.finetune_model`, the user's own HF
model, fully or with LoRA) is trained by supervised fine-tuning (loss on the solution tokens only) on
the task's flawed demonstrations, with `transformers.Trainer`, and saved with
`save_pretrained`, through `runner.ModelStage`: the output directory appears only when the model is
complete, and a finished one is skipped.

Logged training metrics (to the trackers in `report_to`, which show them as `train/<name>`; one
tracker run per round):
  loss           cross-entropy on the solution tokens, the mean since the previous log;
  grad_norm      the gradient norm before clipping, of the logged step;
  learning_rate  the scheduled learning rate of the logged step.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, Trainer

from stepdapo.config import EvalConfig, RunConfig, to_dict
from stepdapo.errors import StageInputError
from stepdapo.generation import HFGenerator, encode_prompts
from stepdapo.models import char_tokenizer, check_model_dir, load_policy, model_fingerprint, tiny_llama
from stepdapo.precision import training_bf16
from stepdapo.runner import ModelStage, is_main, on_main, world_size
from stepdapo.stages.evaluate import evaluate_shard, summarize
from stepdapo.store import read_json, write_json
from stepdapo.tasks import get_task, task_settings
from stepdapo.training import (
    check_lora_supported,
    keep_tensorboard_logs,
    publish,
    train_steps,
    train_then_finish_trackers,
    training_args,
)


class SFTCollator:
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


def sft_examples(task, tokenizer, n: int | None = None, seed: int | str | None = None,
                 exclude: set[str] = frozenset()) -> list[dict]:
    demos = list(task.demonstrations(n, seed, exclude))
    prompts = encode_prompts(tokenizer, [task.prompt(problem, tokenizer) for problem, _ in demos])  # as the sampling stages do
    completions = tokenizer([solution for _, solution in demos], add_special_tokens=False)["input_ids"] if demos else []
    return [{"input_ids": prompt + completion + [tokenizer.eos_token_id], "prompt_len": len(prompt)}
            for prompt, completion in zip(prompts, completions)]


def check_sft(model, tokenizer, task, problems: list, b) -> dict:
    """The bootstrap criterion on `problems` (held out of the demonstrations): greedy solutions,
    judged step by step (`task.analyze`): ordinary-step accuracy >= b.min_step_accuracy and the flaw
    visible (flaw-case step accuracy <= b.max_flaw_step_accuracy)."""
    training = model.training
    model.eval()
    cfg = EvalConfig(samples=0)
    gen = HFGenerator(model, tokenizer, task.step_delimiter, batch_size=cfg.batch_size, progress=False)
    cols, info = evaluate_shard(gen, task, problems, cfg, seed=0)
    ev = summarize(cols, problems, task, cfg, 0, [info])
    model.train(training)
    other, flaw = ev.get("greedy_other_step_accuracy", 0.0), ev.get("greedy_flaw_step_accuracy")
    steps_ok = other >= b.min_step_accuracy
    flaw_visible = flaw is None or flaw <= b.max_flaw_step_accuracy
    return {"n": len(problems), "accuracy": ev["accuracy"], "other_step_accuracy": other,
            "flaw_step_accuracy": flaw, "well_formed": ev.get("greedy_well_formed"),
            "min_step_accuracy": b.min_step_accuracy, "max_flaw_step_accuracy": b.max_flaw_step_accuracy,
            "steps_ok": steps_ok, "flaw_visible": flaw_visible, "met": steps_ok and flaw_visible}


def describe_criterion(c: dict) -> str:
    flaw = "–" if c["flaw_step_accuracy"] is None else f"{100 * c['flaw_step_accuracy']:.1f}"
    return (f"ordinary steps {100 * c['other_step_accuracy']:.1f}% right (criterion >= "
            f"{100 * c['min_step_accuracy']:.1f}%), flaw-case steps {flaw}% right (<= "
            f"{100 * c['max_flaw_step_accuracy']:.1f}%), greedy {100 * c['accuracy']:.1f}% on {c['n']} held-out "
            f"problems: {'met' if c['met'] else 'NOT met'}")


ROUND_DONE = "round.json"  # written last into a finished round's checkpoint: what a resumed bootstrap reads


def _finished_rounds(checkpoints: Path) -> list[dict]:
    """The rounds a killed bootstrap finished (their log entries, in order)."""
    done = []
    while (checkpoints / f"round-{len(done) + 1}" / ROUND_DONE).is_file():
        done.append(read_json(checkpoints / f"round-{len(done) + 1}" / ROUND_DONE))
    return done


def bootstrap(cfg: RunConfig, out_dir: str | Path, progress: bool = True, base: str | Path | None = None) -> dict:
    """Train the SFT model and save it to `out_dir`: the tiny model, or `base` (an HF directory)
    fine-tuned; returns a summary (also saved there). Skipped when done; every process of a
    data-parallel run calls this.

    Trained to a criterion (`check_sft`), in rounds: a round is `epochs` passes over fresh
    demonstrations with its own warmup and cosine decay; after each the criterion is checked on
    held-out problems, and another round follows while the ordinary steps fall short, up to
    `max_rounds`. A killed bootstrap resumes after its last finished round."""
    task = get_task(cfg.task)
    if task.n_demonstrations is None:
        raise StageInputError(f"bootstrap trains on a task's demonstrations, and task {cfg.task.name!r} has none "
                              f"(Task.demonstrations): it needs a starting model (set model=PATH)")
    b = cfg.bootstrap
    # the task's own settings only: another task's settings do not change this model
    stage = ModelStage(out_dir, "bootstrap", {"bootstrap": to_dict(b), cfg.task.name: task_settings(cfg.task),
                                              "seed": cfg.seed, "bf16": training_bf16(cfg.bf16),
                                              **({"base": model_fingerprint(base)} if base is not None else {})})
    lora = base is not None and b.lora_r > 0
    if base is not None:
        check_model_dir(base)  # a broken model is an error before the stage claims its directory

    def load(checkpoint: Path | None):
        """The model to train: new, or as a finished round left it."""
        if base is None:
            tokenizer = char_tokenizer()
            model = tiny_llama(tokenizer, b.model, seed=cfg.seed) if checkpoint is None else \
                LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
            return model, tokenizer
        # the task's plain prompt format: the SFT teaches it, no chat template needed
        model, tokenizer = load_policy(base if checkpoint is None or lora else checkpoint)
        model.train()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if lora:
            from peft import LoraConfig, PeftModel, get_peft_model

            model = get_peft_model(model, LoraConfig(r=b.lora_r, lora_alpha=b.lora_alpha, target_modules="all-linear",
                                                     task_type="CAUSAL_LM")) if checkpoint is None else \
                PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
        return model, tokenizer

    def work() -> dict:
        t0 = time.perf_counter()
        held = task.sft_check_problems(b.check_problems)
        exclude = {p.question for p in held}
        rounds = on_main(lambda: _finished_rounds(stage.checkpoints))
        model, tokenizer = load(stage.checkpoints / f"round-{len(rounds)}" if rounds else None)
        trainer = None
        while not rounds or (not rounds[-1]["criterion"]["steps_ok"] and len(rounds) < b.max_rounds):
            r = len(rounds) + 1
            # round 1 on the task's own demonstrations (as before rounds existed); later ones on fresh ones
            train = sft_examples(task, tokenizer, seed=None if r == 1 else f"round{r}",
                                 exclude=exclude)
            # cosine schedule, AdamW(0.9, 0.98); the tiny model always trains on the CPU
            args = training_args(stage.checkpoints, steps=train_steps(len(train), b.batch_size, b.epochs),
                                 batch_size=b.batch_size, batch_key="bootstrap.batch_size",
                                 lr=b.lr if r == 1 else b.later_lr or b.lr / 3, lr_scheduler="cosine",
                                 warmup_ratio=b.warmup_ratio, weight_decay=b.weight_decay, adam_betas=(0.9, 0.98),
                                 use_cpu=True if base is None else None,
                                 bf16=training_bf16(cfg.bf16) and base is not None, seed=cfg.seed + r - 1,
                                 report_to=cfg.report_to,
                                 gradient_checkpointing=cfg.gradient_checkpointing, progress=progress,
                                 run_name=f"{stage.dir}/round-{r}")
            trainer = Trainer(model=model, args=args, train_dataset=train,
                              data_collator=SFTCollator(tokenizer.pad_token_id))
            check_lora_supported(trainer, lora)
            result = train_then_finish_trackers(trainer, cfg.report_to)
            criterion = on_main(lambda: check_sft(trainer.model, tokenizer, task, held, b))
            entry = {"round": r, "steps": args.max_steps, "lr": args.learning_rate, "demonstrations": len(train),
                     "train_loss": result.training_loss, "criterion": criterion}
            trainer.save_model(str(stage.checkpoints / f"round-{r}"))  # all ranks join; LoRA: the adapters
            if is_main():
                write_json(stage.checkpoints / f"round-{r}" / ROUND_DONE, entry)
            rounds.append(entry)
            if is_main():
                print(f"bootstrap round {r}: {describe_criterion(criterion)}", flush=True)
        if trainer is None:  # every round was finished by a killed run: publish what the last one left
            if is_main():
                (model.merge_and_unload() if lora else model).save_pretrained(stage.model_dir)
                tokenizer.save_pretrained(stage.model_dir)
                keep_tensorboard_logs(stage.checkpoints, stage.model_dir)
        else:
            publish(trainer, tokenizer, stage.model_dir)
        final = rounds[-1]["criterion"]
        return {
            "seconds": time.perf_counter() - t0,
            "train_loss": rounds[-1]["train_loss"],
            "steps": sum(e["steps"] for e in rounds),
            "rounds": len(rounds),
            "rounds_log": rounds,
            "criterion": final,
            "processes": world_size(),
            "demonstrations": sum(e["demonstrations"] for e in rounds),
            "parameters": sum(p.numel() for p in model.parameters()),
            "base": None if base is None else str(base),
            "config": to_dict(b),
            "task": to_dict(cfg.task),
            "seed": cfg.seed,
        }

    return stage.run(work)
