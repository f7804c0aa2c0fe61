"""Peak memory and time of the log-prob paths on this CPU, like for like (same model, tokens, dtype,
threads; each measurement in a fresh process, the variants interleaved, 3 repetitions):

  scoring      `batched_sequence_logprobs` (no gradient) of 16 rows x 512 tokens: log-probs from
               hidden states in chunks of 1024 positions (`logits_chunk_tokens`) against HF's full
               logits + log_softmax (`logits_chunk_tokens=0`, the old path);
  training     one forward + backward of the DAPO actor's log-probs on 8 states x 4 actions
               (state 384 tokens, actions 32: 1024 scored positions), chunks of 256 positions: shared
               prefix through the KV cache (the default), without and with gradient checkpointing
               (which packs each state and its actions into one row), and the old full-logits path.
               (The default chunk, 4096, is one chunk here: as much logit memory as the old path,
               bounded by 4096 positions' logits however long the batch.)

Models: a random-initialised model of Qwen2.5-0.5B's shape cut to 4 layers (its 152k vocabulary and
896 hidden: the logits dominate as in the real model) and, when ../shared/tools/get-smollm2 has
fetched it, SmolLM2-135M (49k vocabulary, 30 layers). Peak = the most resident memory (polled
every 2 ms) during the measured call above the resident memory just before it (after a warm-up
call and malloc_trim), in MB.

    python bench/bench_memory.py          # ~16 min on a 2-core CPU; writes bench/results/memory.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

PROBE = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from stepdapo.logprobs import batched_sequence_logprobs, sequence_logprobs
model_name, what, variant = sys.argv[2], sys.argv[3], sys.argv[4]
torch.set_num_threads(int(sys.argv[5]))
torch.manual_seed(0)
if model_name == "qwen-shape":
    from transformers import Qwen2Config, Qwen2ForCausalLM
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=4,
                                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                         tie_word_embeddings=True))
else:
    from stepdapo.models import load_policy
    model = load_policy(model_name)[0]
V = model.config.vocab_size
chunk = {"plain": 0}.get(variant, 1024 if what == "scoring" else 256)
if what == "scoring":
    model.eval()
    prompts = torch.randint(1, V, (16, 256)).tolist()
    completions = torch.randint(1, V, (16, 256)).tolist()
    run = lambda p, c: batched_sequence_logprobs(model, p, c, logits_chunk=chunk, max_batch_tokens=10**6)
    tokens = 16 * 512
else:
    model.train()
    if variant == "checkpointed":
        enable = getattr(model, "activation_checkpointing_enable", None)
        enable({"use_reentrant": False}) if enable else \
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    states = torch.randint(1, V, (8, 384)).tolist()
    prompts = [s for s in states for _ in range(4)]
    completions = torch.randint(1, V, (32, 32)).tolist()
    run = lambda p, c: sequence_logprobs(model, p, c, shared_prefix=True, logits_chunk=chunk).sum().backward()
    tokens = 8 * 384 + 32 * 32
run(prompts[:1], [completions[0][:4]])  # warm-up: the allocator, lazy initialisation
model.zero_grad(set_to_none=True)
import ctypes, os, threading
ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what building the model left free
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
before, peak, done = rss(), [0], threading.Event()
def poll():  # the process's resident memory every 2 ms: max RSS cannot be reset after building the model
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
threading.Thread(target=poll, daemon=True).start()
t0 = time.perf_counter()
run(prompts, completions)
seconds = time.perf_counter() - t0
done.set()
print(json.dumps({"peak_mb": (max(peak[0], rss()) - before) / 2**20, "seconds": seconds, "tokens": tokens}))
"""


def measure(model: str, what: str, variant: str, threads: int) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "src"), model, what, variant, str(threads)],
                       capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "memory"))
    a = ap.parse_args(argv)
    models = ["qwen-shape"]
    smol = Path("~/.cache/stepdapo-test-models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()
    if smol.is_file():
        models.append(str(smol))
    plan = [(m, "scoring", v) for m in models for v in ("chunked", "plain")] + \
           [(m, "training", v) for m in models for v in ("chunked", "checkpointed", "plain")]
    runs: dict = {}
    for _ in range(a.reps):  # interleaved: the machine's drift hits every variant alike
        for key in plan:
            runs.setdefault(key, []).append(measure(*key, a.threads))
            print(key, runs[key][-1], flush=True)
    from stepdapo.precision import fast_bf16

    rows = []
    for (m, what, variant), rs in runs.items():
        rows.append({"model": "SmolLM2-135M" if m != "qwen-shape" else "Qwen2.5-0.5B shape, 4 layers",
                     "pass": what, "variant": variant, "peak_mb_median": statistics.median(r["peak_mb"] for r in rs),
                     "seconds_median": statistics.median(r["seconds"] for r in rs),
                     "tokens": rs[0]["tokens"], "reps": len(rs)})
    meta = {"cpu": cpu_name(), "bf16": fast_bf16()[1], "threads": a.threads, "dtype": "float32",
            "torch": __import__("torch").__version__}
    Path(a.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": {" / ".join(k): v for k, v in
                                                                                       runs.items()}}, indent=1))
    lines = ["# Memory of the log-prob paths (`python bench/bench_memory.py`)", "",
             f"{meta['cpu']}, {a.threads} threads, float32 ({meta['bf16']}), torch {meta['torch']}; "
             f"median of {a.reps} interleaved runs, each in a fresh process. Peak = resident memory polled every 2 ms during the call, above its level just before.",
             "", "| model | pass | variant | peak MB | seconds | tokens/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['pass']} | {r['variant']} | {r['peak_mb_median']:.0f} | "
                     f"{r['seconds_median']:.2f} | {r['tokens'] / r['seconds_median']:.0f} |")
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
