"""stepdapo.algorithms against plain brute-force references on random inputs, plus hand-computed cases."""

import math
import random

import pytest

from stepdapo.algorithms import (
    DistinctAction,
    TokenValueExample,
    ValueExample,
    advantage_gap,
    distinct_actions,
    keeps_state,
    state_advantages,
    token_value_examples,
    value_examples,
)

DELIM = 0  # token 0 ends a step in these tests


def step_ends(tokens):
    ends = [i + 1 for i, t in enumerate(tokens) if t == DELIM]
    return ends if ends and ends[-1] == len(tokens) else ends + [len(tokens)]


# -- value targets ---------------------------------------------------------------------------------

def reference_value_examples(labels, action_states, rollout_prefixes):
    """Brute force: list every (sequence, outcome) visit, then pool the visits of each sequence."""
    visits = []  # (sequence, outcome or None for "all of the state's rollouts", problem, is_state)
    for r in labels:
        visits.append((tuple(r["ids"]), None, r["problem_id"], r))
        for a, term, ok, full in zip(r["action_ids"], r["action_terminal"], r["outcome"], r["rollout_ids"]):
            if term:
                continue
            lengths = set()
            if action_states or rollout_prefixes:
                lengths.add(len(a))
            if rollout_prefixes:
                lengths.update(e for e in step_ends(full) if e < len(full))
            for e in sorted(lengths):
                visits.append((tuple(r["ids"]) + tuple(full[:e]), ok, r["problem_id"], None))
    order = []
    for x, *_ in visits:
        if x not in order:
            order.append(x)
    out = []
    for x in order:
        correct = rollouts = 0
        for y, ok, _, state in visits:
            if y == x:
                correct += sum(state["outcome"]) if state is not None else ok
                rollouts += len(state["outcome"]) if state is not None else 1
        first = next(v for v in visits if v[0] == x)
        is_state = any(v[0] == x and v[3] is not None for v in visits)
        out.append(ValueExample(x, correct / rollouts, rollouts, first[2], is_state))
    return out


def random_labels(rng, n_states):
    """Labels whose states are prefixes of each other's rollouts now and then, as in real data."""
    labels, pool = [], [[1, 2], [1, 3]]
    for i in range(n_states):
        state = list(rng.choice(pool))
        rollouts = [[rng.randrange(4) for _ in range(rng.randrange(1, 7))] for _ in range(rng.randrange(1, 6))]
        actions = [full[:step_ends(full)[0]] for full in rollouts]
        outcome = [rng.random() < 0.5 for _ in rollouts]
        labels.append({"problem_id": f"p{i % 3}", "ids": state, "n_correct": sum(outcome), "outcome": outcome,
                       "action_ids": actions, "action_terminal": [len(a) == len(f) for a, f in zip(actions, rollouts)],
                       "rollout_ids": rollouts})
        pool.append(state + rollouts[0][:step_ends(rollouts[0])[0]])
    return labels


def call_value_examples(labels, **kw):
    cols = {k: [r[k] for r in labels] for k in
            ("problem_id", "ids", "n_correct", "outcome", "action_ids", "action_terminal", "rollout_ids")}
    return value_examples(cols["problem_id"], cols["ids"], cols["n_correct"], cols["outcome"], cols["action_ids"],
                          cols["action_terminal"], cols["rollout_ids"], step_ends=step_ends, **kw)


@pytest.mark.parametrize("action_states,rollout_prefixes", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("seed", range(5))
def test_value_examples_match_brute_force(seed, action_states, rollout_prefixes):
    labels = random_labels(random.Random(seed), 12)
    got = call_value_examples(labels, action_states=action_states, rollout_prefixes=rollout_prefixes)
    assert got == reference_value_examples(labels, action_states, rollout_prefixes)  # same order, exact floats


def test_value_examples_by_hand():
    # one state (token 1) of problem "p", three rollouts: two with steps, one that finishes at once
    label = {"problem_id": "p", "ids": [1], "n_correct": 2, "outcome": [True, False, True],
             "rollout_ids": [[2, 0, 3, 0, 4], [2, 0, 5], [7]], "action_ids": [[2, 0], [2, 0], [7]],
             "action_terminal": [False, False, True]}
    both = call_value_examples([label], action_states=True, rollout_prefixes=True)
    assert both == [ValueExample((1,), 2 / 3, 3, "p", True),
                    ValueExample((1, 2, 0), 0.5, 2, "p", False),          # s + a: one right, one wrong
                    ValueExample((1, 2, 0, 3, 0), 1.0, 1, "p", False)]    # the first rollout's 2nd step
    assert call_value_examples([label], action_states=True, rollout_prefixes=False) == both[:2]
    assert call_value_examples([label], action_states=False, rollout_prefixes=False) == both[:1]
    # a labelled state that a rollout of another state passed through pools both
    deeper = {"problem_id": "p", "ids": [1, 2, 0], "n_correct": 1, "outcome": [True, False, False, False],
              "rollout_ids": [[9]] * 4, "action_ids": [[9]] * 4, "action_terminal": [True] * 4}
    pooled = call_value_examples([label, deeper], action_states=True, rollout_prefixes=False)
    assert pooled[1] == ValueExample((1, 2, 0), (1 + 1) / (2 + 4), 6, "p", True)


def call_token_value_examples(labels):
    cols = {k: [r[k] for r in labels] for k in ("problem_id", "ids", "n_correct", "outcome", "rollout_ids")}
    return token_value_examples(cols["problem_id"], cols["ids"], cols["n_correct"], cols["outcome"],
                                cols["rollout_ids"])


def reference_token_target(labels, x):
    """Brute force: the rollouts (s, r, ok) whose sequence s + r[:-1] passes through x at or after s."""
    correct = rollouts = 0
    for r in labels:
        s = tuple(r["ids"])
        for ok, full in zip(r["outcome"], r["rollout_ids"]):
            seq = s + tuple(full[:-1])
            if len(s) <= len(x) <= len(seq) and seq[:len(x)] == x:
                correct, rollouts = correct + ok, rollouts + 1
    return correct / rollouts


@pytest.mark.parametrize("seed", range(5))
def test_token_value_examples_match_brute_force(seed):
    labels = random_labels(random.Random(seed), 12)
    got = call_token_value_examples(labels)
    seqs = {tuple(r["ids"]) + tuple(full[:-1]) for r in labels for full in r["rollout_ids"]}
    assert sorted(e.input_ids for e in got) == sorted(seqs)  # one example per distinct rollout sequence
    for e in got:
        starts = [len(r["ids"]) - 1 for r in labels for full in r["rollout_ids"]
                  if tuple(r["ids"]) + tuple(full[:-1]) == e.input_ids]
        assert e.start == min(starts)
        assert len(e.targets) == len(e.input_ids) - e.start
        for j, t in enumerate(e.targets):
            assert math.isclose(t, reference_token_target(labels, e.input_ids[:e.start + j + 1]), abs_tol=1e-12)
    # at step ends (where real states end) both poolings see the same rollouts and agree
    token_targets = {e.input_ids[:e.start + j + 1]: t for e in got for j, t in enumerate(e.targets)}
    step_level = [v for v in call_value_examples(labels, action_states=False, rollout_prefixes=True)
                  if v.input_ids[-1] == DELIM]
    assert step_level
    for v in step_level:
        assert math.isclose(token_targets[v.input_ids], v.target, abs_tol=1e-12)


def test_token_value_examples_by_hand():
    label = {"problem_id": "p", "ids": [1], "n_correct": 2, "outcome": [True, False, True],
             "rollout_ids": [[2, 0, 3, 0, 4], [2, 0, 5], [7]], "action_ids": [[2, 0], [2, 0], [7]],
             "action_terminal": [False, False, True]}
    assert call_token_value_examples([label]) == [
        # V(1) = 2/3 (all three); (1, 2) and (1, 2, 0): rollouts 1 and 2 (1/2); later: rollout 1 alone
        TokenValueExample((1, 2, 0, 3, 0), 0, (2 / 3, 0.5, 0.5, 1.0, 1.0), "p"),
        TokenValueExample((1, 2, 0), 0, (2 / 3, 0.5, 0.5), "p"),
        TokenValueExample((1,), 0, (2 / 3,), "p"),  # the rollout that finished at once: the state only
    ]


# -- advantages, the gap filter, distinct actions ----------------------------------------------------

def test_state_advantages():
    assert state_advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    assert state_advantages([0.25]) == [0.0]
    rng = random.Random(0)
    for _ in range(100):
        v = [rng.random() for _ in range(rng.randrange(1, 10))]
        mean = 0.0
        for x in v:
            mean += x / len(v)
        assert all(math.isclose(a, x - mean, abs_tol=1e-12) for a, x in zip(state_advantages(v), v))
        assert math.isclose(sum(state_advantages(v)), 0.0, abs_tol=1e-12)


def test_gap_filter():
    assert advantage_gap([0.5, -0.5, -0.5, 0.5]) == 1.0
    assert keeps_state([0.05, -0.05], 0.1)  # gap exactly min_gap is kept
    assert not keeps_state([0.04, -0.05], 0.1)
    assert not keeps_state([0.0, 0.0], 1e-9) and keeps_state([0.0, 0.0], 0.0)
    rng = random.Random(1)
    for _ in range(100):
        adv = [rng.uniform(-1, 1) for _ in range(rng.randrange(1, 8))]
        ordered = sorted(adv)
        assert advantage_gap(adv) == ordered[-1] - ordered[0]
        assert keeps_state(adv, 0.5) == (ordered[-1] - ordered[0] >= 0.5)


def reference_distinct_actions(actions, values, advantages, outcome, weighting):
    out, seen = [], []
    for j, a in enumerate(actions):
        if a in seen:
            continue
        seen.append(a)
        same = [i for i, b in enumerate(actions) if b == a]
        hits = 0
        for i in same:
            hits += 1 if outcome[i] else 0
        out.append(DistinctAction(j, tuple(a), values[j], advantages[j],
                                  float(len(same)) if weighting == "count" else 1.0, len(same), hits / len(same)))
    return out


@pytest.mark.parametrize("weighting", ["count", "unique"])
def test_distinct_actions_match_brute_force(weighting):
    rng = random.Random(2)
    for _ in range(100):
        kinds = [[rng.randrange(3) for _ in range(rng.randrange(1, 3))] for _ in range(3)]
        actions = [list(rng.choice(kinds)) for _ in range(rng.randrange(1, 12))]
        value_of = {tuple(a): rng.random() for a in kinds}
        values = [value_of[tuple(a)] for a in actions]
        adv = state_advantages(values)
        outcome = [rng.random() < 0.5 for _ in actions]
        got = distinct_actions(actions, values, adv, outcome, weighting)
        assert got == reference_distinct_actions(actions, values, adv, outcome, weighting)
        assert sum(d.count for d in got) == len(actions)
        if weighting == "count":  # the count weights keep the weighted advantages summing to zero
            assert math.isclose(sum(d.weight * d.advantage for d in got), 0.0, abs_tol=1e-12)


def test_distinct_actions_by_hand():
    actions = [[5, 0], [6, 0], [5, 0], [7]]
    values = [0.5, 0.2, 0.5, 1.0]
    adv = state_advantages(values)  # mean 0.55
    got = distinct_actions(actions, values, adv, [True, False, False, True], "count")
    assert [d.action_ids for d in got] == [(5, 0), (6, 0), (7,)]  # first-seen order
    assert [d.first for d in got] == [0, 1, 3]
    assert [d.count for d in got] == [2, 1, 1] and [d.weight for d in got] == [2.0, 1.0, 1.0]
    assert [d.outcome_rate for d in got] == [0.5, 0.0, 1.0]
    assert [d.advantage for d in got] == pytest.approx([-0.05, -0.35, 0.45])
    assert [d.weight for d in distinct_actions(actions, values, adv, [True] * 4, "unique")] == [1.0] * 3
    with pytest.raises(ValueError):
        distinct_actions(actions, values, adv, [True] * 4, "sqrt")


def _split_steps_loop(token_ids, is_delim):
    """The rule of `steps.split_steps`, token by token (its former implementation)."""
    ends, content = [], False
    for i, t in enumerate(token_ids):
        if not is_delim[t]:
            content = True
        elif content and (i + 1 == len(token_ids) or not is_delim[token_ids[i + 1]]):
            ends.append(i + 1)
            content = False
    if not ends or ends[-1] != len(token_ids):
        ends.append(len(token_ids))
    return ends


def test_vectorised_split_steps_equals_the_token_by_token_rule():
    """Runs of delimiters, leading and trailing ones, a sequence of delimiters only, empty ones:
    the vectorised split gives the loop's step ends on 3000 random sequences."""
    import random

    import torch

    from stepdapo.steps import split_steps

    is_delim = torch.zeros(10, dtype=torch.bool)
    is_delim[[1, 2]] = True  # two delimiter tokens ("\n" and "\n\n", say)
    rng = random.Random(0)
    cases = [[], [1], [1, 2], [3], [1, 3], [3, 1], [1, 1, 3, 2, 2, 4, 1], [3, 3, 2]]
    cases += [[rng.choice([1, 2, 3, 4, 5]) for _ in range(rng.randint(0, 12))] for _ in range(3000)]
    for ids in cases:
        assert split_steps(ids, is_delim) == _split_steps_loop(ids, is_delim), ids
