"""Train one critic on a finished run's iteration-1 labels with changed settings (the plateau study).

    python bench/critic_plateau.py RUN_DIR OUT_DIR [--init MODEL_DIR] [--zero-head] [--reinit-top K]
        [--freeze-backbone] [--attention-dropout P] [--sum-pooled] [--threads N] [key=value ...]

Same labels, same held-out split; `--init` swaps the backbone the critic starts from (default: the
run's bootstrapped SFT model). The flags below change a critic with a value head alone
(`critic.log_ratio_beta=0`, as in the first three rounds of the study): `--zero-head`
zero-initialises the value head, `--sum-pooled` makes
the critic's logit the sum of the head over every position (training and evaluation), overrides change
anything in `critic.*` or the seed. Prints the held-out metrics as one JSON line; results of the
study are in bench/results/critic-plateau.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

import torch

import stepdapo.stages.critic as critic_stage
from stepdapo.config import load_config
from stepdapo.tasks import get_task


def after_load(edit) -> None:
    """Make the critic stage run `edit(model)` on every critic it loads."""
    load = critic_stage.AutoModelForSequenceClassification.from_pretrained

    def loaded(*a, **k):
        model = load(*a, **k)
        edit(model)
        return model

    critic_stage.AutoModelForSequenceClassification.from_pretrained = loaded


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--init")
    ap.add_argument("--zero-head", action="store_true")
    ap.add_argument("--reinit-top", type=int, default=0, help="re-initialise the backbone's top K layers")
    ap.add_argument("--freeze-backbone", action="store_true", help="train the value head alone (a linear probe)")
    ap.add_argument("--attention-dropout", type=float, default=0.0, help="dropout on the attention weights")
    ap.add_argument("--sum-pooled", action="store_true",
                    help="the critic's logit is the sum of the head over every position, not the last one's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.zero_head:
        after_load(lambda model: torch.nn.init.zeros_(model.score.weight))
    if args.reinit_top:
        def reinit(model):  # by hand: HF's _init_weights skips modules loaded from a checkpoint
            for layer in model.base_model.layers[-args.reinit_top:]:
                for name, p in layer.named_parameters():
                    torch.nn.init.ones_(p) if "norm" in name else torch.nn.init.normal_(p, std=0.02)

        after_load(reinit)
    if args.freeze_backbone:
        after_load(lambda model: [p.requires_grad_(name.startswith("score")) for name, p in model.named_parameters()])
    if args.attention_dropout:
        def dropout(model):
            for layer in model.base_model.layers:
                layer.self_attn.attention_dropout = args.attention_dropout

        after_load(dropout)
    if args.sum_pooled:  # every use of the critic (training, held-out values, ranking) goes through these two
        import stepdapo.models as models
        from stepdapo.models import critic_token_logits

        def summed(model, sequences, pad_id, prefix_lens=None, prompt_lens=None):
            logits = critic_token_logits(model, sequences, pad_id)  # [B, T], right-padded
            lengths = torch.tensor([len(x) for x in sequences], device=logits.device)
            return (logits * (torch.arange(logits.shape[1], device=logits.device) < lengths[:, None])).sum(1)

        critic_stage.critic_logits = models.critic_logits = summed
    history = []
    train = critic_stage.train_critic

    def keep_history(*a, **k):  # the training-loss curve: when the critic leaves the plateau
        trainer, result = train(*a, **k)
        history.extend((h["step"], round(h["loss"], 3)) for h in trainer.state.log_history if "loss" in h)
        return trainer, result

    critic_stage.train_critic = keep_history
    cfg = load_config(f"{args.run_dir}/config.yaml", args.overrides)
    if cfg.critic.log_ratio_beta > 0 and (args.zero_head or args.reinit_top or args.freeze_backbone
                                          or args.attention_dropout or args.sum_pooled):
        sys.exit("these flags change a critic with a value head alone: add critic.log_ratio_beta=0")
    shutil.rmtree(args.out_dir, ignore_errors=True)
    s = critic_stage.run_critic(cfg, args.init or f"{args.run_dir}/sft", f"{args.run_dir}/iter-1/labels",
                                args.out_dir, get_task(cfg.task), progress=False)
    q = s["heldout"]
    print(json.dumps({"steps": s["steps"], "train_loss": s["train_loss"], "bce": q["bce"], "bce_constant": q["bce_constant"],
                      "auc": q["auc_mc0_vs_positive"], "right_above_wrong": q["step_ranking"]["right_above_wrong"],
                      "seconds": s["seconds"], "train_examples": s["train_examples"],
                      "loss_curve": history[::max(1, len(history) // 20)]}))


if __name__ == "__main__":
    main()
