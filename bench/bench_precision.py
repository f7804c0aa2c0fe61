"""Does bf16 pay on this machine? A training step and greedy decoding, float32 against bf16, interleaved.

    python bench/bench_precision.py [--repeats 3] [--batch 8] [--length 96] [--new-tokens 24]

A randomly initialised Llama of SmolLM2-135M's shape (no download: the shape is written out
below) on this process's device. Training: one AdamW step of a causal-LM loss on `--batch` x
`--length` tokens, float32 weights, with and without bf16 autocast (what `bf16: true` does).
Decoding: `--new-tokens` greedy tokens for `--batch` prompts with the weights in float32 and in
bf16 (what `generation.dtype: bfloat16` does for the HF sampler). Each measurement is repeated
`--repeats` times, float32 and bf16 alternating, after one warm-up of each; the medians and their
ratio go to bench/results/precision.md and .json with the CPU model and what `stepdapo.precision`
decides for `auto` here. The ratio is the evidence for that decision on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

RESULTS = Path(__file__).parent / "results"
# HuggingFaceTB/SmolLM2-135M-Instruct's config.json, the fields that set the compute
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    tie_word_embeddings=True, rope_theta=100000.0)


def train_step(model, opt, ids, autocast: bool) -> float:
    t0 = time.perf_counter()
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


@torch.no_grad()
def decode(model, ids, new_tokens: int) -> float:
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="precision")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(1, SMOLLM2_135M["vocab_size"], (args.batch, args.length), device=dev)
    prompts = ids[:, :32]
    model16 = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(dev, torch.bfloat16).eval()
    times = {"train_fp32": [], "train_bf16_autocast": [], "decode_fp32": [], "decode_bf16": []}
    for r in range(args.repeats + 1):  # round 0 warms up
        got = {"train_fp32": train_step(model, opt, ids, False),
               "train_bf16_autocast": train_step(model, opt, ids, True)}
        model.eval()
        got["decode_fp32"] = decode(model, prompts, args.new_tokens)
        got["decode_bf16"] = decode(model16, prompts, args.new_tokens)
        model.train()
        if r:
            for k, v in got.items():
                times[k].append(v)
        print(f"round {r}{' (warm-up)' if not r else ''}: " + ", ".join(f"{k} {v:.2f} s" for k, v in got.items()),
              flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}

    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
    from bench_pipeline import machine  # noqa: E402  (same folder)
    from stepdapo.precision import fast_bf16

    m = machine()
    auto, why = fast_bf16()
    out = {"machine": m, "device": str(dev), "args": vars(args), "seconds": times, "median": med,
           "train_speedup_bf16": med["train_fp32"] / med["train_bf16_autocast"],
           "decode_speedup_bf16": med["decode_fp32"] / med["decode_bf16"], "auto_chooses_bf16": auto, "why": why}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    md = [f"# bf16 against float32 on {m['cpu'] if dev.type == 'cpu' else torch.cuda.get_device_name(0)}", "",
          f"`python bench/bench_precision.py --repeats {args.repeats} --batch {args.batch} --length {args.length} "
          f"--new-tokens {args.new_tokens}`: a random SmolLM2-135M-shaped Llama, {args.threads} threads, torch "
          f"{m['torch']}. Medians of {args.repeats} interleaved repeats after a warm-up.", "",
          "| | float32 s | bf16 s | bf16 speed-up |", "|---|---|---|---|",
          f"| training step (AdamW, {args.batch} x {args.length} tokens; bf16 = autocast) | {med['train_fp32']:.2f} | "
          f"{med['train_bf16_autocast']:.2f} | {out['train_speedup_bf16']:.2f}x |",
          f"| greedy decoding ({args.batch} x {args.new_tokens} tokens; bf16 = bf16 weights) | {med['decode_fp32']:.2f} | "
          f"{med['decode_bf16']:.2f} | {out['decode_speedup_bf16']:.2f}x |", "",
          f"`bf16: auto` / `generation.dtype: auto` choose {'bf16' if auto else 'float32'} here: {why}."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
