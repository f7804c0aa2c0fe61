"""ProcessBench's protocol for a run's critics on the built-in task: does each iteration's critic
find the earliest wrong step? Writes bench/results/prm-processbench.md (and .json).

    python bench/bench_prm_processbench.py --run runs/plan-default [--n 1000] [--seed 0]

The rows are `stepdapo prm processbench`'s (the test split's first N problems: half correct, half with
one wrong step at a random position, labels exact), scored with both rules of `stepdapo prm eval`
(the step's value, ProcessBench's; the step's advantage); the threshold is chosen on the calibration
half of the rows and the scores come from the other half."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from stepdapo.config import from_dict, load_config  # noqa: E402
from stepdapo.precision import cpu_model  # noqa: E402
from stepdapo.prm import RULES, arithmetic_processbench, eval_file, write_scores  # noqa: E402
from stepdapo.tasks import get_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a finished `stepdapo run` directory of the built-in task")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prm-processbench"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import yaml

    run = Path(a.run)
    cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text())) if (run / "config.yaml").is_file() else load_config()
    task = get_task(cfg.task)
    critics = sorted(run.glob("iter-*/critic"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "processbench.jsonl"
        write_scores(data, arithmetic_processbench(task, "test", a.n, a.seed))
        for critic in critics:
            for rule in RULES:
                r = eval_file(critic, data, task, rule=rule, progress=False)
                results.append({**r, "critic": str(critic.relative_to(run.parent)), "data": None})
                print(f"{critic} {rule}: F1 {100 * r['f1']:.1f}", flush=True)

    def pct(x, ci):
        return f"{100 * x:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"

    md = [f"# ProcessBench's protocol on the built-in task: {run}'s critics", "",
          f"`python bench/bench_prm_processbench.py --run {a.run} --n {a.n} --seed {a.seed} --threads {a.threads}`", "",
          f"Rows: the test split's first {a.n} problems (`stepdapo prm processbench`, seed {a.seed}): every other one "
          "the correct worked solution (label -1), the rest with one wrong step at a random position (an operand "
          "result off by 1 to 9, mod 10; later steps carry on from the written value), so labels are exact. A "
          "critic predicts the first step whose score is below a threshold: the step's value V(prefix) "
          "(ProcessBench's rule) or its advantage V(prefix) - V(prefix before it). The threshold is chosen for the "
          "best F1 on the calibration half of the rows (a hash of each row's id) and the scores are on the other "
          "half, 95% Wilson intervals. The answer line (no delimiter ends it) is not scored: the critic is never "
          "trained on such a prefix (no wrong step is placed there).", "",
          f"Machine: {cpu_model()}, {a.threads} torch thread(s); torch {torch.__version__}.", "",
          "| critic | rule | threshold | erroneous right | correct right | F1 |", "|---|---|---:|---:|---:|---:|"]
    for r in results:
        md.append(f"| {r['critic']} | {r['rule']} | {r['threshold']:.3f} | {pct(r['acc_erroneous'], r['acc_erroneous_ci95'])} "
                  f"(n={r['n_erroneous']}) | {pct(r['acc_correct'], r['acc_correct_ci95'])} (n={r['n_correct']}) | "
                  f"{100 * r['f1']:.1f} |")
    Path(a.out + ".md").write_text("\n".join(md) + "\n")
    Path(a.out + ".json").write_text(json.dumps({"run": str(run), "n": a.n, "seed": a.seed, "results": results},
                                                indent=2) + "\n")
    print(f"-> {a.out}.md")


if __name__ == "__main__":
    main()
