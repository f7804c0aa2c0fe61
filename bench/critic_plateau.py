"""Train one critic on a finished run's iteration-1 labels with changed settings (the plateau study).

    python bench/critic_plateau.py RUN_DIR OUT_DIR [--init MODEL_DIR] [--zero-head] [--threads N] [key=value ...]

Same labels, same held-out split; `--init` swaps the backbone the critic starts from (default: the
run's bootstrapped SFT model), `--zero-head` zero-initialises the value head, overrides change
anything in `critic.*` or the seed. Prints the held-out metrics as one JSON line; results of the
study are in bench/results/critic-plateau.md.
"""

from __future__ import annotations

import argparse
import json
import shutil

import torch

import stepdapo.stages.critic as critic_stage
from stepdapo.config import load_config
from stepdapo.tasks import get_task


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--init")
    ap.add_argument("--zero-head", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.zero_head:
        load = critic_stage.AutoModelForSequenceClassification.from_pretrained

        def zero_head(*a, **k):
            model = load(*a, **k)
            torch.nn.init.zeros_(model.score.weight)
            return model

        critic_stage.AutoModelForSequenceClassification.from_pretrained = zero_head
    cfg = load_config(f"{args.run_dir}/config.yaml", args.overrides)
    shutil.rmtree(args.out_dir, ignore_errors=True)
    s = critic_stage.run_critic(cfg, args.init or f"{args.run_dir}/sft", f"{args.run_dir}/iter-1/labels",
                                args.out_dir, get_task(cfg.task), progress=False)
    q = s["heldout"]
    print(json.dumps({"steps": s["steps"], "train_loss": s["train_loss"], "bce": q["bce"], "bce_constant": q["bce_constant"],
                      "auc": q["auc_mc0_vs_positive"], "right_above_wrong": q["step_ranking"]["right_above_wrong"],
                      "seconds": s["seconds"]}))


if __name__ == "__main__":
    main()
