"""Stage 1, the states: kept solutions balanced between correct and incorrect, cut into steps at the
delimiter's tokens, every step prefix a state (shared prefixes counted once), and the TRL stepwise
export the labels stage writes from them."""

import pyarrow.parquet as pq
from scripted import ScriptedArithmeticPolicy

from stepdapo.config import load_config
from stepdapo.models import char_tokenizer
from stepdapo.stages.labels import run_labels
from stepdapo.stages.states import read_solutions, run_states, select_balanced, unique_states
from stepdapo.tasks.arithmetic import ArithmeticTask


def test_states_and_stepwise_export(tmp_path):
    cfg = load_config(None, ["states.n_problems=20", "states.samples_per_problem=8",
                             "states.keep_per_problem=4", "label.rollouts=8"])
    task = ArithmeticTask(cfg.task.arithmetic)
    tok = char_tokenizer()
    policy = ScriptedArithmeticPolicy(task, tok, 0.3)
    run_states(cfg, "scripted", tmp_path / "s", task, progress=False, generator=policy)
    sol = read_solutions(tmp_path / "s")
    assert sol.num_rows == 20 * 4
    states = unique_states(sol)
    # every prefix at a step boundary is a state; the prompt is shared by a problem's solutions
    assert sum(s["depth"] == 0 for s in states) == 20
    assert sum(s["count"] for s in states if s["depth"] == 0) == 80
    for row in sol.to_pylist():
        problem = next(p for p in task.problems("train") if p.id == row["problem_id"])
        assert len(row["step_ends"]) == len(problem.meta["ops"]) + 1  # operation lines + answer line
        assert row["correct"] == task.verify(problem, row["text"]).correct
    run_labels(cfg, "scripted", tmp_path / "s", tmp_path / "l", task, progress=False, generator=policy)
    sw = pq.read_table(tmp_path / "l" / "stepwise.parquet").to_pylist()
    assert len(sw) == 80
    for row, s in zip(sw, sol.to_pylist()):
        assert row["prompt"] + "".join(row["completions"]) == row["prompt"] + s["text"]
        assert len(row["labels"]) == len(row["completions"]) == len(row["values"])
        assert row["labels"] == [v > 0 for v in row["values"]]
        assert row["values"][-1] == float(s["correct"])


def test_select_balanced():
    c = [True, True, True, False, True, False]
    t = ["a", "a", "b", "x", "c", "x"]
    assert select_balanced(c, t, 4) == [0, 2, 3, 5]  # 2 correct (distinct first) + 2 incorrect
    assert select_balanced([True] * 5, list("abcde"), 3) == [0, 1, 2]
    assert select_balanced([False, True, False, False], list("abcd"), 2) == [0, 1]
    assert select_balanced([True, False, False, False], list("abcd"), 3) == [0, 1, 2]
