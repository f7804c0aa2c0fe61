"""Our training steps against TRL 1.16's DPOTrainer (precomputed reference log-probs): same model,
same tokens, interleaved rounds. Two parts, both in one run:

actor     the DAPO actor (`DAPOTrainer`, `shared_prefix` on as in the default config) against TRL's
          DPOTrainer on the SAME WORK (issue 11, item 4):
            (a) 256 states/prompts of 96 tokens, 2 actions/responses of 32 tokens each, 16 states a step;
            (b) the long-state case: 512-token states with 8 actions of 32 tokens, 4 states a step
                (`--long-steps` steps, 32 states by default).
          For TRL a state with M actions becomes M/2 (prompt, chosen, rejected) triples, the actions
          ranked by advantage and paired best with worst, next best with next worst, ... (each action in
          exactly one pair; the prompt repeated in every pair, as DPOTrainer must be fed). An optimizer
          step is the same work for both: 32 actions of 4 states (b) or 16 states (a) for ours, the
          16 pairs made of them for TRL.
baseline  the outcome-level DPO baseline (`OutcomeDPOTrainer`, shared prefix on and off) against
          TRL's DPOTrainer on the same triples: batches of 4, distinct prompts of P = 512 and 96 tokens,
          completions of 32 and 24 tokens.

Throughput, "tokens of the same work per second": the distinct tokens of a step's work, each state
(prompt) counted ONCE plus every action (response) token, i.e. sum over the step's states of
(state tokens + the tokens of all its actions), divided by the step's wall time. The numerator is
the same for both trainers (TRL's repeated prompt is counted once), so the ratio ours / TRL is the
ratio of step times. Also reported: the tokens each one actually runs through the model.

Timing: a callback stamps every optimizer step; a step's time is from the end of the previous step to
the end of this one (so the Trainer's data fetching and the collator, which run before
`on_step_begin`, are included); the first step of every run is left out. The compute-only time
(`on_step_begin` to `on_step_end`) is in the .json. In each round the trainers of a cell run one after
the other, the order flipping every round; `--repeats` rounds; medians over all rounds' steps.
Reference log-probs are precomputed in both (TRL's `precompute_ref_log_probs`, before its first step;
ours are handed in, as `run_actor` does after its own cached forward pass), so a step is the policy's
forward, backward, clipping and AdamW update.

TRL runs with `gradient_checkpointing=False` and `bf16=False` (its DPOConfig defaults both to True;
ours trains in float32 without checkpointing, which the shared prefix cannot use), the same AdamW
betas (0.9, 0.95), learning rate, clipping and logging interval as ours. Its LM head is fused (log-probs
of the completion positions only), as ours only computes the completions' logits.

Model: kept from the earlier version of this bench (a Llama with hidden 256, 4 layers, 8 heads (4 kv),
MLP 688, tied embeddings; the character vocabulary, float32, random weights: the cost, not the values,
is measured). Unchanged because both trainers compute log-probs of completion positions only, so a
real vocabulary would mostly add the same LM-head work to both; the body, where prefix sharing acts,
is what differs. All lengths are uniform (no padding in either).

    # trl in its own venv that reuses the project's packages (`pip install --dry-run trl` there
    # installs only trl: torch and transformers stay as they are)
    python -m venv /tmp/trl-venv
    python -c "import site; print(site.getsitepackages()[0])" > "$(/tmp/trl-venv/bin/python -c \
        'import site; print(site.getsitepackages()[0])')/main-venv.pth"   # run with the project's venv active
    /tmp/trl-venv/bin/pip install 'trl==1.16.*'
    OMP_NUM_THREADS=2 PYTHONPATH=src /tmp/trl-venv/bin/python bench/bench_dpo_trl.py --threads 2 --repeats 3

Writes bench/results/dpo-vs-trl.md and .json (`--out` elsewhere; `--parts` runs a part alone and keeps
the other's section and rows from the existing files).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch
import trl
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments
from trl import DPOConfig, DPOTrainer

from stepdapo.models import char_tokenizer
from stepdapo.stages.actor import DAPOTrainer, _StateCollator, group_by_state
from stepdapo.stages.dpo import OutcomeDPOTrainer, _PairCollator

RESULTS = Path(__file__).parent / "results"
ACTION = 32  # action / response tokens (the last one eos)
LR, BETAS, DAPO_BETA, DPO_BETA = 1e-4, (0.9, 0.95), 0.3, 0.1  # configs/arithmetic.yaml's actor and baseline
PAIRS, BASE_STEPS = 4, 4  # the baseline part


class StepTimer(TrainerCallback):
    """`steps`: on_step_begin -> on_step_end (compute only); `periods`: on_step_end -> on_step_end (the
    whole loop iteration, data loading and collation included; the first step has none)."""

    def __init__(self):
        self.steps, self.periods, self.t0, self.t_end = [], [], None, None

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        t = time.perf_counter()
        self.steps.append(t - self.t0)
        if self.t_end is not None:
            self.periods.append(t - self.t_end)
        self.t_end = t


def model(tok):
    torch.manual_seed(0)  # the bench_shared_prefix.py shape, with the character vocabulary
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))


def digits_fn(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda n: "".join(str(d) for d in torch.randint(0, 10, (n,), generator=g).tolist())


def run_trl(tok, rows, out: str, batch: int, steps: int, check=None) -> StepTimer:
    timer = StepTimer()
    args = DPOConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=LR,
                     adam_beta1=BETAS[0], adam_beta2=BETAS[1], max_grad_norm=1.0, beta=DPO_BETA,
                     precompute_ref_log_probs=True, gradient_checkpointing=False, bf16=False,
                     report_to="none", use_cpu=True, save_strategy="no", logging_steps=1000, disable_tqdm=True,
                     max_length=None, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model(tok), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[timer])
    if check is not None:
        check(trainer)
    trainer.train()
    return timer


def plain_args(out: str, batch: int, steps: int) -> TrainingArguments:
    return TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=LR,
                             adam_beta1=BETAS[0], adam_beta2=BETAS[1], max_grad_norm=1.0, report_to="none",
                             use_cpu=True, save_strategy="no", logging_steps=1000, disable_tqdm=True,
                             remove_unused_columns=False, dataloader_num_workers=0)


def run_dapo(tok, items, out: str, batch: int, steps: int, shared: bool) -> StepTimer:
    timer = StepTimer()
    trainer = DAPOTrainer(model=model(tok), args=plain_args(out, batch, steps), train_dataset=items,
                          data_collator=_StateCollator(), beta=DAPO_BETA, pad_id=tok.pad_token_id,
                          shared_prefix=shared, callbacks=[timer])
    trainer.train()
    return timer


def run_outcome_dpo(tok, rows, out: str, shared: bool) -> StepTimer:
    timer = StepTimer()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [{"prompt": tok(r["prompt"])["input_ids"], "chosen": enc(r["chosen"]), "rejected": enc(r["rejected"]),
              "ref_chosen": 0.0, "ref_rejected": 0.0} for r in rows]
    trainer = OutcomeDPOTrainer(model=model(tok), args=plain_args(out, PAIRS, BASE_STEPS), train_dataset=pairs,
                                data_collator=_PairCollator(), beta=DPO_BETA, pad_id=tok.pad_token_id,
                                shared_prefix=shared, callbacks=[timer])
    trainer.train()
    return timer


# -- actor part -------------------------------------------------------------------------------------

def actor_work(tok, state_len: int, m: int, n_states: int, seed: int):
    """(ours: one item per state with its m actions, TRL: m/2 triples per state, the token ids of the
    states and actions). One character per token; the tokenizer's BOS starts each state."""
    digits = digits_fn(seed)
    g = torch.Generator().manual_seed(seed + 1)
    states = [digits(state_len - 1) for _ in range(n_states)]
    actions = [[digits(ACTION - 1) + "</s>" for _ in range(m)] for _ in states]
    adv = torch.randn(n_states, m, generator=g).tolist()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [{"state_index": i, "state_ids": tok(s)["input_ids"], "action_ids": enc(a), "advantage": adv[i][j],
             "weight": 1.0, "ref_logprob": 0.0} for i, s in enumerate(states) for j, a in enumerate(actions[i])]
    assert all(len(r["state_ids"]) == state_len and len(r["action_ids"]) == ACTION for r in rows)
    triples = []
    for i, s in enumerate(states):
        rank = sorted(range(m), key=lambda j: -adv[i][j])
        triples += [{"prompt": s, "chosen": actions[i][rank[k]], "rejected": actions[i][rank[m - 1 - k]]}
                    for k in range(m // 2)]
    return group_by_state(rows), triples


def same_tokens(items):
    """A check on TRL's tokenized dataset: exactly our state and action tokens, each action once."""
    ours = sorted((tuple(it["state_ids"]), tuple(a["action_ids"])) for it in items for a in it["actions"])

    def check(trainer):
        ds = trainer.train_dataset
        theirs = sorted([(tuple(r["prompt_ids"]), tuple(r["chosen_ids"])) for r in ds]
                        + [(tuple(r["prompt_ids"]), tuple(r["rejected_ids"])) for r in ds])
        assert theirs == ours, "TRL's tokenized triples are not our (state, action) tokens"
    return check


def run_actor_part(tok, args, tmp: str) -> list[dict]:
    short_len, long_len = (32, 64) if args.tiny else (96, 512)
    cases = [("a", short_len, 2, 16, args.short_steps), ("b", long_len, 8, 4, args.long_steps)]
    out = []
    for case, state_len, m, per_step, steps in cases:
        items, triples = actor_work(tok, state_len, m, per_step * steps, seed=state_len + m)
        pairs_per_step = per_step * m // 2
        trainers = {"TRL DPOTrainer": lambda chk: run_trl(tok, triples, tmp, pairs_per_step, steps, chk),
                    "ours, DAPOTrainer (shared prefix)": lambda chk: run_dapo(tok, items, tmp, per_step, steps, True)}
        if args.actor_plain:
            trainers["ours, DAPOTrainer (plain rows)"] = lambda chk: run_dapo(tok, items, tmp, per_step, steps, False)
        times = {name: {"periods": [], "steps": []} for name in trainers}
        for r in range(args.repeats):
            names = list(trainers) if r % 2 == 0 else list(trainers)[::-1]
            for name in names:
                timer = trainers[name](same_tokens(items) if r == 0 and name.startswith("TRL") else None)
                times[name]["periods"] += timer.periods
                times[name]["steps"] += timer.steps[1:]
        work = per_step * (state_len + m * ACTION)  # each state once, every action
        model_tokens = {"TRL DPOTrainer": 2 * pairs_per_step * (state_len + ACTION),
                        "ours, DAPOTrainer (shared prefix)": work,
                        "ours, DAPOTrainer (plain rows)": per_step * m * (state_len + ACTION)}
        trl_s = statistics.median(times["TRL DPOTrainer"]["periods"])
        for name, t in times.items():
            s = statistics.median(t["periods"])
            out.append({"case": case, "state_tokens": state_len, "actions_per_state": m, "action_tokens": ACTION,
                        "states": per_step * steps, "states_per_step": per_step, "actions_per_step": per_step * m,
                        "pairs_per_step_trl": pairs_per_step, "trainer": name, "median_step_s": s,
                        "median_compute_s": statistics.median(t["steps"]), "work_tokens_per_step": work,
                        "model_tokens_per_step": model_tokens[name], "work_tokens_per_s": work / s,
                        "vs_trl": trl_s / s, "periods_s": t["periods"], "compute_s": t["steps"]})
            print(f"actor ({case}) S={state_len:4d} M={m}  {name:34s} {s:.3f} s/step  {work / s:8.0f} tok/s  "
                  f"x{trl_s / s:.2f} vs TRL", flush=True)
    return out


def actor_section(rows: list[dict], args) -> list[str]:
    lines = [
        "## DAPO actor vs TRL DPOTrainer, the same work",
        "",
        "Ours: `DAPOTrainer` with `shared_prefix` on (the default config's), one training item per state with "
        "all its actions, each with an advantage. TRL: each state's M actions ranked by advantage and paired best "
        "with worst, ... into M/2 (prompt, chosen, rejected) triples, the prompt repeated in each. Per optimizer "
        "step both do the same work: the same states and the same 32 actions (TRL: the 16 pairs made of them). "
        "(a) states of 96 tokens, 2 actions of 32, 16 states a step; (b) long states, 512 tokens, 8 actions of 32, "
        "4 states a step. `work tok/s` = (distinct state tokens + action tokens) of a step / its wall time, the "
        "same numerator for both; `model tok` = the tokens each trainer runs through the model per step.",
        "",
        f"Median seconds per optimizer step, end of step to end of step (data loading and collation included), "
        f"over {args.repeats} interleaved rounds, the first step of every run left out.",
        "",
        "| case | states x tokens | actions / state | trainer | s / step | work tok / step | model tok / step | "
        "work tok / s | ours / TRL |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| ({r['case']}) | {r['states']} x {r['state_tokens']} | {r['actions_per_state']} x "
              f"{r['action_tokens']} | {r['trainer']} | {r['median_step_s']:.3f} | {r['work_tokens_per_step']} | "
              f"{r['model_tokens_per_step']} | {r['work_tokens_per_s']:.0f} | {r['vs_trl']:.2f}x |" for r in rows]
    long = [r for r in rows if r["case"] == "b" and r["trainer"] == "ours, DAPOTrainer (shared prefix)"]
    if long:
        x = long[0]["vs_trl"]
        lines += ["", f"Issue 11's acceptance line (actor throughput >= 3x TRL's on the long-state case, in tokens "
                  f"of the same work): {x:.2f}x, {'met' if x >= 3 else 'NOT met'}."]
    return lines


# -- baseline part ----------------------------------------------------------------------------------

def baseline_texts(prompt_len: int, seed: int):
    digits = digits_fn(seed)
    # one character per token; the completions end with eos (TRL would add it), as the sampled ones do
    return [{"prompt": digits(prompt_len - 1), "chosen": digits(31) + "</s>", "rejected": digits(23) + "</s>"}
            for _ in range(PAIRS * BASE_STEPS)]


def run_baseline_part(tok, args, tmp: str) -> list[dict]:
    out = []
    for prompt_len in ((64, 32) if args.tiny else (512, 96)):
        rows = baseline_texts(prompt_len, seed=prompt_len)
        trainers = {"TRL DPOTrainer": lambda: run_trl(tok, rows, tmp, PAIRS, BASE_STEPS),
                    "ours, shared prefix": lambda: run_outcome_dpo(tok, rows, tmp, shared=True),
                    "ours, plain rows": lambda: run_outcome_dpo(tok, rows, tmp, shared=False)}
        times = {name: [] for name in trainers}
        for r in range(args.repeats):
            for name in (list(trainers) if r % 2 == 0 else list(trainers)[::-1]):
                times[name] += trainers[name]().periods
        trl_s = statistics.median(times["TRL DPOTrainer"])
        for name, ts in times.items():
            s = statistics.median(ts)
            out.append({"prompt_tokens": prompt_len, "trainer": name, "median_step_s": s, "vs_trl": trl_s / s,
                        "periods_s": ts})
            print(f"baseline P={prompt_len:4d} {name:22s} {s:.3f} s/step  x{trl_s / s:.2f} vs TRL", flush=True)
    return out


def baseline_section(rows: list[dict], args) -> list[str]:
    lines = [
        "## Outcome-level DPO baseline step vs TRL DPOTrainer",
        "",
        f"Batches of {PAIRS} (prompt, chosen, rejected) triples, distinct prompts of P tokens, completions of 32 "
        f"and 24 tokens (`OutcomeDPOTrainer`, `dpo.shared_prefix` on and off). Median seconds per step, end of "
        f"step to end of step, over {args.repeats} x {BASE_STEPS - 1} steps (each run's first step left out), "
        "the trainers alternating.",
        "",
        "| prompt P | trainer | s / step | speedup vs TRL |",
        "|---:|---|---:|---:|",
    ]
    lines += [f"| {r['prompt_tokens']} | {r['trainer']} | {r['median_step_s']:.3f} | {r['vs_trl']:.2f}x |"
              for r in rows]
    lines += ["", "TRL's step runs prompt+chosen and prompt+rejected as two rows (the prompt twice), as do ours "
              "with `dpo.shared_prefix=false`; the gap between those two is TRL's per-step work besides the "
              "model (its collator, metrics, log-prob computation), not analysed here. With the shared prefix "
              "(the default) the prompt runs once and both completions on its keys/values."]
    return lines


# -- main -------------------------------------------------------------------------------------------

def old_sections(md: Path) -> dict[str, str]:
    """The '## ' sections of an earlier result file, by heading."""
    if not md.exists():
        return {}
    parts = md.read_text().split("\n## ")[1:]
    return {"## " + p.split("\n", 1)[0]: "## " + p.rstrip("\n") for p in parts}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parts", default="actor,baseline", help="comma-separated: actor, baseline")
    ap.add_argument("--short-steps", type=int, default=16, help="case (a): steps of 16 states (16 = 256 states)")
    ap.add_argument("--long-steps", type=int, default=8, help="case (b): steps of 4 states (8 = 32 states)")
    ap.add_argument("--actor-plain", action="store_true", help="also ours with shared_prefix off")
    ap.add_argument("--tiny", action="store_true", help="short states and prompts (a smoke test of the code)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    assert parts <= {"actor", "baseline"}, args.parts
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    tok = char_tokenizer()
    t_start = time.perf_counter()
    md, js = args.out / "dpo-vs-trl.md", args.out / "dpo-vs-trl.json"
    old = json.loads(js.read_text()) if js.exists() else {}
    result = {"actor": old.get("actor"), "baseline": old.get("baseline")}
    with tempfile.TemporaryDirectory() as tmp:
        if "actor" in parts:
            result["actor"] = run_actor_part(tok, args, tmp)
        if "baseline" in parts:
            result["baseline"] = run_baseline_part(tok, args, tmp)
    total = time.perf_counter() - t_start
    meta = {"trl": trl.__version__, "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
            "machine": platform.machine(), "parts": sorted(parts), "seconds": total, "tiny": args.tiny,
            "model": f"Llama, hidden 256, 4 layers, 8 heads (4 kv), MLP 688, character vocabulary "
                     f"({len(tok)} tokens), float32"}
    args.out.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps({"meta": meta, **result}, indent=1))
    lines = [
        "# DAPO actor and DPO baseline steps vs TRL's DPOTrainer",
        "",
        f"`bench/bench_dpo_trl.py {' '.join(sys.argv[1:])}` (trl {trl.__version__} in a "
        f"separate venv; torch {torch.__version__}, transformers unchanged). Same model, same tokens; reference "
        "log-probs precomputed in both, so a step = forward, backward, clipping and AdamW update. TRL runs with "
        "`gradient_checkpointing=False, bf16=False` (its DPOConfig defaults are True), like ours in float32.",
        "",
        f"Model: {meta['model']}, random weights, CPU ({platform.machine()}), {args.threads} thread(s). "
        f"This run ({', '.join(sorted(parts))}): {total:.0f} s. Numbers per step in `dpo-vs-trl.json`.",
        "",
    ]
    sections = old_sections(md)
    for part, section in (("actor", actor_section), ("baseline", baseline_section)):
        if part in parts:
            lines += section(result[part], args) + [""]
        else:
            keep = [v for k, v in sections.items() if k.startswith("## DAPO actor" if part == "actor" else
                                                                     "## Outcome-level DPO")]
            lines += [keep[0], ""] if keep else []
    md.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
