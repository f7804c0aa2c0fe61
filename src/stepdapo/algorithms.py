"""The method's pure algorithm functions: value targets, advantages, the gap filter, de-duplication.

Plain Python data in, plain Python data out: no files, no models, no tensors. The stages read their
inputs, call these, and write the results; each function has a CPU test against a separately
written reference implementation (tests/test_algorithms.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ValueExample:
    """One distinct token sequence x with its pooled Monte-Carlo value target.

    target = (correct outcomes of the rollouts through x) / weight, weight = how many rollouts went
    through x; problem_id is the problem of the first labelled state that produced x; is_state says
    whether x is itself a labelled state (the critic is evaluated on those only); state_len is the
    length of that state (x's own length when x is a state): the prefix x shares with its siblings,
    for batching them together (not part of the example's identity).
    """

    input_ids: tuple[int, ...]
    target: float
    weight: int
    problem_id: str
    is_state: bool
    state_len: int = field(default=0, compare=False)


def value_examples(problem_id: Sequence[str], ids: Sequence[list[int]], n_correct: Sequence[int],
                   outcome: Sequence[list[bool]], action_ids: Sequence[list[list[int]]],
                   action_terminal: Sequence[list[bool]], rollout_ids: Sequence[list[list[int]]], *,
                   step_ends: Callable[[list[int]], list[int]], action_states: bool,
                   rollout_prefixes: bool) -> list[ValueExample]:
    """Value targets pooled over every sequence the rollouts pass through.

    Inputs are the labelling stage's columns, one entry per state s (token ids `ids`) with its M
    rollouts: `rollout_ids[k]` is the k-th whole rollout, `action_ids[k]` its first step,
    `outcome[k]` whether it ended correct, `action_terminal[k]` whether the first step already ends
    the solution, and n_correct = sum_k outcome[k]. `step_ends(tokens)` gives the end offsets of a
    token sequence's steps (the last one is len(tokens)).

    Each rollout k from s is an unbiased one-sample estimate of the value of every prefix s + r_k[:e]
    it passes through, so for every distinct sequence x:

        target(x) = sum of the outcomes of the rollouts through x / number of those rollouts

    where "through x" means: x = s itself (all M rollouts of s, via n_correct), or x = s + r_k[:e]
    for e in E_k, with
        E_k = {}                                           if a_k is terminal (the verifier scores it)
        E_k = {len(a_k)} (the action-extended state s + a_k)  if action_states or rollout_prefixes
            + every step end of r_k but its last            if rollout_prefixes
    Sequences come out in first-seen order (states and rollouts in input order).
    """
    # sequence -> [correct, rollouts, problem_id, is_state, state_len]
    pooled: dict[tuple[int, ...], list] = {}
    for pid, s, n_ok, outs, acts, terms, rollouts in zip(problem_id, ids, n_correct, outcome, action_ids,
                                                         action_terminal, rollout_ids):
        entry = pooled.setdefault(tuple(s), [0, 0, pid, False, len(s)])
        entry[0] += n_ok
        entry[1] += len(outs)
        entry[3], entry[4] = True, len(s)
        for a, term, ok, full in zip(acts, terms, outs, rollouts):
            if term:
                continue
            ends = {len(a)} if action_states or rollout_prefixes else set()
            if rollout_prefixes:
                ends |= set(step_ends(full)[:-1])
            for e in sorted(ends):
                x = pooled.setdefault(tuple(s) + tuple(full[:e]), [0, 0, pid, False, len(s)])
                x[0] += ok
                x[1] += 1
    return [ValueExample(k, n_ok / n, n, pid, is_state, state_len)
            for k, (n_ok, n, pid, is_state, state_len) in pooled.items()]


@dataclass(frozen=True)
class TokenValueExample:
    """A rollout's whole sequence x = s + r (its last token dropped: the verifier scores the finished
    solution) with a pooled Monte-Carlo value target for each of its prefixes from the state on:
    targets[j] is the target of x[:start + j + 1], read at position start + j."""

    input_ids: tuple[int, ...]
    start: int
    targets: tuple[float, ...]
    problem_id: str


def token_value_examples(problem_id: Sequence[str], ids: Sequence[list[int]], n_correct: Sequence[int],
                         outcome: Sequence[list[bool]], rollout_ids: Sequence[list[list[int]]]
                         ) -> list[TokenValueExample]:
    """Value targets at every token of every rollout (`critic.token_targets`), pooled like
    `value_examples` but over all prefixes, not only step ends:

        target(x) = sum of the outcomes of the rollouts through x / number of those rollouts

    for x = s (all M rollouts of s) and x = s + r_k[:e], 1 <= e < len(r_k). A rollout from s is an
    unbiased sample of the value of each of these prefixes, never of a prefix shorter than s. One
    example per distinct rollout sequence: a causal model computes the values of all its prefixes in
    one pass, so this costs one forward per rollout, however many targets it carries. A sequence
    reached from several states starts at the shortest one."""
    pooled: dict[tuple[int, ...], list[int]] = {}
    seqs: dict[tuple[int, ...], tuple[int, str]] = {}  # sequence -> (first target position, problem)
    for pid, s, n_ok, outs, rollouts in zip(problem_id, ids, n_correct, outcome, rollout_ids):
        s = tuple(s)
        entry = pooled.setdefault(s, [0, 0])
        entry[0] += n_ok
        entry[1] += len(outs)
        for ok, full in zip(outs, rollouts):
            x = s + tuple(full[:-1])
            for e in range(len(s) + 1, len(x) + 1):
                entry = pooled.setdefault(x[:e], [0, 0])
                entry[0] += ok
                entry[1] += 1
            start = len(s) - 1
            if x not in seqs or start < seqs[x][0]:
                seqs[x] = (start, pid)
    out = []
    for x, (start, pid) in seqs.items():
        targets = tuple(ok / n for ok, n in (pooled[x[:e]] for e in range(start + 1, len(x) + 1)))
        out.append(TokenValueExample(x, start, targets, pid))
    return out


def state_advantages(values: Sequence[float]) -> list[float]:
    """The sibling-mean advantage of each of the M sampled actions of one state:

        A_j = v_j - (1/M) * sum_k v_k

    over ALL M samples, duplicates included, so the mean estimates E_{a ~ pi_ref}[v(s + a)].
    """
    mean = sum(values) / len(values)
    return [v - mean for v in values]


def advantage_gap(advantages: Sequence[float]) -> float:
    """max_j A_j - min_j A_j: how much the choice of action matters at the state."""
    return max(advantages) - min(advantages)


def keeps_state(advantages: Sequence[float], min_gap: float) -> bool:
    """The gap filter: a state trains the actor only if max_j A_j - min_j A_j >= min_gap."""
    return advantage_gap(advantages) >= min_gap


@dataclass(frozen=True)
class DistinctAction:
    """One distinct action of a state, merged over its samples.

    first: index of its first sample (its text and terminal flag are read there); value and
    advantage: those of any of its samples (identical actions get identical values); count: how
    often it was sampled; weight: its training weight; outcome_rate: fraction of its rollouts that
    ended correct.
    """

    first: int
    action_ids: tuple[int, ...]
    value: float
    advantage: float
    weight: float
    count: int
    outcome_rate: float


def distinct_actions(action_ids: Sequence[Sequence[int]], values: Sequence[float],
                     advantages: Sequence[float], outcome: Sequence[bool],
                     weighting: str) -> list[DistinctAction]:
    """Merge identical sampled actions of one state, in first-seen order.

    For a distinct action a sampled n_a times (samples J_a):

        weight_a = n_a   with weighting="count": keeps sum_a weight_a * A_a = sum_j A_j = 0, so the
                         tokens that near-identical actions share start neutral;
                 = 1     with weighting="unique";
        outcome_rate_a = (1/n_a) * sum_{j in J_a} outcome_j
    """
    if weighting not in ("count", "unique"):
        raise ValueError(f"weighting must be 'count' or 'unique', got {weighting!r}")
    samples: dict[tuple[int, ...], list[int]] = {}
    for j, a in enumerate(action_ids):
        samples.setdefault(tuple(a), []).append(j)
    return [DistinctAction(first=js[0], action_ids=a, value=values[js[0]], advantage=advantages[js[0]],
                           weight=float(len(js)) if weighting == "count" else 1.0, count=len(js),
                           outcome_rate=sum(outcome[j] for j in js) / len(js))
            for a, js in samples.items()]
