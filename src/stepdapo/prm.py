"""The trained critic as a process reward model: a value for every step of a solution.

    score_steps(critic, tokenizer, [(prompt, steps), ...]) -> [[V(prompt + steps[:1]), ...], ...]

Every step's value comes from ONE forward pass over the whole solution: the critic is causal, so
its logit at the last token of step i is its value of the prefix that ends there
(`models.critic_token_logits`), the number `critic_values` gives that prefix alone, for both critic
kinds (tests/test_prm.py). One pass instead of one per step (bench/bench_prm_scoring.py).

Text becomes tokens as in the pipeline: the prompt as `generation.encode_prompts` encodes it (the
states stage's prompt ids), the solution after it as one text without special tokens (a policy
samples it as one text), and step i ends at the last token that starts inside steps[:i+1]. For steps
the pipeline cut (a token holding the delimiter ends a step: `steps.split_steps`), that is the
pipeline's state prompt_ids + solution_ids[:step_end]. A solution given as one text is cut by that
same rule (`encode_completion`). No EOS is added: the last step's value is the critic's, not the
verifier's reward the pipeline uses for a finished solution.

`stepdapo prm score` (cli.py) runs it over a .jsonl / .parquet file: `read_items`, `write_scores`.
"""

from __future__ import annotations

import json
import time
from bisect import bisect_left
from pathlib import Path

import numpy as np
import torch

from stepdapo.errors import DataError, excerpt
from stepdapo.generation import encode_prompts
from stepdapo.steps import split_steps
from stepdapo.logprobs import MAX_BATCH_TOKENS
from stepdapo.models import critic_token_logits, is_log_ratio_critic

Encoded = tuple[list[int], list[int], list[int]]  # (prompt ids, solution ids, each step's end in the solution ids)


def join_delimiter(steps: list[str], delimiter: str) -> list[str]:
    """The steps with `delimiter` after every step but the last that does not end with it (trailing
    spaces aside): datasets often store steps without their newlines, and the pipeline's states
    always hold them."""
    return [s if i == len(steps) - 1 or s.rstrip(" \t").endswith(delimiter) else s + delimiter
            for i, s in enumerate(steps)]


def _offsets(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(token ids, each token's first character) of a solution text, without special tokens."""
    if not text:
        return [], []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [a for a, _ in enc["offset_mapping"]]


def encode(tokenizer, prompt: str, steps: list[str]) -> Encoded:
    """The token ids of `prompt` + the steps' text, and where each step ends in the solution's ids."""
    ids, starts = _offsets(tokenizer, "".join(steps))
    ends, chars = [], 0
    for s in steps:
        chars += len(s)
        ends.append(bisect_left(starts, chars))  # the tokens that start before the step's end
    return encode_prompts(tokenizer, [prompt])[0], ids, ends


def encode_completion(tokenizer, prompt: str, completion: str, is_delim: torch.Tensor) -> tuple[Encoded, list[str]]:
    """`encode` for a solution given as one text, cut into steps by the pipeline's rule
    (`split_steps` with `steps.delimiter_token_mask`); also the steps' texts."""
    ids, starts = _offsets(tokenizer, completion)
    ends = split_steps(ids, is_delim) if ids else []
    cuts = [starts[e] if e < len(ids) else len(completion) for e in ends]
    steps = [completion[a:b] for a, b in zip([0] + cuts[:-1], cuts)]
    return (encode_prompts(tokenizer, [prompt])[0], ids, ends), steps


def _read_positions(ids: list[int], prompt_len: int, ends: list[int], pad_id: int, log_ratio: bool) -> list[int]:
    """Where each step's value is read in prompt + solution: the prefix's last token. A value-head
    critic (HF sequence classification) reads the prefix's last token that is not the pad token,
    as `critic_values` does (a text may hold the pad token, e.g. Qwen's <|endoftext|>)."""
    if log_ratio:
        return [prompt_len + e - 1 for e in ends]
    last, cur = [], 0
    for j, t in enumerate(ids):
        cur = j if t != pad_id else cur
        last.append(cur)
    return [last[prompt_len + e - 1] for e in ends]


@torch.no_grad()
def score_ids(critic, pad_id: int, solutions: list[Encoded], batch_size: int | None = 32, progress: bool = False,
              max_batch_tokens: int = MAX_BATCH_TOKENS) -> list[list[float]]:
    """Each step's value V(prompt + solution[:step end]) of each encoded solution: one forward pass
    per batch of whole solutions of similar lengths (right-padded, so that the padding comes after
    every token read), at most `batch_size` of them (None: no row limit) and `max_batch_tokens`
    padded tokens (a longer solution alone)."""
    from tqdm.auto import tqdm

    from stepdapo.logprobs import token_batches

    critic.eval()
    log_ratio = is_log_ratio_critic(critic)
    batches = token_batches([len(p) + len(x) for p, x, _ in solutions], max_batch_tokens, batch_size)
    out: list[list[float]] = [[] for _ in solutions]
    with tqdm(total=sum(len(p) + len(x) for p, x, _ in solutions), unit="tok", unit_scale=True, desc="prm score",
              disable=not progress) as bar:
        for idx in batches:
            seqs = [solutions[i][0] + solutions[i][1] for i in idx]
            plens = [len(solutions[i][0]) for i in idx]
            logits = critic_token_logits(critic, seqs, pad_id, plens if log_ratio else None)
            values = torch.sigmoid(logits.float()).cpu()
            for row, (i, ids, plen) in enumerate(zip(idx, seqs, plens)):
                at = _read_positions(ids, plen, solutions[i][2], pad_id, log_ratio)
                out[i] = values[row, at].tolist()
            bar.update(sum(map(len, seqs)))
    return out


def score_steps(critic, tokenizer, items: list[tuple[str, list[str]]], batch_size: int = 32,
                progress: bool = False) -> list[list[float]]:
    """V(prompt + steps[:i + 1]) for every step i of every (prompt, steps) item, the prompt the text
    the policy was given (`task.prompt`), each step's text as written, delimiter included
    (`join_delimiter` adds a missing one). A critic and its tokenizer from `models.load_critic`."""
    return score_ids(critic, tokenizer.pad_token_id, [encode(tokenizer, p, s) for p, s in items], batch_size, progress)


# -- files: `stepdapo prm score` ------------------------------------------------------------------

def _field(where: str, row: dict, names: tuple[str, ...], kind: str):
    """(name, value) of the one field of `names` the row has; a DataError naming the file, line and
    field otherwise."""
    found = [n for n in names if row.get(n) is not None]
    if len(found) != 1:
        raise DataError(f"{where}: a row needs exactly one of {', '.join(repr(n) for n in names)} ({kind}); "
                        + (f"it has {', '.join(found)}" if found else f"its fields: {excerpt(sorted(row))}"))
    name, value = found[0], row[found[0]]
    ok = isinstance(value, str) if name in ("prompt", "question", "completion") else \
        isinstance(value, list) and all(isinstance(s, str) for s in value)
    if not ok or (name in ("prompt", "question") and not value):
        want = "a non-empty string" if name in ("prompt", "question") else \
            "a string" if name == "completion" else "a list of strings"
        raise DataError(f"{where}: field {name!r} must be {want}, got {excerpt(value)}")
    return name, value


def read_items(path: str | Path) -> list[tuple[str, dict, tuple]]:
    """(where, row, (prompt field, prompt, steps field, steps)) of every row of a .jsonl / .parquet
    file, checked: `prompt` (the text the policy saw, as the labels stage's stepwise.parquet and
    TRL's stepwise format hold it) or `question` (formatted by the task); `steps` or `completions`
    (lists of step texts) or `completion` (one text, cut by the task's step delimiter)."""
    from stepdapo.tasks.data import FILE_SUFFIXES, read_rows

    if not str(path).lower().endswith(FILE_SUFFIXES):  # read_rows would take a bare name for a hub dataset
        raise DataError(f"{path}: the rows to score are a {' / '.join(FILE_SUFFIXES)} file")
    items = []
    for where, row in read_rows(str(path)):
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be an object with prompt and steps, got {excerpt(row)}")
        items.append((where, row, (*_field(where, row, ("prompt", "question"), "the prompt"),
                                   *_field(where, row, ("steps", "completions", "completion"), "the solution"))))
    if not items:
        raise DataError(f"{path}: no rows to score")
    return items


def encode_items(items: list[tuple[str, dict, tuple]], tokenizer, task) -> list[Encoded]:
    """The rows' token ids, the pipeline's way (module docstring); a `completion`'s steps are added
    to its row as `steps`."""
    from stepdapo.steps import check_step_delimiter, delimiter_token_mask
    from stepdapo.tasks import Problem

    is_delim = None
    encoded = []
    for _, row, (pname, prompt, sname, steps) in items:
        if pname == "question":
            prompt = task.prompt(Problem(id="", question=prompt, answer=""), tokenizer)
        if sname != "completion":
            encoded.append(encode(tokenizer, prompt, join_delimiter(steps, task.step_delimiter)))
            continue
        if is_delim is None:  # a pass over the vocabulary: only when a row needs it
            is_delim = delimiter_token_mask(tokenizer, task.step_delimiter)
            check_step_delimiter(tokenizer, task.step_delimiter, is_delim)
        enc, row["steps"] = encode_completion(tokenizer, prompt, steps, is_delim)
        encoded.append(enc)
    return encoded


OUTPUT_SUFFIXES = (".jsonl", ".parquet")


def is_scores_file(p: Path) -> bool:
    """Whether `p` is a file `write_scores` wrote (a column or first row with step_values): the
    only kind --out may replace."""
    try:
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            return "step_values" in pq.read_schema(p).names
        with open(p, "rb") as f:
            first = f.readline(1 << 24)
        row = json.loads(first)
        return isinstance(row, dict) and "step_values" in row
    except Exception:  # noqa: BLE001 - unreadable or not ours: refused either way
        return False


def write_scores(path: str | Path, rows: list[dict]) -> None:
    """The rows (with their step_values) to a .jsonl or .parquet file, atomically."""
    from stepdapo.store import atomic_write_text, write_parquet

    p = Path(path)
    if p.suffix == ".parquet":
        import pyarrow as pa

        try:
            keys = dict.fromkeys(k for r in rows for k in r)  # from_pylist would keep the first row's only
            table = pa.table({k: [r.get(k) for r in rows] for k in keys})
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:  # e.g. a field that is a number in one row, text in another
            raise DataError(f"{p}: the rows do not make a parquet table ({e}); write .jsonl instead") from None
        p.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(p, table)
    else:
        atomic_write_text(p, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def score_file(critic_dir: str | Path, in_path: str | Path, out_path: str | Path, task, batch_size: int = 32,
               progress: bool = True) -> dict:
    """Score every row of `in_path` with the critic in `critic_dir`; write the rows with
    `step_values` to `out_path`. Returns a summary (rows, steps, tokens, seconds)."""
    from stepdapo.models import load_critic
    from stepdapo.runner import device

    items = read_items(in_path)  # a bad row is an error before the critic is loaded
    t0 = time.perf_counter()
    critic, tokenizer = load_critic(critic_dir)
    critic.to(device())
    encoded = encode_items(items, tokenizer, task)
    t1 = time.perf_counter()
    values = score_ids(critic, tokenizer.pad_token_id, encoded, batch_size, progress)
    seconds = time.perf_counter() - t1
    rows = [{**row, "step_values": v} for (_, row, _), v in zip(items, values)]
    write_scores(out_path, rows)
    tokens = sum(len(p) + len(x) for p, x, _ in encoded)
    return {"rows": len(rows), "steps": sum(map(len, values)), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else None, "load_seconds": t1 - t0}


# -- ProcessBench's protocol: `stepdapo prm eval` --------------------------------------------------
# Rows: `problem` (or `question`: formatted by the task; or `prompt`: the policy's text), `steps`
# (a list of step texts) and `label` (the index of the earliest wrong step, -1 when all are right),
# as ProcessBench's files hold them. The critic's prediction is the first step whose score is below
# a threshold (stepdapo.metrics); the threshold is chosen on a calibration part of the rows (a hash
# of each row's id, so the split does not depend on the file's order) and the scores are reported on
# the rest, or a given threshold is used on all rows.
#
# Two scores (`rule`). "value": V(prefix through step i), ProcessBench's rule for a PRM that judges
# steps. "advantage": V(through step i) - V(through step i-1), V before the first step being the
# prompt's. Our critic is a value model of pi_ref, V(s) = P(pi_ref ends correct from s): a right step
# ahead of a hard part (the built-in task's flaw) has a low value although nothing is wrong yet, and
# a critic of a policy that rarely errs has seen few wrong prefixes. What such a critic says about a
# step is the change it makes, the advantage DAPO trains on.
#
# A solution's last step, when no delimiter ends it (the answer line), is not scored: the pipeline's
# states never end there (the step holds the end of the solution, whose value is the verifier's
# reward), so the critic was never trained on such a prefix (on the built-in task it values every one
# near 0). An error in that step goes undetected by this rule.
RULES = ("value", "advantage")

def read_processbench(path: str | Path) -> list[tuple[str, dict, tuple]]:
    """The rows of a ProcessBench-format .jsonl / .json / .parquet file, as `read_items` gives them
    (`problem` read as `question`), each with a checked integer `label` in [-1, len(steps))."""
    from stepdapo.tasks.data import FILE_SUFFIXES, read_rows

    if not str(path).lower().endswith(FILE_SUFFIXES):
        raise DataError(f"{path}: ProcessBench rows are a {' / '.join(FILE_SUFFIXES)} file")
    items = []
    for where, row in read_rows(str(path)):
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be an object with problem, steps and label, got {excerpt(row)}")
        row = {**row}
        if "problem" in row and "question" not in row and "prompt" not in row:
            row["question"] = row.pop("problem")
        prompt = _field(where, row, ("prompt", "question"), "the problem")
        steps = _field(where, row, ("steps",), "the solution's steps")
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(steps[1]):
            raise DataError(f"{where}: field 'label' must be the index of the earliest wrong step (0 to "
                            f"{len(steps[1]) - 1}) or -1 when every step is right, got {excerpt(label)}")
        items.append((where, row, (*prompt, *steps)))
    if not items:
        raise DataError(f"{path}: no rows")
    return items


def is_processbench_file(p: Path) -> bool:
    """Whether `p` is a file `stepdapo prm processbench` wrote (its first row's fields)."""
    try:
        with open(p, "rb") as f:
            row = json.loads(f.readline(1 << 24))
        return isinstance(row, dict) and {"id", "problem", "steps", "label", "final_answer_correct"} <= set(row)
    except Exception:  # noqa: BLE001 - unreadable or not ours: refused either way
        return False


def calibration_part(row_id: str, fraction: float) -> bool:
    """Whether a row (by its id) is in the calibration part: a stable hash, not the file's order."""
    import hashlib

    return int(hashlib.sha1(f"prm-calibration/{row_id}".encode()).hexdigest()[:8], 16) / 16**8 < fraction


def step_scores(values: list[float], rule: str) -> list[float]:
    """The per-step scores of one solution from its values [V(prompt), V(step 1), ...]."""
    if rule == "value":
        return values[1:]
    return [b - a for a, b in zip(values, values[1:])]


def evaluate_processbench(step_values: list[list[float]], labels: list[int], ids: list[str],
                          threshold: float | None = None, calibration_fraction: float = 0.5,
                          centre: float = 0.5) -> dict:
    """ProcessBench's scores of these per-step scores: with `threshold`, on every row; else the
    threshold with the best F1 on the calibration part (ties: nearest `centre`), scores on the
    other part."""
    from stepdapo.metrics import best_threshold, earliest_below, processbench_scores

    if threshold is None:
        cal = [calibration_part(i, calibration_fraction) for i in ids]
        if all(cal) or not any(cal):
            raise DataError(f"{len(ids)} rows: too few to split into a calibration and an evaluation part; "
                            f"give more rows or a --threshold")
        threshold = best_threshold([v for v, c in zip(step_values, cal) if c], [y for y, c in zip(labels, cal) if c],
                                   centre)
        rows = [k for k, c in enumerate(cal) if not c]
        how = f"chosen on {sum(cal)} calibration rows (best F1), scored on the other {len(rows)}"
    else:
        rows, how = list(range(len(ids))), "given, scored on every row"
    predicted = [earliest_below(step_values[k], threshold) for k in rows]
    return {"threshold": threshold, "threshold_how": how,
            **processbench_scores(predicted, [labels[k] for k in rows])}


def evaluate_critic_processbench(critic, tokenizer, items: list[tuple[str, dict, tuple]], task,
                                 threshold: float | None = None, calibration_fraction: float = 0.5,
                                 batch_size: int = 32, progress: bool = False, rule: str = "value") -> dict:
    """`evaluate_processbench` of a loaded critic on checked rows (`read_processbench`, or
    `processbench_items`), each step scored by `rule` (RULES)."""
    # the prompt's value too: a step "ending" at 0 tokens is read at the prompt's last token
    encoded = [(p, x, [0] + ends) for p, x, ends in encode_items(items, tokenizer, task)]
    values = score_ids(critic, tokenizer.pad_token_id, encoded, batch_size, progress)
    scores = [step_scores(v, rule)[:len(steps) - (not steps[-1].rstrip(" \t").endswith(task.step_delimiter))]
              for v, (_, row, (_, _, _, steps)) in zip(values, items)]
    ids = [str(row.get("id", where)) for where, row, _ in items]
    result = evaluate_processbench(scores, [row["label"] for _, row, _ in items], ids, threshold,
                                   calibration_fraction, centre=0.5 if rule == "value" else 0.0)
    return {"rows": len(items), "rule": rule, **result}


def processbench_items(rows: list[dict]) -> list[tuple[str, dict, tuple]]:
    """Rows a task made (`Task.processbench_rows`) in the form `read_processbench` gives."""
    return [(f"row {i}", {**r, "question": r["problem"]}, ("question", r["problem"], "steps", r["steps"]))
            for i, r in enumerate(rows)]


def eval_file(critic_dir: str | Path, in_path: str | Path, task, threshold: float | None = None,
              calibration_fraction: float = 0.5, batch_size: int = 32, progress: bool = True,
              rule: str = "value") -> dict:
    """`evaluate_critic_processbench` of the critic in `critic_dir` on the rows of `in_path`."""
    from stepdapo.models import load_critic
    from stepdapo.runner import device

    items = read_processbench(in_path)  # a bad row is an error before the critic is loaded
    critic, tokenizer = load_critic(critic_dir)
    critic.to(device())
    t0 = time.perf_counter()
    r = evaluate_critic_processbench(critic, tokenizer, items, task, threshold, calibration_fraction, batch_size,
                                     progress, rule)
    return {"critic": str(critic_dir), "data": str(in_path), **r, "seconds": time.perf_counter() - t0}


# -- at test time: best-of-N and weighted voting --------------------------------------------------

AGGREGATIONS = {"min": min, "last": lambda v: v[-1], "product": lambda v: float(np.prod(v))}
"""How best-of-N turns a sample's step values into one score."""
TEST_TIME_METHODS = ["pass", "random", "majority", "weighted vote (last)"] + [f"best-of-N ({g})" for g in AGGREGATIONS]


def sample_scores(gen, critic, tokenizer, task, problems: list, n: int, params, batch_size: int | None = 256,
                  max_batch_tokens: int = MAX_BATCH_TOKENS, bf16: bool = False) -> list[dict]:
    """`n` samples of each problem from `gen` (the policy the critic values), verified and scored: per
    problem the samples' correctness, answers and their step values aggregated (`AGGREGATIONS`).
    The values are of V(prompt) and every step's prefix but the last (the answer line, which the
    critic never sees in training); a one-step solution has only V(prompt). `critic` may be a
    function that returns it, called once the samples are drawn (e.g. after a vLLM engine that held
    the GPU's memory is shut down). The critic scores under bf16 autocast with `bf16`."""
    from stepdapo.precision import autocast
    from stepdapo.tasks import verify_all

    prompts = encode_prompts(gen.tokenizer, [task.prompt(p, gen.tokenizer) for p in problems])
    samples = gen.generate(prompts, n, params, desc="prm samples")
    verdicts = verify_all(task, [p for p in problems for _ in range(n)], [s.text for ss in samples for s in ss])
    encoded = [(prompt, s.token_ids, [0] + split_steps(s.token_ids, gen.is_delim)[:-1])
               for prompt, ss in zip(prompts, samples) for s in ss]
    if callable(critic) and not isinstance(critic, torch.nn.Module):
        critic = critic()
    with torch.no_grad(), autocast(bf16, next(critic.parameters()).device):
        values = score_ids(critic, tokenizer.pad_token_id, encoded, batch_size=batch_size,
                           max_batch_tokens=max_batch_tokens)
    rows = []
    for i, p in enumerate(problems):
        vd, vs = verdicts[i * n:(i + 1) * n], values[i * n:(i + 1) * n]
        steps = [v[1:] or v[:1] for v in vs]
        rows.append({"problem_id": p.id, "correct": [v.correct for v in vd], "answer": [v.answer for v in vd],
                     **{f"score_{g}": [float(f(s)) for s in steps] for g, f in AGGREGATIONS.items()}})
    return rows


def best_of_n_table(rows: list[dict], ns: list[int], seed: int = 0) -> dict[str, dict]:
    """Per method and N (the first N samples of each problem): the share of problems whose chosen
    answer is correct, with a 95% bootstrap interval over problems. pass: any of N correct; random:
    their mean; majority: the most frequent answer; weighted vote: answers weighted by the critic's
    last value; best-of-N: the sample whose aggregated values score highest."""
    from stepdapo.metrics import best_of_n_correct, bootstrap_interval, majority_correct, weighted_vote_correct

    by: dict[str, list[float]] = {f"{m}@{n}": [] for n in ns for m in TEST_TIME_METHODS}
    for r in rows:
        for n in ns:
            ok, ans = r["correct"][:n], r["answer"][:n]
            by[f"pass@{n}"].append(float(any(ok)))
            by[f"random@{n}"].append(float(np.mean(ok)))
            by[f"majority@{n}"].append(float(majority_correct(ans, ok)))
            by[f"weighted vote (last)@{n}"].append(float(weighted_vote_correct(ans, r["score_last"][:n], ok)))
            for g in AGGREGATIONS:
                by[f"best-of-N ({g})@{n}"].append(float(best_of_n_correct(r[f"score_{g}"][:n], ok)))
    return {key: {"mean": float(np.mean(v)), "ci95": list(bootstrap_interval(v, seed=seed))}
            for key, v in by.items() if v}
