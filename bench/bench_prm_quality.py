"""A run's critics judged as process reward models on the built-in task, two ways:

1. ProcessBench's protocol (bench/results/prm-processbench.md): rows from `stepdapo prm processbench`
   (the test split's first problems: half correct, half with one wrong step at a random position,
   labels exact), scored with both rules of `stepdapo prm eval` (the step's value, ProcessBench's;
   the step's advantage); the threshold is chosen on the calibration half of the rows and the scores
   come from the other half.
2. At test time (bench/results/prm-bestofn.md): 64 samples per test problem from the policy each
   critic was trained for (iter-1: the SFT model, iter-2: the first actor; temperature 1), then
   best-of-N by the critic (its step values aggregated by min, last and product), critic-weighted
   majority vote, plain majority vote, pass@N and random@1, N = 1, 4, 16, 64 (N takes the first N),
   with 95% bootstrap intervals over problems.

    python bench/bench_prm_quality.py --run runs/plan-default [--rows 1000] [--problems 500] [--threads 2]

A solution's answer line is not scored (never a critic state: stepdapo.prm); "last" is the value of
the prefix before it, the critic's estimate that the solution so far ends correct.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from stepdapo.config import from_dict, load_config  # noqa: E402
from stepdapo.generation import SamplingParams, policy_generator  # noqa: E402
from stepdapo.models import load_critic  # noqa: E402
from stepdapo.precision import cpu_model  # noqa: E402
from stepdapo.prm import RULES, TEST_TIME_METHODS as METHODS, best_of_n_table, eval_file, sample_scores, write_scores  # noqa: E402,E501
from stepdapo.tasks import get_task  # noqa: E402

NS = (1, 4, 16, 64)


def pct(x, ci) -> str:
    return f"{100 * x:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def processbench(run: Path, critics: list[Path], task, rows: int, seed: int) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "processbench.jsonl"
        write_scores(data, task.processbench_rows("test", rows, seed))
        for critic in critics:
            for rule in RULES:
                r = eval_file(critic, data, task, rule=rule, progress=False)
                results.append({**r, "critic": str(critic.relative_to(run.parent)), "data": None})
                print(f"{critic} {rule}: F1 {100 * r['f1']:.1f}", flush=True)
    return results


def best_of_n(run: Path, critic_dir: Path, task, n_problems: int, seed: int) -> dict:
    k = int(critic_dir.parent.name.split("-")[1])
    policy = run / "sft" if k == 1 else run / f"iter-{k - 1}" / "actor"
    problems = task.problems("test")[:n_problems]
    gen = policy_generator(policy, task.step_delimiter, 512, progress=False)()
    critic, tok = load_critic(critic_dir)
    rows = sample_scores(gen, critic, tok, task, problems, max(NS),
                         SamplingParams(temperature=1.0, max_new_tokens=64, seed=seed))
    table = best_of_n_table(rows, list(NS))
    print(f"iteration {k}: " + ", ".join(f"{key} {100 * t['mean']:.1f}" for key, t in table.items() if key.endswith("@16")),
          flush=True)
    return {"iteration": k, "policy": str(policy), "critic": str(critic_dir), "table": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a finished `stepdapo run` directory of the built-in task")
    ap.add_argument("--rows", type=int, default=1000, help="ProcessBench rows (test problems)")
    ap.add_argument("--problems", type=int, default=500, help="test problems of the best-of-N table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import yaml

    run = Path(a.run)
    cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text())) if (run / "config.yaml").is_file() else load_config()
    task = get_task(cfg.task)
    critics = sorted(run.glob("iter-*/critic"))
    command = (f"`python bench/bench_prm_quality.py --run {a.run} --rows {a.rows} --problems {a.problems} "
               f"--seed {a.seed} --threads {a.threads}`")
    machine = f"Machine: {cpu_model()}, {a.threads} torch thread(s); torch {torch.__version__}."
    out = ROOT / "bench" / "results"

    t0 = time.perf_counter()
    pb = processbench(run, critics, task, a.rows, a.seed)
    md = [f"# ProcessBench's protocol on the built-in task: {run}'s critics", "", f"{command} (this part "
          f"{time.perf_counter() - t0:.0f} s)", "", __doc__.split("\n\n")[1].strip().replace("\n", " "), "",
          "A wrong step is an operand result off by 1 to 9 (mod 10); later steps carry on from the written value. "
          "The answer line is not scored: the critic is never trained on such a prefix (no wrong step is placed "
          "there). 95% Wilson intervals.", "", machine, "",
          "| critic | rule | threshold | erroneous right | correct right | F1 |", "|---|---|---:|---:|---:|---:|"]
    for r in pb:
        md.append(f"| {r['critic']} | {r['rule']} | {r['threshold']:.3f} | {pct(r['acc_erroneous'], r['acc_erroneous_ci95'])} "
                  f"(n={r['n_erroneous']}) | {pct(r['acc_correct'], r['acc_correct_ci95'])} (n={r['n_correct']}) | "
                  f"{100 * r['f1']:.1f} |")
    (out / "prm-processbench.md").write_text("\n".join(md) + "\n")
    (out / "prm-processbench.json").write_text(json.dumps({"run": str(run), "rows": a.rows, "seed": a.seed,
                                                           "results": pb}, indent=2) + "\n")

    t0 = time.perf_counter()
    bn = [best_of_n(run, c, task, a.problems, a.seed) for c in critics]
    md = [f"# The critic at test time on the built-in task: {run}", "",
          f"{command} (this part {time.perf_counter() - t0:.0f} s)", "", __doc__.split("\n\n")[2].strip().replace("\n", " "),
          "", "pass@N: any of N correct (an oracle's ceiling); random: the mean over the N (the expected accuracy of one "
          "sample); majority: the most frequent answer; weighted vote: each answer's votes weighted by the critic's "
          "last value; best-of-N: the sample whose step values aggregate highest. The share of problems whose chosen "
          "answer is correct, in %, with 95% bootstrap intervals over problems. The answer line is not scored; "
          "\"last\" is the value of the prefix before it.", "", machine, ""]
    for r in bn:
        md += [f"## Iteration {r['iteration']}: policy `{r['policy']}`, critic `{r['critic']}`", "",
               "| method | " + " | ".join(f"N={n}" for n in NS) + " |", "|---|" + "---:|" * len(NS)]
        md += [f"| {m} | " + " | ".join(pct(r["table"][f"{m}@{n}"]["mean"], r["table"][f"{m}@{n}"]["ci95"]) for n in NS)
               + " |" for m in METHODS] + [""]
    (out / "prm-bestofn.md").write_text("\n".join(md))
    (out / "prm-bestofn.json").write_text(json.dumps({"run": str(run), "problems": a.problems, "results": bn},
                                                     indent=2) + "\n")
    # both parts on one page: the PRM table of the run's critics
    pb_body = (out / "prm-processbench.md").read_text().split("\n", 1)[1]
    bn_body = "\n".join(md).split("\n", 1)[1].replace("\n## ", "\n### ")
    (out / "prm.md").write_text(f"# The critics of {run} as process reward models\n\n## ProcessBench's protocol\n"
                                f"{pb_body}\n## At test time: best-of-N and weighted voting\n{bn_body}")
    print(f"-> {out}/prm.md (= prm-processbench.md + prm-bestofn.md)")


if __name__ == "__main__":
    main()
