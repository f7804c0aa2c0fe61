
import pytest

from stepdapo.config import ArithmeticConfig
from stepdapo.tasks.arithmetic import ArithmeticTask


@pytest.fixture
def task():
    return ArithmeticTask(ArithmeticConfig(n_train=300, n_test=200))


def test_verifier_accepts_every_clean_demonstration(task):
    for split in ("train", "test"):
        for p in task.problems(split):
            sol = task.demonstration(p)
            v = task.verify(p, sol)
            assert v.correct, (p, sol, v)
            assert v.answer == p.answer
            stats = task.analyze(p, sol)
            assert stats["well_formed"] == 1 and stats["steps_correct"] == stats["steps"]


def test_error_at_any_step_ends_with_a_wrong_answer(task):
    for p in task.problems("test"):
        n_steps = len(p.meta["ops"])
        for k in range(n_steps):
            for delta in (1, -1, 2, 5):
                sol = task.demonstration(p, errors={k: delta})
                v = task.verify(p, sol)
                assert not v.correct, (p, sol)
                assert v.reason.startswith("wrong answer")
                # the step-level diagnosis puts the error exactly at step k
                stats = task.analyze(p, sol)
                assert stats["steps_correct"] == n_steps - 1


@pytest.mark.parametrize("bad", ["", "3+5=8", "A=", "A=x", "garbage\nmore"])
def test_verifier_rejects_malformed(task, bad):
    p = task.problems("test")[0]
    v = task.verify(p, bad)
    assert not v.correct and v.answer is None and v.reason == "no answer line"


def test_verifier_rejects_corrupted_answer_line(task):
    p = task.problems("test")[0]
    sol = task.demonstration(p)
    wrong = (int(p.answer) + 3) % 10
    assert not task.verify(p, sol.rsplit("\n", 1)[0] + f"\nA={wrong}").correct


def test_problems_are_deterministic_and_splits_disjoint():
    a, b = ArithmeticTask(ArithmeticConfig(seed=3)), ArithmeticTask(ArithmeticConfig(seed=3))
    assert [p.id for p in a.problems("train")] == [p.id for p in b.problems("train")]
    assert [p.question for p in a.problems("test")] == [p.question for p in b.problems("test")]
    train = {p.question for p in a.problems("train")}
    test = {p.question for p in a.problems("test")}
    assert len(train) == a.cfg.n_train and len(test) == a.cfg.n_test
    assert not train & test
    # a different seed gives different problems, still disjoint from any seed's test split
    c = ArithmeticTask(ArithmeticConfig(seed=4))
    assert [p.id for p in c.problems("train")] != [p.id for p in a.problems("train")]
    assert not {p.question for p in c.problems("train")} & test
    # more test problems do not change the training problems
    d = ArithmeticTask(ArithmeticConfig(seed=3, n_test=1500))
    assert [p.id for p in d.problems("train")] == [p.id for p in a.problems("train")]


def test_difficulty_knobs():
    t = ArithmeticTask(ArithmeticConfig(n_ops_min=5, n_ops_max=6, max_operand=99, modulus=100,
                                        operators="+-*", n_train=50, n_test=20))
    for p in t.problems("train"):
        assert 5 <= len(p.meta["ops"]) <= 6
        assert all(0 <= x <= 99 for _, x in p.meta["ops"])
        assert t.verify(p, t.demonstration(p)).correct
    assert {op for p in t.problems("train") for op, _ in p.meta["ops"]} == set("+-*")


def test_too_small_problem_space_is_a_clear_error():
    t = ArithmeticTask(ArithmeticConfig(n_ops_min=1, n_ops_max=1, max_operand=3, n_test=100))
    with pytest.raises(ValueError, match="distinct test problems"):
        t.problems("test")


def test_demonstration_flaw_rates():
    """The systematic flaw hits flaw-case steps at flaw_prob; other steps at noise_prob."""
    t = ArithmeticTask(ArithmeticConfig(flaw_prob=0.6, noise_prob=0.02, n_demos=20000))
    flaw = flaw_ok = other = other_ok = 0
    for p, sol in t.demonstrations():
        s = t.analyze(p, sol)
        flaw += s["flaw_steps"]
        flaw_ok += s["flaw_steps_correct"]
        other += s["steps"] - s["flaw_steps"]
        other_ok += s["steps_correct"] - s["flaw_steps_correct"]
    assert abs(1 - flaw_ok / flaw - 0.6) < 0.02
    assert abs(1 - other_ok / other - 0.02) < 0.005
    assert 0.10 < flaw / (flaw + other) < 0.18  # about 14% of steps are flaw cases
    # every demonstration is on a training problem
    test_q = {p.question for p in t.problems("test")}
    assert not {p.question for p, _ in t.demonstrations(2000)} & test_q


def test_demonstrations_deterministic():
    t = ArithmeticTask(ArithmeticConfig())
    assert t.demonstrations(500, seed=1) == t.demonstrations(500, seed=1)
    assert t.demonstrations(500, seed=1) != t.demonstrations(500, seed=2)
