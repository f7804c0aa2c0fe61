"""SmolLM2-135M-Instruct greedy pass@1 on GSM8K test (the paper's metric), on this machine's CPU.

    bash ../shared/tools/get-smollm2
    python bench/bench_smollm2.py [--limit 200] [--from-json EVAL.json]

Runs `stepdapo evaluate --config configs/gsm8k-smollm2.yaml --limit N` (or reads the JSON such a run
wrote) and writes bench/results/smollm2-gsm8k.json and .md: accuracy with its Wilson interval, why
the wrong ones were wrong, generation speed and wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--config", default="configs/gsm8k-smollm2.yaml")
    ap.add_argument("--from-json", help="an evaluate --out JSON to format instead of running")
    args = ap.parse_args()
    src = Path(args.from_json) if args.from_json else RESULTS / "smollm2-gsm8k.eval.tmp.json"
    if not args.from_json:
        subprocess.run([sys.executable, "-m", "stepdapo.cli", "evaluate", "--config", args.config,
                        "--limit", str(args.limit), "--out", str(src)], check=True)
    ev = json.loads(src.read_text())["eval"]
    result = {"config": args.config, "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
              **{k: ev.get(k) for k in ("n", "accuracy", "ci95", "reasons", "greedy_tokens_per_s", "seconds")}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "smollm2-gsm8k.json").write_text(json.dumps(result, indent=2) + "\n")
    lo, hi = ev["ci95"]
    md = ["# SmolLM2-135M-Instruct on GSM8K test (greedy pass@1)", "",
          f"`python bench/bench_smollm2.py --limit {ev['n']}` ({args.config}; Q4_1 GGUF dequantized to "
          f"float32; chat template; answer = last `\\boxed{{}}`, checked with math-verify).", "",
          "| problems | greedy pass@1 | 95% interval (Wilson) | tokens/s | wall time |", "|---|---|---|---|---|",
          f"| {ev['n']} | {100 * ev['accuracy']:.1f}% | [{100 * lo:.1f}, {100 * hi:.1f}] | "
          f"{ev['greedy_tokens_per_s']:.0f} | {ev.get('seconds', float('nan')):.0f} s |", "",
          "Why the rest were judged wrong (top reasons):", ""]
    reasons = sorted(ev.get("reasons", {}).items(), key=lambda kv: -kv[1])
    md += [f"- {k}: {v}" for k, v in reasons[:8]]
    md += ["", f"Machine: {result['machine']}."]
    (RESULTS / "smollm2-gsm8k.md").write_text("\n".join(md) + "\n")
    if not args.from_json:
        src.unlink()
    print("\n".join(md))


if __name__ == "__main__":
    main()
