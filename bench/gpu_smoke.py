"""A prepared GPU check: what an 8B run on GPUs would hit first, in minutes, with no network and no
download. Every probe records peak memory, time and tokens/s; any failure exits non-zero.

    # on one GPU (~5 min on an H100; budget 8):
    python bench/gpu_smoke.py
    # the CI-sized form on a CPU (~1 min):
    python bench/gpu_smoke.py --device cpu --size ci

Probes:
  score        log-probs of R rows x L tokens under a random-initialised model of a real shape
               (Qwen2.5-0.5B's by default: 152k vocabulary), chunked (`logits_chunk_tokens`) against
               HF's own logits: the values must agree, the chunked peak must be the smaller;
  train        one DAPO-loss optimizer step (AdamW, float32 master weights, bf16 autocast where the
               device has it) with and without gradient checkpointing: equal loss, the checkpointed
               peak the smaller (CUDA; a CPU's RSS cannot show it);
  critic       log-ratio critic scoring (two language models) in `max_batch_tokens` batches;
  pipeline     the tiny model end to end (`stepdapo run`, reduced counts) on the device;
  fsdp         one FSDP2 process (`accelerate launch --config_file configs/accelerate/fsdp.yaml
               --num_processes 1`) training the actor on the pipeline's advantages (CUDA only).

Results: printed as a table and written to --out (default bench/results/gpu-smoke-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from stepdapo.logprobs import batched_sequence_logprobs, sequence_logprobs  # noqa: E402
from stepdapo.losses import dapo_loss  # noqa: E402
from stepdapo.models import LogRatioCritic, critic_values  # noqa: E402

# (hidden, intermediate, layers, heads, kv heads, vocab, tied) of real models, as in their config.json
SHAPES = {
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256, False),
    "ci": (64, 128, 2, 4, 2, 151936, True),  # Qwen's vocabulary on a 2-layer toy: the logits still dominate
}
SIZES = {  # rows x tokens of the score/train probes, the pipeline's overrides
    "full": {"rows": 16, "tokens": 1024, "train_rows": 4, "chunk": 1024, "pipeline": ["states.n_problems=200", "label.rollouts=8",
                                                                         "iterations=1", "eval.limit=200",
                                                                         "prm.problems=50", "baselines=[]"]},
    "ci": {"rows": 4, "tokens": 256, "train_rows": 2, "chunk": 64, "pipeline": None},  # the pipeline: tests/test_pipeline.py
}


def build(shape: str, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    h, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=4096)
    return Qwen2ForCausalLM(cfg).float()


class Peak:
    """Peak memory of a block: CUDA's allocator peak, or the process's max RSS growth on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.gb = (torch.cuda.max_memory_allocated() - self.base) / 2**30
        else:
            self.gb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base) / 2**30
        self.seconds = time.perf_counter() - self.t0


def _data(rows: int, tokens: int, vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, vocab, (rows, tokens // 2), generator=g).tolist()
    completions = torch.randint(1, vocab, (rows, tokens - tokens // 2), generator=g).tolist()
    return prompts, completions


def probe_score(model, device, size, bf16) -> dict:
    prompts, completions = _data(size["rows"], size["tokens"], model.config.vocab_size)
    n = size["rows"] * size["tokens"]
    out = {}
    values = {}
    for name, chunk in (("chunked", size["chunk"]), ("plain", 0)):  # chunked first: a CPU's max RSS only grows
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), Peak(device) as p:
            values[name] = batched_sequence_logprobs(model, prompts, completions, logits_chunk=chunk,
                                                     max_batch_tokens=size["rows"] * size["tokens"])
        out[name] = {"peak_gb": round(p.gb, 3), "seconds": round(p.seconds, 3), "tokens_per_s": round(n / p.seconds)}
    diff = max(abs(a - b) for a, b in zip(values["chunked"], values["plain"]))
    scale = max(abs(b) for b in values["plain"])
    out["max_abs_diff"], out["scale"] = diff, scale
    tol = (2e-2 if bf16 else 1e-4) * scale
    if diff > tol:
        raise AssertionError(f"chunked log-probs differ from HF's logits by {diff:.3g} (> {tol:.3g})")
    if device.type == "cuda" and out["chunked"]["peak_gb"] >= out["plain"]["peak_gb"]:  # (tests/test_memory_paths.py
        # measures the CPU's bound in fresh processes: one process's max RSS cannot)
        raise AssertionError(f"the chunked pass's peak ({out['chunked']['peak_gb']} GB) is not below the plain "
                             f"one's ({out['plain']['peak_gb']} GB)")
    return out


def probe_train(shape, device, size, bf16) -> dict:
    out, losses = {}, {}
    for name, ckpt in (("checkpointed", True), ("plain", False)):
        model = build(shape).to(device).train()
        if ckpt:
            enable = getattr(model, "activation_checkpointing_enable", None)
            enable({"use_reentrant": False}) if enable else \
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
        prompts, completions = _data(size["train_rows"], size["tokens"], model.config.vocab_size, seed=2)
        adv = torch.linspace(-0.5, 0.5, len(prompts), device=device)
        with Peak(device) as p:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logps = sequence_logprobs(model, prompts, completions, shared_prefix=True, logits_chunk=size["chunk"])
            loss = dapo_loss(logps.float(), logps.detach().float(), adv, 0.1)  # the first step: log-ratio 0
            loss.backward()
            opt.step()
        losses[name] = float(loss.detach())
        dtypes = {str(s.dtype) for st in opt.state.values() for s in st.values() if torch.is_tensor(s) and s.dim()}
        out[name] = {"peak_gb": round(p.gb, 3), "seconds": round(p.seconds, 3),
                     "tokens_per_s": round(size["train_rows"] * size["tokens"] / p.seconds),
                     "optimizer_state": sorted(dtypes)}
        if dtypes != {"torch.float32"}:
            raise AssertionError(f"AdamW state is {dtypes}, not float32")
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["loss"] = losses
    if abs(losses["checkpointed"] - losses["plain"]) > 1e-3 * (1 + abs(losses["plain"])):
        raise AssertionError(f"checkpointing changed the loss: {losses}")
    if device.type == "cuda" and out["checkpointed"]["peak_gb"] >= out["plain"]["peak_gb"]:
        raise AssertionError("gradient checkpointing did not lower the peak")
    return out


def probe_critic(shape, device, size, bf16) -> dict:
    critic = LogRatioCritic(build(shape), build(shape), torch.nn.Linear(SHAPES[shape][0], 1), 0.5, ".").to(device)
    prompts, completions = _data(size["rows"], size["tokens"], SHAPES[shape][5], seed=3)
    seqs = [p + c for p, c in zip(prompts, completions)]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), Peak(device) as p:
        v = critic_values(critic, seqs, 0, prompt_lens=[len(x) for x in prompts], max_batch_tokens=4 * size["tokens"])
    if not all(0 < x < 1 for x in v):
        raise AssertionError(f"critic values outside (0, 1): {v[:4]}")
    return {"peak_gb": round(p.gb, 3), "seconds": round(p.seconds, 3),
            "tokens_per_s": round(2 * len(seqs) * size["tokens"] / p.seconds)}


def _stepdapo(args: list[str], device: torch.device, launcher: list[str] | None = None, timeout: int = 420):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = (launcher or [sys.executable]) + ["-m", "stepdapo", *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def probe_pipeline(device, size, work: Path) -> dict:
    seconds = _stepdapo(["run", "configs/arithmetic.yaml", "--out", str(work / "run"), *size["pipeline"]], device)
    report = json.loads((work / "run" / "report.json").read_text()) if (work / "run" / "report.json").is_file() else {}
    return {"seconds": round(seconds, 1), "report_keys": sorted(report)[:8]}


def probe_fsdp(device, work: Path) -> dict:
    run = work / "run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs/accelerate/fsdp.yaml"), "--num_processes", "1"]
    seconds = _stepdapo(["actor", "--model", str(run / "bootstrap"), "--advantages", str(run / "iter-1/advantages"),
                         "--out", str(work / "fsdp-actor"), "actor.epochs=1"], device, launcher)
    summary = json.loads((work / "fsdp-actor" / "stepdapo_actor.json").read_text())
    return {"seconds": round(seconds, 1), "steps": summary["steps"], "processes": summary["processes"],
            "final_log_ratio_mean": summary.get("final_log_ratio_mean")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="full on CUDA, ci on a CPU by default")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="the model shape of the score/train/critic probes (qwen2.5-0.5b; ci with --size ci)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--probes", nargs="*", default=["score", "train", "critic", "pipeline", "fsdp"])
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    size_name = a.size or ("full" if device.type == "cuda" else "ci")
    size, shape = SIZES[size_name], a.shape or ("ci" if size_name == "ci" else "qwen2.5-0.5b")
    from stepdapo.precision import fast_bf16

    bf16 = fast_bf16()[0] if device.type == "cuda" else False
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                     or platform.machine(), "torch": torch.__version__, "size": size_name, "shape": shape,
                     "bf16": bf16, "probes": {}}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in a.probes:
            t0 = time.perf_counter()
            try:
                if name == "score":
                    r = probe_score(build(shape).to(device).eval(), device, size, bf16)
                elif name == "train":
                    r = probe_train(shape, device, size, bf16)
                elif name == "critic":
                    r = probe_critic(shape, device, size, bf16)
                elif name == "pipeline":
                    r = probe_pipeline(device, size, work) if size["pipeline"] else {"skipped": "size ci"}
                elif name == "fsdp":
                    r = probe_fsdp(device, work) if device.type == "cuda" and (work / "run").is_dir() else \
                        {"skipped": "CUDA and the pipeline probe's run only"}
                else:
                    raise ValueError(f"unknown probe {name}")
                r["status"] = "ok" if "skipped" not in r else "skipped"
            except Exception as e:  # noqa: BLE001 - every probe runs; the exit code says any failed
                r = {"status": "FAILED", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
                failed.append(name)
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            results["probes"][name] = r
            print(f"{name:9s} {r['status']:8s} {json.dumps({k: v for k, v in r.items() if k not in ('trace',)})}",
                  flush=True)
    out = Path(a.out or ROOT / "bench" / "results" / f"gpu-smoke-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
