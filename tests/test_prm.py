"""Per-step scoring (stepdapo.prm, `stepdapo prm score`): every step's value read from one forward
pass over the whole solution equals the critic's value of that step's prefix alone, for both critic
kinds, in batches that mix lengths; the pipeline's token ids and step cut; the command's rows in,
values out, its errors and its refusal to replace a file it did not write."""

import json
import random
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from stepdapo.cli import main
from stepdapo.config import ArithmeticConfig
from stepdapo.generation import encode_prompts
from stepdapo.models import LogRatioCritic, critic_values, load_critic, load_tokenizer
from stepdapo.prm import encode, encode_completion, score_ids, score_steps
from stepdapo.steps import delimiter_token_mask, split_steps
from stepdapo.tasks.arithmetic import ArithmeticTask

KINDS = ("log_ratio", "value_head")


@pytest.fixture(scope="module")
def critic_dirs(small_model_dir, tmp_path_factory):
    """Both kinds of critic on the bootstrapped tiny policy, saved as the critic stage saves them,
    perturbed as training would (so that values differ from token to token)."""
    root = tmp_path_factory.mktemp("critics")
    tok = load_tokenizer(small_model_dir)
    torch.manual_seed(0)
    lr = LogRatioCritic.start(small_model_dir, beta=0.5, initial_value=0.4)
    vh = AutoModelForSequenceClassification.from_pretrained(small_model_dir, num_labels=1)
    vh.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        for p in lr.policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
        lr.head.weight.normal_(0, 0.3)
        vh.score.weight.normal_(0, 0.3)
    for name, model in (("log_ratio", lr), ("value_head", vh)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {k: root / k for k in KINDS}


@pytest.fixture(scope="module")
def loaded(critic_dirs):
    return {k: load_critic(d) for k, d in critic_dirs.items()}


TASK = ArithmeticTask(ArithmeticConfig())


def solution(n_steps: int, seed: int) -> tuple[str, list[str]]:
    """A built-in-task question and its n_steps-step solution (n_steps - 1 operations and the answer
    line), a wrong result here and there: the task's own text."""
    rng = random.Random(seed)
    r = first = rng.randint(0, 9)
    question, steps = str(first), []
    for _ in range(n_steps - 1):
        op, x = rng.choice("+-"), rng.randint(0, 9)
        y = ((r + x) if op == "+" else (r - x)) % 10
        y = (y + rng.choice((0, 0, 0, 1))) % 10
        question += f"{op}{x}"
        steps.append(f"{r}{op}{x}={y}\n")
        r = y
    return question, steps + [f"A={r}"]


ITEMS = [(q + "\n", s) for q, s in (solution(n, seed) for seed, n in enumerate([1, 2, 5, 12, 3, 8, 9, 4]))]


def prefix_values(critic, tok, items) -> list[list[float]]:
    """Each step's value the slow way: the pipeline's state ids (prompt ids + the solution's ids up
    to the step's end) scored one sequence per prefix by `critic_values`."""
    out = []
    for prompt, steps in items:
        p = encode_prompts(tok, [prompt])[0]
        prefixes = [p + tok("".join(steps[:i + 1]), add_special_tokens=False)["input_ids"] for i in range(len(steps))]
        out.append(critic_values(critic, prefixes, tok.pad_token_id, prompt_lens=[len(p)] * len(prefixes)))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_one_pass_values_equal_each_prefix_alone(loaded, kind):
    critic, tok = loaded[kind]
    slow = prefix_values(critic, tok, ITEMS)
    for batch_size in (1, 3):  # alone, and in batches mixing 1 to 12 steps (right padding)
        fast = score_steps(critic, tok, ITEMS, batch_size=batch_size)
        assert [len(v) for v in fast] == [len(s) for _, s in ITEMS]
        for f, s in zip(fast, slow):
            # float32, padded against unpadded: rounding ~1e-6; a token off moves a value by >= 1e-3 here
            assert f == pytest.approx(s, abs=1e-5)
    flat = [v for vs in slow for v in vs]
    assert max(flat) - min(flat) > 0.05  # the values differ: a value read elsewhere would not match


@pytest.mark.parametrize("kind", KINDS)
def test_the_pipeline_ids_and_step_cut(loaded, kind):
    """A solution as the states stage keeps it (token ids, step ends by `split_steps`) scores like
    its states, and the same text given whole (`completion`) is cut at the same tokens."""
    critic, tok = loaded[kind]
    is_delim = delimiter_token_mask(tok, TASK.step_delimiter)
    prompt, steps = ITEMS[3]
    p = encode_prompts(tok, [prompt])[0]
    sol = tok("".join(steps), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # ended at EOS
    ends = split_steps(sol, is_delim)
    states = [p + sol[:e] for e in ends]
    assert score_ids(critic, tok.pad_token_id, [(p, sol, ends)])[0] == pytest.approx(
        critic_values(critic, states, tok.pad_token_id, prompt_lens=[len(p)] * len(states)), abs=1e-5)
    (p2, sol2, ends2), cut = encode_completion(tok, prompt, "".join(steps), is_delim)
    assert (p2, sol2, ends2) == encode(tok, prompt, steps) and cut == steps
    assert ends2 == ends[:-1] + [len(sol) - 1]  # the same steps, the text without the EOS


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("kind", KINDS)
def test_command_scores_every_row_format(loaded, critic_dirs, kind, tmp_path, capsys):
    """`prompt` + `steps`, `question` (the task formats it) + steps without their newlines, and
    `completion` (cut by the task's delimiter): the same solution, the same values as the API."""
    critic, tok = loaded[kind]
    (prompt, steps), (prompt2, steps2) = ITEMS[3], ITEMS[5]
    rows = [{"id": "a", "prompt": prompt, "steps": steps},
            {"id": "b", "question": prompt[:-1], "steps": [s.rstrip("\n") for s in steps]},
            {"id": "c", "question": prompt[:-1], "completion": "".join(steps)},
            {"id": "d", "prompt": prompt2, "completions": steps2}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    for out in ("out.jsonl", "out.parquet"):
        assert main(["prm", "score", "--critic", str(critic_dirs[kind]), "--in", str(tmp_path / "in.jsonl"),
                     "--out", str(tmp_path / out), "--batch-size", "2", "threads=1"]) == 0
        got = pq.read_table(tmp_path / out).to_pylist() if out.endswith(".parquet") else \
            [json.loads(line) for line in (tmp_path / out).read_text().splitlines()]
        want = score_steps(critic, tok, [(prompt, steps), (prompt2, steps2)])
        assert [r["id"] for r in got] == ["a", "b", "c", "d"]
        for r, w in zip(got, [want[0]] * 3 + [want[1]]):
            assert r["step_values"] == pytest.approx(w, abs=1e-6)
        assert got[2]["steps"] == steps and got[0]["steps"] == steps  # a completion's cut is written out
    assert "scored 44 steps of 4 solutions" in capsys.readouterr().out


def test_command_line_bad_rows_and_foreign_outputs(critic_dirs, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "stepdapo.cli", "prm", "score", "--critic",
                               str(critic_dirs["log_ratio"]), *args, "threads=1"], capture_output=True, text=True,
                              timeout=300)

    good, bad, out = tmp_path / "good.jsonl", tmp_path / "bad.jsonl", tmp_path / "scores.jsonl"
    write_jsonl(good, [{"prompt": p, "steps": s} for p, s in ITEMS[:2]])
    r = run("--in", str(good), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert [len(json.loads(line)["step_values"]) for line in out.read_text().splitlines()] == [1, 2]
    assert run("--in", str(good), "--out", str(out)).returncode == 0  # its own output: replaced

    for row, needle in (({"prompt": "1+2\n", "steps": "1+2=3"}, "field 'steps' must be a list of strings"),
                        ({"prompt": "1+2\n"}, "exactly one of 'steps', 'completions', 'completion'"),
                        ({"prompt": "1+2\n", "question": "1+2", "steps": []}, "it has prompt, question"),
                        ([1, 2], "a row must be an object")):
        write_jsonl(bad, [{"prompt": "1\n", "steps": ["A=1"]}, row])
        r = run("--in", str(bad), "--out", str(tmp_path / "never.jsonl"))
        assert r.returncode == 2 and f"{bad}:2: " in r.stderr and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "never.jsonl").exists()

    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"mine": 1}\n')
    r = run("--in", str(good), "--out", str(foreign))
    assert r.returncode == 2 and "refusing to replace it" in r.stderr
    assert foreign.read_text() == '{"mine": 1}\n'


# -- ProcessBench's protocol -------------------------------------------------------------------------

def test_processbench_scores_by_hand():
    from stepdapo.metrics import best_threshold, earliest_below, processbench_scores

    assert earliest_below([0.9, 0.7, 0.2, 0.1], 0.5) == 2 and earliest_below([0.9, 0.6], 0.5) == -1
    assert earliest_below([], 0.5) == -1
    # erroneous: 3 rows, 2 found at the right step; correct: 2 rows, 1 left alone
    s = processbench_scores([1, 0, 2, -1, 0], [1, 1, 2, -1, -1])
    assert (s["n_erroneous"], s["n_correct"]) == (3, 2)
    assert s["acc_erroneous"] == pytest.approx(2 / 3) and s["acc_correct"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert processbench_scores([0, 0], [-1, -1])["f1"] is None  # no erroneous rows: no F1
    # values that drop exactly at the first wrong step: any threshold between the two levels is perfect
    values = [[0.8, 0.7, 0.3, 0.2], [0.9, 0.85, 0.8], [0.75, 0.1]]
    labels = [2, -1, 1]
    t = best_threshold(values, labels)
    assert 0.3 < t < 0.7 and processbench_scores([earliest_below(v, t) for v in values], labels)["f1"] == 1.0


def test_builtin_processbench_rows_have_the_earliest_wrong_step_as_label():
    """Every step before the label is right and the labelled one wrong, as the task judges single
    steps; half the rows correct; the file round-trips through the reader."""
    rows = TASK.processbench_rows("test", 60, seed=3)
    assert sum(r["label"] == -1 for r in rows) == 30 and {r["label"] for r in rows} - {-1}
    problems = {f"test/{p.id}": p for p in TASK.problems("test")[:60]}
    for r in rows:
        p = problems[r["id"]]
        last = len(r["steps"]) - 1 if r["label"] == -1 else r["label"]
        for i in range(last + 1):
            right = TASK.step_is_correct(p, "".join(r["steps"][:i]), r["steps"][i])
            assert right == (i != r["label"]), (r, i)
        assert r["final_answer_correct"] == (r["label"] == -1)


def test_evaluate_processbench_chooses_on_one_part_and_scores_the_other():
    from stepdapo.prm import calibration_part, evaluate_processbench

    rng = random.Random(0)
    ids = [f"r{i}" for i in range(400)]
    labels = [-1 if i % 2 else rng.randrange(4) for i in range(400)]
    values = [[0.9] * 4 if y == -1 else [0.9] * y + [0.1] * (4 - y) for y in labels]
    r = evaluate_processbench(values, labels, ids)
    held = [i for i in ids if not calibration_part(i, 0.5)]
    assert r["n_erroneous"] + r["n_correct"] == len(held) and 150 < len(held) < 250
    assert r["f1"] == 1.0 and 0.1 < r["threshold"] < 0.9 and "calibration" in r["threshold_how"]
    r = evaluate_processbench(values, labels, ids, threshold=0.05)  # below every value: finds nothing
    assert r["acc_correct"] == 1.0 and r["acc_erroneous"] == 0.0 and r["f1"] == 0.0
    assert r["n_erroneous"] + r["n_correct"] == 400


@pytest.mark.parametrize("kind", KINDS)
def test_command_prm_eval(critic_dirs, loaded, kind, tmp_path, capsys):
    """The command's scores are those of the API on the same rows; bad labels are clean errors."""
    from stepdapo.metrics import earliest_below, processbench_scores
    rows = TASK.processbench_rows("test", 40, seed=1)
    data = tmp_path / "pb.jsonl"
    write_jsonl(data, rows)
    out = tmp_path / "pb-eval.json"
    code = main(["prm", "eval", "--critic", str(critic_dirs[kind]), "--in", str(data), "--threshold", "0.4",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    got = json.loads(out.read_text())["processbench"]
    critic, tok = loaded[kind]
    values = score_steps(critic, tok, [(TASK.prompt(TASK.problems("test")[i]), r["steps"]) for i, r in enumerate(rows)])
    # the answer line (no delimiter after it) is not scored: the critic never saw such a prefix
    want = processbench_scores([earliest_below(v[:-1], 0.4) for v in values], [r["label"] for r in rows])
    assert got["f1"] == pytest.approx(want["f1"]) and got["acc_erroneous"] == pytest.approx(want["acc_erroneous"])
    assert got["acc_correct"] == pytest.approx(want["acc_correct"]) and got["rule"] == "value"
    # the advantage rule: each step's value minus the one before (the prompt's before the first step)
    assert main(["prm", "eval", "--critic", str(critic_dirs[kind]), "--in", str(data), "--threshold", "-0.05",
                 "--rule", "advantage", "--out", str(out)]) == 0
    got = json.loads(out.read_text())["processbench"]
    enc = [encode(tok, TASK.prompt(TASK.problems("test")[i]), r["steps"]) for i, r in enumerate(rows)]
    with_prompt = score_ids(critic, tok.pad_token_id, [(p, x, [0] + e) for p, x, e in enc])
    adv = [[b - a for a, b in zip(v, v[1:])][:-1] for v in with_prompt]
    want = processbench_scores([earliest_below(a, -0.05) for a in adv], [r["label"] for r in rows])
    assert got["f1"] == pytest.approx(want["f1"]) and got["acc_correct"] == pytest.approx(want["acc_correct"])
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [rows[0], {**rows[1], "label": len(rows[1]["steps"])}])
    assert main(["prm", "eval", "--critic", str(critic_dirs[kind]), "--in", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: field 'label' must be the index of the earliest wrong step" in err


def test_best_of_n_and_weighted_vote_by_hand():
    from stepdapo.metrics import best_of_n_correct, majority_correct, weighted_vote_correct

    answers, correct = ["3", "5", "5", None, "3"], [True, False, False, False, True]
    assert best_of_n_correct([0.2, 0.9, 0.1, 0.95, 0.3], correct) is False  # the answerless sample scores highest
    assert best_of_n_correct([0.8, 0.9, 0.1, 0.2, 0.3], correct) is False
    assert best_of_n_correct([0.9, 0.9, 0.1, 0.2, 0.3], correct) is True  # a tie: the first
    assert best_of_n_correct([], []) is False
    # "3": 0.4 + 0.3 = 0.7 against "5": 0.2 + 0.3 = 0.5; unweighted it is a 2-2 tie, first seen wins
    assert weighted_vote_correct(answers, [0.4, 0.2, 0.3, 0.9, 0.3], correct) is True
    assert weighted_vote_correct(answers, [0.1, 0.5, 0.5, 0.9, 0.1], correct) is False
    assert weighted_vote_correct([None, None], [1.0, 1.0], [False, False]) is False
    assert weighted_vote_correct(answers, [1.0] * 5, correct) == majority_correct(answers, correct)


def test_best_of_n_table_by_hand():
    """Two problems, 4 samples each, every method worked out by hand: a table that mixed up the
    aggregations, voted with the wrong weights or took other than the first N would differ."""
    from stepdapo.prm import best_of_n_table

    rows = [
        # problem 1: answers 3 3 5 7, only 5 is right; the critic likes sample 3 (index 2)
        {"correct": [False, False, True, False], "answer": ["3", "3", "5", "7"],
         "score_min": [0.2, 0.3, 0.9, 0.1], "score_last": [0.4, 0.3, 0.8, 0.9], "score_product": [0.1, 0.1, 0.7, 0.05]},
        # problem 2: all right but the first; the critic's min prefers the wrong first sample
        {"correct": [False, True, True, True], "answer": ["1", "2", "2", None],
         "score_min": [0.9, 0.5, 0.5, 0.5], "score_last": [0.1, 0.6, 0.6, 0.9], "score_product": [0.2, 0.3, 0.3, 0.3]},
    ]
    t = best_of_n_table(rows, [1, 4])
    mean = {k: v["mean"] for k, v in t.items()}
    assert mean["pass@1"] == 0.0 and mean["pass@4"] == 1.0
    assert mean["random@1"] == 0.0 and mean["random@4"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert mean["majority@4"] == 0.5  # problem 1: "3" wins (wrong); problem 2: "2" wins (right)
    # weighted by last: problem 1: 3 -> 0.7, 5 -> 0.8, 7 -> 0.9: "7" (wrong); problem 2: 1 -> 0.1, 2 -> 1.2 (right)
    assert mean["weighted vote (last)@4"] == 0.5
    assert mean["best-of-N (min)@4"] == 0.5  # problem 1 right (0.9), problem 2 wrong (0.9 on the first)
    assert mean["best-of-N (last)@4"] == 0.5  # problem 1: 0.9 is sample 4 (wrong); problem 2: sample 4 (right)
    assert mean["best-of-N (product)@4"] == 1.0  # 0.7 -> right; 0.3 ties go to the first of them, sample 2 (right)
    assert all(v["ci95"][0] <= v["mean"] <= v["ci95"][1] for v in t.values())


def test_prm_eval_with_vllm_gives_the_gpu_to_the_critic(small_model_dir, critic_dirs, tmp_path, monkeypatch):
    """vLLM holds gpu_memory_utilization of the GPU while its engine is up: the prm-eval stage shuts
    the engine down before it loads the critic, and drops the critic before the next shard samples
    (a new engine). The table is the one the same samples give with both kept (the HF backend)."""
    import stepdapo.stages.prm_eval as prm_eval
    from stepdapo.config import load_config
    from stepdapo.generation.hf import HFGenerator
    from stepdapo.models import load_policy

    events = []

    class Recording(HFGenerator):
        def generate(self, *a, **kw):
            events.append("sample")
            return super().generate(*a, **kw)

    def policy_generator(policy, delimiter, batch_size, progress, engine=None):
        loaded = []

        def get():
            if not loaded:
                events.append("engine up")
                loaded.append(Recording(*load_policy(policy), delimiter, batch_size, progress=False))
            return loaded[0]
        get.loaded = loaded
        return get

    real_load = prm_eval.load_critic
    monkeypatch.setattr(prm_eval, "policy_generator", policy_generator)
    monkeypatch.setattr(prm_eval, "release_engine", lambda: events.append("engine down"))
    monkeypatch.setattr(prm_eval, "load_critic", lambda d: events.append("critic loaded") or real_load(d))
    monkeypatch.setattr(prm_eval, "PROBLEMS_PER_SHARD", 3)
    tables = {}
    for backend in ("hf", "vllm"):
        events.clear()
        cfg = load_config(None, ["prm.problems=6", "prm.best_of_n=[1,2]", f"generation.backend={backend}"])
        s = prm_eval.run_prm_eval(cfg, small_model_dir, critic_dirs["log_ratio"], tmp_path / backend, TASK,
                                  progress=False)
        tables[backend] = s["table"]
        if backend == "vllm":
            assert events == ["engine up", "sample", "engine down", "critic loaded"] * 2
        else:
            assert events == ["engine up", "sample", "critic loaded", "sample"]
    assert tables["vllm"] == tables["hf"]
