"""The outcome-level DPO baseline's training step against TRL's DPOTrainer, same pairs, same model.

    # trl in its own venv that reuses the project's packages (`pip install --dry-run trl` there
    # installs only trl: torch and transformers stay as they are)
    python -m venv /tmp/trl-venv
    python -c "import site; print(site.getsitepackages()[0])" > "$(/tmp/trl-venv/bin/python -c \
        'import site; print(site.getsitepackages()[0])')/main-venv.pth"   # run with the project's venv active
    /tmp/trl-venv/bin/pip install trl
    OMP_NUM_THREADS=1 PYTHONPATH=src /tmp/trl-venv/bin/python bench/bench_dpo_trl.py

Each trainer takes optimizer steps on batches of 4 (prompt, chosen, rejected) triples, prompts of P
tokens (P = 512 and 96; distinct prompts, so only chosen and rejected share one), completions of 32
and 24 tokens. Reference log-probs are precomputed in both (TRL's `precompute_ref_log_probs`), so a
step is the policy's forward, backward and AdamW update. Wall time per step from a callback, the
first step left out; the three trainers alternate, `--repeats` rounds, medians reported. Writes
bench/results/dpo-vs-trl.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import trl
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments
from trl import DPOConfig, DPOTrainer

from stepdapo.models import char_tokenizer
from stepdapo.stages.actor import OutcomeDPOTrainer, _PairCollator

RESULTS = Path(__file__).parent / "results"
PAIRS, STEPS = 4, 4


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.t0 = [], None

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t0)


def model(tok):
    torch.manual_seed(0)  # the bench_shared_prefix.py shape, with the character vocabulary
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))


def texts(prompt_len: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    digits = lambda n: "".join(str(d) for d in torch.randint(0, 10, (n,), generator=g).tolist())  # noqa: E731
    # one character per token; the completions end with eos (TRL would add it), as the sampled ones do
    return [{"prompt": digits(prompt_len - 1), "chosen": digits(31) + "</s>", "rejected": digits(23) + "</s>"}
            for _ in range(PAIRS * STEPS)]


def run_trl(tok, rows, out: str) -> list[float]:
    timer = StepTimer()
    args = DPOConfig(output_dir=out, per_device_train_batch_size=PAIRS, max_steps=STEPS, learning_rate=1e-5,
                     precompute_ref_log_probs=True, report_to="none", use_cpu=True, save_strategy="no",
                     logging_steps=1000, disable_tqdm=True, max_length=None, beta=0.1, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model(tok), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[timer])
    trainer.train()
    return timer.times[1:]


def run_ours(tok, rows, out: str, shared: bool) -> list[float]:
    timer = StepTimer()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [{"prompt": tok(r["prompt"])["input_ids"], "chosen": enc(r["chosen"]), "rejected": enc(r["rejected"]),
              "ref_chosen": 0.0, "ref_rejected": 0.0} for r in rows]
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=PAIRS, max_steps=STEPS, learning_rate=1e-5,
                             report_to="none", use_cpu=True, save_strategy="no", logging_steps=1000, disable_tqdm=True,
                             remove_unused_columns=False, dataloader_num_workers=0)
    trainer = OutcomeDPOTrainer(model=model(tok), args=args, train_dataset=pairs, data_collator=_PairCollator(),
                                beta=0.1, pad_id=tok.pad_token_id, shared_prefix=shared, callbacks=[timer])
    trainer.train()
    return timer.times[1:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = char_tokenizer()
    t_start = time.perf_counter()
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        for prompt_len in (512, 96):
            rows = texts(prompt_len, seed=prompt_len)
            times = {"TRL DPOTrainer": [], "ours, plain rows": [], "ours, shared prefix": []}
            for _ in range(args.repeats):
                times["TRL DPOTrainer"] += run_trl(tok, rows, tmp)
                times["ours, shared prefix"] += run_ours(tok, rows, tmp, shared=True)
                times["ours, plain rows"] += run_ours(tok, rows, tmp, shared=False)
            trl_s = statistics.median(times["TRL DPOTrainer"])
            for name, ts in times.items():
                s = statistics.median(ts)
                rows_out.append((prompt_len, name, s, trl_s / s))
                print(f"P={prompt_len:4d} {name:22s} {s:.3f} s/step  x{trl_s / s:.2f} vs TRL", flush=True)
    total = time.perf_counter() - t_start
    lines = [
        "# DPO baseline step: ours (shared prompt) vs TRL's DPOTrainer",
        "",
        f"`bench/bench_dpo_trl.py` (trl {trl.__version__} in a separate venv; torch {torch.__version__}, "
        f"transformers unchanged). Batches of {PAIRS} (prompt, chosen, rejected) triples, distinct prompts of P "
        "tokens, completions of 32 and 24 tokens; reference log-probs precomputed in both; a step = forward, "
        f"backward and AdamW update. Median seconds per step over {args.repeats} x {STEPS - 1} steps (each "
        "trainer's first step left out), trainers alternating.",
        "",
        f"Model: Llama, hidden 256, 4 layers, 8 heads (4 kv), MLP 688, character vocabulary ({len(tok)} tokens), "
        f"float32, CPU ({platform.machine()}), {args.threads} thread(s). Whole benchmark: {total:.0f} s.",
        "",
        "| prompt P | trainer | s / step | speedup vs TRL |",
        "|---:|---|---:|---:|",
    ]
    lines += [f"| {p} | {name} | {s:.3f} | {x:.2f}x |" for p, name, s, x in rows_out]
    lines += ["", "TRL's step runs prompt+chosen and prompt+rejected as two rows (the prompt twice), as do ours "
              "with `baseline.shared_prefix=false`; the gap between those two is TRL's per-step work besides the "
              "model (its collator, metrics, log-prob computation), not analysed here. With the shared prefix "
              "(the default) the prompt runs once and both completions on its keys/values. The vocabulary is "
              "tiny, so the language-model head costs little in any of them."]
    (RESULTS / "dpo-vs-trl.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
