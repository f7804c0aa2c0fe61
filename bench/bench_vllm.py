"""vLLM against stepdapo's HF sampler on a real LM: like for like, interleaved, repeated.

    python bench/bench_vllm.py [--model GGUF_OR_HF_DIR] [--states 2] [--prompts 2] [--repeats 3]
                               [--dtypes float32,bfloat16] [--threads 2] [--max-new-tokens N]
                               [--out bench/results/vllm]

Two workloads, each run by both backends through the same `Generator.generate` call the stages
make, with the same requests (prompts, samples per prompt, max_new_tokens, seed):
- "labels": the Monte-Carlo labelling stage's work, m = 16 rollouts to the end from each state
  (a GSM8K prompt in the model's chat template plus the first 0..2 lines of its reference
  solution), temperature 1, <= 128 new tokens;
- "solutions": 4 full solutions per GSM8K prompt (stage 1 and evaluation's sampled pass), <= 256.

Like for like:
- the same dtype: each dtype of --dtypes is one comparison, our HF sampler loading the policy in
  that dtype (`hf_sampling_dtype`, as the HF backend does) and vLLM running it in that dtype;
- the same CPUs: the whole bench (so the vLLM engine's processes too) is pinned to --threads CPUs;
  HF runs --threads torch threads and vLLM's worker --threads OpenMP threads on them
  (VLLM_CPU_OMP_THREADS_BIND; `--vllm-bind auto` leaves vLLM its own choice, which on a small
  machine keeps a core for its scheduler and gives the worker the rest);
- one environment and one process: this one's torch, transformers and vLLM (`vllm-cpu` pins an
  older transformers than the main environment's; the results say what that costs our sampler);
- interleaved: per dtype one engine is started (its start and warm-up timed apart), then for each
  repeat and workload the two backends run back to back, the first alternating between repeats.
  HF runs while that engine is alive but idle: the engine's CPU time during each HF run is
  measured and reported (a restart per run would cost ~20-25 s of engine start each time).

Throughput is generated tokens per wall second; the ratio vLLM / HF is taken per repeat pair
(what carries across machines) and reported as its median and range, with the median and range
of each backend's tok/s. Each is also given as a fraction of this machine's FLOP limit: 2 x
parameters FLOP per generated token at the measured matmul rate of the dtype (prefill and
attention are not counted: a lower bound of the work done). On a GPU the same command runs both
backends on the GPU (`vllm` instead of `vllm-cpu`).

Writes OUT.json (every run, the machine, the versions) and OUT.md (generated from it: no number
in it is written by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
DEFAULT_MODEL = "~/.cache/stepdapo-test-models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
WORKLOADS = {"labels": (16, 128), "solutions": (4, 256)}  # samples per prompt, max_new_tokens


# ----------------------------------------------------------------------------- the machine

def versions() -> dict:
    import transformers
    import vllm

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "vllm": vllm.__version__}


def environment_notes() -> dict:
    """What of this environment bears on the comparison: the transformers vLLM's package pins, whether
    transformers decodes grouped-query attention without repeating keys/values, whether vLLM has tcmalloc."""
    from importlib.metadata import packages_distributions, requires

    import transformers.integrations.sdpa_attention as sdpa
    import vllm

    dist = (packages_distributions().get("vllm") or ["vllm"])[0]
    pin = next((r.split(";")[0].replace(" ", "") for r in requires(dist) or [] if r.startswith("transformers")), "")
    libs = Path(vllm.__file__).parent / "libs"  # where vllm-cpu looks for the tcmalloc it preloads
    return {"vllm_distribution": dist, "vllm_transformers_pin": pin,
            "transformers_pack_gqa": hasattr(sdpa, "pack_gqa"),
            "vllm_tcmalloc": any(libs.glob("libtcmalloc*.so*"))}


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


def engine_cpu_seconds() -> float:
    """CPU time (user + system) used so far by this process's children: the vLLM engine's processes."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # it ended meanwhile
            pass
    return total


# ----------------------------------------------------------------------------- the work

def workloads(task, tokenizer, n_states: int, n_prompts: int, max_new_cap: int | None) -> dict:
    """{name: (prompts, n, max_new_tokens)} of each workload, from GSM8K's train split."""
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
    cap = (lambda m: min(m, max_new_cap)) if max_new_cap else (lambda m: m)
    return {"labels": (states, WORKLOADS["labels"][0], cap(WORKLOADS["labels"][1])),
            "solutions": (prompts, WORKLOADS["solutions"][0], cap(WORKLOADS["solutions"][1]))}


def run_once(gen, prompts, n, max_new, seed) -> dict:
    from stepdapo.generation import SamplingParams

    t0 = time.perf_counter()
    out = gen.generate(prompts, n, SamplingParams(temperature=1.0, max_new_tokens=max_new, seed=seed))
    seconds = time.perf_counter() - t0
    tokens = sum(len(s.token_ids) for r in out for s in r)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


# ----------------------------------------------------------------------------- the summary

def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def spread(xs: list[float], fmt: str = ".0f") -> str:
    """'median (min-max)' of xs; the bare value when there is one."""
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.median(xs), fmt)} ({format(min(xs), fmt)}-{format(max(xs), fmt)})"


def summarise(rows: list[dict]) -> list[dict]:
    """Per (dtype, workload): each backend's tok/s over the repeats, and vLLM / HF per repeat pair."""
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for name in dict.fromkeys(r["workload"] for r in rows):
            def of(backend, key):
                rs = sorted((r for r in rows if (r["dtype"], r["workload"], r["backend"]) == (dtype, name, backend)),
                            key=lambda r: r["repeat"])
                return [r[key] for r in rs]
            hf, vl = of("hf", "tokens_per_s"), of("vllm", "tokens_per_s")
            ratios = [v / h for h, v in zip(hf, vl)]
            out.append({"dtype": dtype, "workload": name, "repeats": len(ratios),
                        "hf_tokens_per_s": hf, "vllm_tokens_per_s": vl, "ratio_per_repeat": ratios,
                        "ratio_median": statistics.median(ratios),
                        "hf_tokens": of("hf", "tokens"), "vllm_tokens": of("vllm", "tokens"),
                        "hf_flop_fraction": of("hf", "flop_fraction"),
                        "vllm_flop_fraction": of("vllm", "flop_fraction")})
    return out


def report(meta: dict, rows: list[dict], summary: list[dict]) -> str:
    """The markdown page: every number in it comes from `meta`, `rows` and `summary`."""
    v, env, dtypes = meta["versions"], meta["environment"], list(meta["engine_start_seconds"])
    cell = {(s["dtype"], s["workload"]): s for s in summary}
    names = list(dict.fromkeys(s["workload"] for s in summary))
    pairs = plural(meta["repeats"], "interleaved repeat pair")
    gpu = f", GPU {meta['gpu']}" if meta.get("gpu") else ""
    lines = ["# vLLM vs stepdapo's HF sampler, like for like", "", f"`{meta['command']}`", "",
             f"Machine: {meta['cpu_model']}, {meta['cpu_count']} cores{gpu}; fast bf16: "
             f"{'yes' if meta['fast_bf16'] else 'no'} ({meta['fast_bf16_why']}). Python {v['python']}, torch "
             f"{v['torch']}, transformers {v['transformers']}, vLLM {v['vllm']}, one process. Model: "
             f"{meta['model_name']} ({meta['parameters'] / 1e6:.0f}M parameters), device {meta['device']}. "
             f"Matmul GFLOP/s at {plural(meta['threads'], 'thread')}: "
             + ", ".join(f"{k} {x:.0f}" for k, x in meta["matmul_gflops"].items()) + ".", ""]

    # the headline: one sentence per dtype, both backends at that dtype
    for dtype in dtypes:
        parts = [f"{cell[(dtype, name)]['ratio_median']:.2f}x on {name} (per repeat: "
                 + ", ".join(f"{x:.2f}" for x in cell[(dtype, name)]["ratio_per_repeat"]) + ")" for name in names]
        lines.append(f"- **{dtype} vs {dtype}**: vLLM generates " + " and ".join(parts)
                     + f" the tokens per second of our HF sampler (median over {pairs}).")

    lines += ["", "| workload | dtype | requests | HF tok/s | vLLM tok/s | vLLM / HF | HF tokens | vLLM tokens "
                  "| HF % of FLOP limit | vLLM % of FLOP limit |", "|---|---|---|---|---|---|---|---|---|---|"]
    w = meta["workloads"]
    for dtype in dtypes:
        for name in names:
            s = cell[(dtype, name)]
            requests = f"{w[name]['prompts']} x {w[name]['n']}, <= {w[name]['max_new_tokens']} tokens"
            lines.append(f"| {name} | {dtype} | {requests} | {spread(s['hf_tokens_per_s'])} | "
                         f"{spread(s['vllm_tokens_per_s'])} | {spread(s['ratio_per_repeat'], '.2f')} | "
                         f"{spread(s['hf_tokens'])} | {spread(s['vllm_tokens'])} | "
                         f"{spread([100 * x for x in s['hf_flop_fraction']], '.1f')} | "
                         f"{spread([100 * x for x in s['vllm_flop_fraction']], '.1f')} |")
    lines += ["", "Each cell: median (min-max) over the repeats; the ratio is taken per repeat pair. Requests: "
              "prompts (states for labels) x samples each, both backends given the same ones (temperature 1, "
              "seed 1000 + repeat); their samples differ (independent random streams), so do the tokens generated.", ""]

    # how it was measured
    hf_rows = [r for r in rows if r["backend"] == "hf"]
    hf_threads = "/".join(map(str, sorted({r["torch_threads"] for r in hf_rows})))
    vllm_threads = (f"OpenMP threads bound to CPU(s) {meta['vllm_bind']} (VLLM_CPU_OMP_THREADS_BIND)"
                    if meta["vllm_bind"] != "auto" else "vLLM's own binding (VLLM_CPU_OMP_THREADS_BIND=auto)")
    idle_cpu, hf_wall = sum(r["engine_cpu_seconds"] for r in hf_rows), sum(r["seconds"] for r in hf_rows)
    lines += ["How it was measured:",
              f"- Threads: the bench is pinned to CPU(s) {meta['cpus']}; HF ran with {hf_threads} torch thread(s), "
              f"vLLM's worker with {vllm_threads}, its scheduler process sharing the same CPUs.",
              f"- Order: per dtype one vLLM engine, then for each of {plural(meta['repeats'], 'repeat')} and each "
              f"workload HF and vLLM back to back, the first alternating between repeats. HF ran beside the idle "
              f"engine: its processes used {idle_cpu:.1f} CPU-seconds during the {hf_wall:.0f} s of HF runs "
              f"({100 * idle_cpu / max(hf_wall, 1e-9):.1f}% of one core).",
              f"- Engine start (enforce_eager {str(meta['eager']).lower()}): "
              + ", ".join(f"{d} {meta['engine_start_seconds'][d]:.0f} s" for d in dtypes)
              + "; then a warm-up call (kernels built on first use; excluded from the runs): "
              + ", ".join(f"{d} {meta['warmup_seconds'][d]:.0f} s" for d in dtypes)
              + f". The whole bench took {meta['wall_seconds']:.0f} s."]

    # reading it
    lines += ["", "Reading it:"]
    pin = f" ({env['vllm_distribution']} {v['vllm']} pins `{env['vllm_transformers_pin']}`)" \
        if env["vllm_transformers_pin"] else ""
    if meta["attention_heads"] != meta["kv_heads"] and not env["transformers_pack_gqa"]:
        lines.append(f"- Our HF sampler runs on transformers {v['transformers']} here{pin}. That version has no "
                     f"`pack_gqa`: whenever a batch's prompts differ in length (a padding mask), its SDPA path for "
                     f"grouped-query attention ({meta['attention_heads']} query heads per {meta['kv_heads']} "
                     f"key/value heads here) materialises the repeated keys/values (`repeat_kv`) at every decoding "
                     f"step. Newer transformers (the main environment's, without vLLM) decode without them and run "
                     f"our sampler faster, so these ratios overstate vLLM's lead over our sampler as installed "
                     f"without vLLM.")
    else:
        lines.append(f"- Our HF sampler runs on transformers {v['transformers']} here{pin}, whose decoding does not "
                     f"repeat the keys/values of grouped-query attention, as in the main environment.")
    if meta["device"] == "cpu" and not env["vllm_tcmalloc"]:
        lines.append(f"- {env['vllm_distribution']} {v['vllm']} here bundles no tcmalloc, so vLLM's worker allocated "
                     f"with glibc's malloc (vLLM warns that it is slower; the stages run it the same way).")
    if len(dtypes) > 1:
        a, b = dtypes[:2]
        def gain(name, key):
            return statistics.median(cell[(b, name)][key]) / statistics.median(cell[(a, name)][key])
        gains = [f"{name}: HF {gain(name, 'hf_tokens_per_s'):.2f}x, vLLM {gain(name, 'vllm_tokens_per_s'):.2f}x"
                 for name in names]
        lines.append(f"- {b} over {a} (median tok/s; the dtypes ran one after the other, not interleaved): "
                     + "; ".join(gains) + f". Matmul rate: {meta['matmul_gflops'][b] / meta['matmul_gflops'][a]:.2f}x.")
    fracs = [100 * x for s in summary for x in s["hf_flop_fraction"] + s["vllm_flop_fraction"]]
    lines.append(f"- FLOP fractions count 2 x {meta['parameters'] / 1e6:.0f}M FLOP per generated token against the "
                 f"matmul rate of the dtype both backends compute in: {min(fracs):.1f}-{max(fracs):.1f}% of the limit"
                 + ("; decoding a model this small at these batch sizes is bound by memory traffic and per-step "
                    "overhead, not FLOPs." if max(fracs) < 50 else "."))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the bench

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--work", default="runs/bench-vllm", help="where a GGUF model is converted to an HF directory")
    ap.add_argument("--states", type=int, default=2, help="states of the labels workload (x 16 rollouts)")
    ap.add_argument("--prompts", type=int, default=2, help="prompts of the solutions workload (x 4 solutions)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="cap both workloads' max_new_tokens (128 and 256); for smoke runs")
    ap.add_argument("--eager", type=int, default=1, help="vLLM enforce_eager (1: no compilation)")
    ap.add_argument("--hf-batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vllm-bind", default="same",
                    help="'same': vLLM's worker on the bench's --threads CPUs; 'auto': vLLM's own choice")
    ap.add_argument("--out", default=str(RESULTS / "vllm"))
    args = ap.parse_args()
    user_env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND") if k in os.environ}
    command = " ".join([*(f"{k}={shlex.quote(x)}" for k, x in user_env.items()), "python", *map(shlex.quote, sys.argv)])
    t_bench = time.perf_counter()

    # the same CPUs for both backends: pin this process (the engine's processes inherit it)
    cpus = sorted(os.sched_getaffinity(0))[:args.threads]
    os.sched_setaffinity(0, cpus)
    bind = "auto" if args.vllm_bind == "auto" else ",".join(map(str, cpus))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
    bind = os.environ["VLLM_CPU_OMP_THREADS_BIND"]

    from stepdapo.config import GenerationConfig, load_config
    from stepdapo.generation import HFGenerator, VLLMGenerator, hf_sampling_dtype
    from stepdapo.models import import_model, load_policy, set_threads
    from stepdapo.precision import cpu_model, fast_bf16
    from stepdapo.tasks import get_task

    set_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = import_model(os.path.expanduser(args.model), Path(args.work) / "model")
    task = get_task(load_config("configs/gsm8k-smollm2.yaml").task)
    dtypes = args.dtypes.split(",")
    settings = {d: GenerationConfig(backend="vllm", dtype=d, enforce_eager=bool(args.eager)) for d in dtypes}
    hf = {}
    for d in dtypes:  # the policy as the HF backend loads it for this generation.dtype
        model, tok = load_policy(model_dir, dtype=hf_sampling_dtype(settings[d]))
        hf[d] = HFGenerator(model.to(device), tok, task.step_delimiter, batch_size=args.hf_batch_size, progress=False)
    n_params = sum(p.numel() for p in model.parameters())
    work = workloads(task, tok, args.states, args.prompts, args.max_new_tokens)
    flops = {d: matmul_gflops(getattr(torch, d), device) for d in dtypes}
    print(f"{n_params / 1e6:.0f}M parameters; matmul GFLOP/s: {flops}; CPUs {cpus}, vLLM bind {bind}", flush=True)
    for d in dtypes:  # HF's one-time costs (kernel selection) out of the first measured run
        for prompts, n, max_new in work.values():
            run_once(hf[d], prompts[:2], 2, 8, seed=0)

    rows, starts, warmups = [], {}, {}
    for dtype in dtypes:
        t0 = time.perf_counter()
        vg = VLLMGenerator(model_dir, task.step_delimiter, settings[dtype], progress=False)
        starts[dtype] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for prompts, n, max_new in work.values():  # warm-up: the first calls build kernels
            run_once(vg, prompts[:2], 2, 8, seed=0)
        warmups[dtype] = time.perf_counter() - t0
        for r in range(args.repeats):
            for name, (prompts, n, max_new) in work.items():
                pair = [("hf", hf[dtype]), ("vllm", vg)]
                if r % 2:  # who goes first alternates between repeats
                    pair.reverse()
                for backend, gen in pair:
                    torch.set_num_threads(args.threads)  # as HF runs in a stage, whatever vLLM did to it
                    threads, cpu0 = torch.get_num_threads(), engine_cpu_seconds()
                    res = run_once(gen, prompts, n, max_new, seed=1000 + r)
                    res.update(dtype=dtype, workload=name, backend=backend, repeat=r, sequences=len(prompts) * n,
                               torch_threads=threads, engine_cpu_seconds=engine_cpu_seconds() - cpu0,
                               flop_fraction=res["tokens_per_s"] * 2 * n_params / (flops[dtype] * 1e9))
                    rows.append(res)
                    print(json.dumps(res), flush=True)
        vg.close()

    ok, why = fast_bf16()
    meta = {"command": command, "model": str(args.model), "model_name": Path(args.model).name,
            "parameters": n_params, "device": device,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "fast_bf16": ok, "fast_bf16_why": why,
            "versions": versions(), "environment": environment_notes(),
            "attention_heads": model.config.num_attention_heads,
            "kv_heads": getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads,
            "threads": args.threads, "cpus": ",".join(map(str, cpus)), "vllm_bind": bind,
            "env": user_env, "matmul_gflops": flops, "eager": bool(args.eager),
            "engine_start_seconds": starts, "warmup_seconds": warmups,
            "states": args.states, "prompts": args.prompts, "repeats": args.repeats,
            "workloads": {name: {"prompts": len(p), "n": n, "max_new_tokens": m} for name, (p, n, m) in work.items()},
            "wall_seconds": time.perf_counter() - t_bench}
    summary = summarise(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    page = report(meta, rows, summary)
    out.with_suffix(".md").write_text(page)
    print(page)


if __name__ == "__main__":
    main()
