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
from stepdapo.steps import delimiter_token_mask, split_steps
from stepdapo.models import LogRatioCritic, critic_values, load_critic, load_tokenizer
from stepdapo.prm import encode, encode_completion, score_ids, score_steps
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
