"""`stepdapo plan CONFIG`: what a run will cost, before anything runs.

Per stage and iteration, in the order `stepdapo run` runs them: sequences and tokens generated
(prompt prefill and new tokens apart), sequences and tokens trained (forward + backward, times the
epochs), forward-only tokens (critic scoring, reference log-probs, evaluation prefill), FLOPs, and
the wall time at given, probed or default throughputs.

Where the counts come from:
- exact from the config and the task's data: problems per split, samples, rollouts, epochs, prompt
  lengths in tokens (the task's prompt, tokenized by the model's tokenizer, or the character
  tokenizer of the tiny model);
- estimated: solution and step lengths, from the task's reference solutions tokenized the same way
  (the built-in task writes them; GSM8K / MATH rows carry worked solutions; code rows their
  reference code), each cut at the stage's max_new_tokens. A real model writes its own solutions,
  often longer: the estimate says from what it was made;
- assumed (the policy decides them, so no count can be known before the run): how many step
  prefixes survive de-duplication, how many distinct actions and value examples the rollouts give,
  how many states pass the advantage-gap filter, how many problems give DPO pairs. Every default
  is the upper bound (1.0: nothing merged, everything kept) and is labelled so. `--pilot N` measures
  them by running the states and labels stages on N training problems (`pilot`); `--assume
  NAME=VALUE` sets one.

Every kept solution is assumed to have its problem's reference shape (prompt, step ends), or with a
pilot the shape of one the pilot sampled, and every rollout from a state to continue it to the end:
the counts below walk those shapes.

Time = prefill / forward_tok_s + new / gen_tok_s + trained / train_tok_s + forward / forward_tok_s.
Trained tokens include the padding the collators add (each batch is padded to its longest row);
generation and forward-only passes sort by length, so their padding is left out. With
`--gpu-flops F`: time = FLOPs / F, with 2 * params FLOPs per forward or generated token and
6 * params per trained token (attention and the optimizer left out; decoding is usually
memory-bound, so generation takes longer than this on a GPU).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields

from stepdapo.config import RunConfig
from stepdapo.errors import ConfigError
from stepdapo.precision import training_bf16

# -- throughputs ------------------------------------------------------------------------------------

# Defaults, measured on the 2-core CPU of this repo's machines (one process), by model size:
# (most parameters, generated tok/s, trained tok/s, forward tok/s, where the numbers come from).
# Bigger models scale the last row by 135M / params. Use --probe, or your own numbers, on other hardware.
DEFAULT_THROUGHPUTS = [
    (2e6, 21000.0, 14500.0, 48500.0, "the built-in tiny model (0.8M params), --probe with threads=1, "
                                    "configs/arithmetic.yaml"),
    (3e7, 4000.0, 4000.0, 15000.0, "a 4M-param Llama, 2 threads (measured once when the planner was "
                                   "written, not re-measured since: use --probe)"),
    (3e8, 100.0, 130.0, 400.0, "SmolLM2-135M fp32, 2 threads (conservative: --probe measured 362-438 / "
                               "192-217 / 635-823 tok/s, bench/results/plan-vs-measured-smollm2.md)"),
]


@dataclass
class Throughput:
    """Tokens per second over all of the run's processes; or `gpu_flops` (FLOP/s) for every token."""

    gen_tok_s: float | None = None
    train_tok_s: float | None = None
    forward_tok_s: float | None = None
    gpu_flops: float | None = None
    source: str = ""


def default_throughput(params: int | None) -> Throughput:
    p = params or 1e6
    for most, gen, train, fwd, where in DEFAULT_THROUGHPUTS:
        if p <= most:
            return Throughput(gen, train, fwd, source=f"defaults for <= {most:.0e} params: {where}")
    _, gen, train, fwd, where = DEFAULT_THROUGHPUTS[-1]
    s = 135e6 / p
    return Throughput(gen * s, train * s, fwd * s, source=f"SmolLM2-135M's CPU defaults scaled by 135M/params ({where})")


# -- assumptions ----------------------------------------------------------------------------------

@dataclass
class Assumptions:
    """The counts the policy decides. Each is a fraction of its upper bound (1.0 = the bound);
    ASSUMPTIONS says what each one is."""

    distinct_states: float = 1.0
    distinct_actions: float = 1.0
    kept_actions: float = 1.0
    distinct_value_examples: float = 1.0
    gap_kept: float = 1.0
    dpo_pairs: float = 1.0
    steps_per_solution: float = 8.0
    train_problems: float = 0.0  # 0: read the train split


ASSUMPTIONS = {
    "distinct_states": "share of the kept solutions' step prefixes (after the prompt, which all share) that "
                       "are distinct states; identical solutions and shared first steps merge the rest",
    "distinct_actions": "distinct first steps per state, as a share of label.rollouts (identical actions merge)",
    "kept_actions": "distinct first steps per state that passes the gap filter, as a share of label.rollouts "
                    "(such states have more than one: they differ in value)",
    "distinct_value_examples": "share of the critic's extra examples (action-extended states, rollout "
                               "prefixes) distinct from each other and from the states",
    "gap_kept": "share of the states that pass the advantage-gap filter and train the actor",
    "dpo_pairs": "share of the most DPO pairs (every problem with correct and incorrect kept solutions)",
    "steps_per_solution": "steps of a solution when the task has no reference solutions",
    "train_problems": "training problems, for a train split this machine cannot read (a hub dataset offline): "
                      "planned with the test split's problems as stand-ins for their shapes, the split is not read",
}
COUNTS = ("steps_per_solution", "train_problems")  # assumptions that are not fractions of an upper bound


def parse_assumptions(items: list[str]) -> Assumptions:
    a = Assumptions()
    names = [f.name for f in fields(Assumptions)]
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise ConfigError(f"--assume {item!r}: expected NAME=VALUE with NAME one of {', '.join(names)}")
        try:
            v = float(value)
        except ValueError:
            raise ConfigError(f"--assume {item!r}: {value!r} is not a number") from None
        if not (v > 0 and (v <= 1 or name in COUNTS) and math.isfinite(v)):
            raise ConfigError(f"--assume {item!r}: must be in (0, 1]" if name not in COUNTS
                              else f"--assume {item!r}: must be positive")
        if name == "train_problems" and v != int(v):
            raise ConfigError(f"--assume {item!r}: a number of problems must be a whole number")
        setattr(a, name, v)
    return a


# -- the shapes of solutions ------------------------------------------------------------------------

@dataclass
class Shape:
    """One problem: its prompt length and the end offset of each step of its (reference) solution,
    EOS included in the last step, in tokens."""

    prompt: int
    ends: list[int]

    def cut(self, max_new: int) -> "Shape":
        """The solution as sampled with `max_new_tokens`: cut there (the cut tail is the last step)."""
        if self.ends[-1] <= max_new:
            return self
        return Shape(self.prompt, [e for e in self.ends if e < max_new] + [max_new])


def shapes(task, tokenizer, problems: list, steps_if_unknown: float, max_new: int,
           most: int = 500) -> tuple[list[Shape], str]:
    """Shapes of up to `most` problems spread over `problems`, and a sentence saying how they were made."""
    from stepdapo.generation import encode_prompts
    from stepdapo.steps import check_step_delimiter, delimiter_token_mask, split_steps

    picked = problems[::max(1, len(problems) // most)][:most]
    prompts = encode_prompts(tokenizer, [task.prompt(p, tokenizer) for p in picked])
    is_delim = delimiter_token_mask(tokenizer, task.step_delimiter)
    check_step_delimiter(tokenizer, task.step_delimiter, is_delim)  # the states stage would refuse it
    out, n_ref = [], 0
    for p, prompt in zip(picked, prompts):
        text = task.reference_solution(p)
        if text is None:  # no reference: max_new_tokens, in equal steps (an upper bound on its length)
            k = max(1, round(steps_if_unknown))
            out.append(Shape(len(prompt), [round(max_new * (i + 1) / k) for i in range(k)]))
            continue
        n_ref += 1
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append(Shape(len(prompt), split_steps(ids, is_delim)))
    if n_ref == len(picked):
        how = f"{n_ref} reference solutions"
    elif n_ref:
        how = f"{n_ref} reference solutions and {len(picked) - n_ref} assumed at max_new_tokens"
    else:
        how = f"no reference solutions: assumed max_new_tokens ({max_new}) in {steps_if_unknown:g} steps"
    return out, how


# -- the counts -------------------------------------------------------------------------------------

@dataclass
class Work:
    """One stage's work. Counts are floats: estimates are means times counts."""

    stage: str
    sequences_generated: float = 0
    prefill_tokens: float = 0      # prompts / states, computed once per prompt (the samples share its cache)
    new_tokens: float = 0          # sampled tokens, EOS included
    sequences_trained: float = 0   # forward + backward passes over a sequence, epochs included
    trained_tokens: float = 0      # their tokens, padding included
    forward_tokens: float = 0      # forward-only passes (scoring, reference log-probs): one process's work
    upper_bound: bool = False      # depends on an upper-bound assumption
    notes: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # the stage's own items (states, examples, steps, ...)
    flops: float | None = None
    seconds: float | None = None

    def cost(self, params: int | None, t: Throughput, processes: int = 1) -> None:
        """FLOPs and seconds. Throughputs are the whole run's; the forward-only work (critic scoring,
        reference log-probs) is done by one process (rank 0), at 1/processes of the forward rate."""
        forward = self.prefill_tokens + self.new_tokens + self.forward_tokens
        self.flops = 2 * params * forward + 6 * params * self.trained_tokens if params else None
        if t.gpu_flops:
            self.seconds = (self.flops + (processes - 1) * 2 * params * self.forward_tokens) / t.gpu_flops \
                if self.flops is not None else None
        else:
            self.seconds = (self.prefill_tokens / t.forward_tok_s + self.forward_tokens * processes / t.forward_tok_s
                            + self.new_tokens / t.gen_tok_s + self.trained_tokens / t.train_tok_s)


def optimizer_steps(passes: float) -> int:
    """training.train_steps on an estimated count: ceil(items / batch * epochs), at least 1 (rounded
    first, so that 153.0000001 means 153 steps)."""
    return max(1, math.ceil(round(passes, 6)))


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def padded_length(lengths: list[tuple[float, float]], batch: int) -> float:
    """Expected longest row of a batch of `batch` rows drawn at random from (length, weight) pairs:
    E[max] = sum_v v * (F(v)^b - F(v-)^b). A padded batch costs batch * this."""
    total = sum(w for _, w in lengths)
    if total <= 0:
        return 0.0
    acc, prev, out = 0.0, 0.0, 0.0
    for v, w in sorted(lengths):
        acc += w / total
        out += v * (acc ** batch - prev ** batch)
        prev = acc
    return out


def eval_work(name: str, test: list[Shape], n: int, cfg: RunConfig) -> Work:
    c = cfg.eval
    cut = [s.cut(c.max_new_tokens) for s in test]
    passes = 1 + (c.samples > 0)  # the greedy pass and the sampled pass each prefill every prompt
    return Work(name, sequences_generated=n * (1 + c.samples), prefill_tokens=n * passes * mean(s.prompt for s in cut),
                new_tokens=n * (1 + c.samples) * mean(s.ends[-1] for s in cut),
                notes=[f"{n} problems x (greedy + {c.samples} samples)"], counts={"problems": n})


def prm_eval_work(k: int, test: list[Shape], n_test: int, cfg: RunConfig) -> Work:
    """The critic at test time: max(best_of_n) samples of each problem, each scored by the critic
    in one forward pass (prompt + sample)."""
    c = cfg.prm
    n, per = min(c.problems, n_test), max(c.best_of_n)
    cut = [s.cut(c.max_new_tokens) for s in test]
    sol, prompt = mean(s.ends[-1] for s in cut), mean(s.prompt for s in cut)
    return Work(f"iter-{k}/prm-eval", sequences_generated=n * per, prefill_tokens=n * prompt,
                new_tokens=n * per * sol, forward_tokens=n * per * (prompt + sol),
                notes=[f"{n} problems x {per} samples, each scored by the critic"], counts={"problems": n})


def iteration_work(k: int, cfg: RunConfig, train: list[Shape], n_problems: int, a: Assumptions) -> list[Work]:
    """The stages of iteration k (states, label, critic, advantages, actor) for `n_problems`
    training problems whose shapes are like `train` (per-problem means over the shapes)."""
    S, L, C, A = cfg.states, cfg.label, cfg.critic, cfg.actor
    m, K = L.rollouts, S.keep_per_problem
    per = {key: 0.0 for key in ("states", "state_tok", "label_new", "examples", "adv_rows", "adv_tok",
                                 "adv_tok_shared", "actions", "action_tok", "kept_state_tok", "action_only_tok")}
    critic_lengths: list[tuple[float, float]] = []  # (length, weight) of the critic's examples
    actor_lengths: list[tuple[float, float]] = []   # (state + action length, weight) of the actor's rows
    # with shared_prefix the actor runs each state once and its actions on the state's keys/values
    state_lengths: list[tuple[float, float]] = []   # (state length, weight) of the actor's states
    action_lengths: list[tuple[float, float]] = []  # (action length, weight) of the actor's actions
    for shape in train:
        s = shape.cut(S.max_new_tokens)
        T = len(s.ends)
        for d in range(T):  # the state after d steps
            w = (1.0 if d == 0 else a.distinct_states * K) / len(train)  # the prompt is one state per problem
            e = s.ends[d - 1] if d else 0
            per["states"] += w
            per["state_tok"] += w * (s.prompt + e)
            per["label_new"] += w * m * min(shape.ends[-1] - e, L.max_new_tokens)
            critic_lengths.append((s.prompt + e, w))
            # the critic's extra examples: s + a (action_states) and every later step end of each rollout
            later = (T - d - 1) if C.rollout_prefixes else (1 if C.action_states and T - d > 1 else 0)
            for j in range(d, d + later):
                critic_lengths.append((s.prompt + s.ends[j], w * m * a.distinct_value_examples))
                per["examples"] += w * m * a.distinct_value_examples
            if T - d > 1:  # a non-terminal action is scored by the critic
                per["adv_rows"] += w * m * a.distinct_actions
                per["adv_tok"] += w * m * a.distinct_actions * (s.prompt + s.ends[d])
                per["adv_tok_shared"] += w * (s.prompt + e) + w * m * a.distinct_actions * (s.ends[d] - e)
            n_act = w * a.gap_kept * m * a.kept_actions
            per["actions"] += n_act
            per["action_tok"] += n_act * (s.prompt + s.ends[d])
            per["kept_state_tok"] += w * a.gap_kept * (s.prompt + e)
            per["action_only_tok"] += n_act * (s.ends[d] - e)
            actor_lengths.append((s.prompt + s.ends[d], n_act))
            state_lengths.append((s.prompt + e, w * a.gap_kept))
            action_lengths.append((s.ends[d] - e, n_act))
    N = n_problems
    states = N * per["states"]
    assumed = a.distinct_states == 1.0
    out = [Work(f"iter-{k}/states", sequences_generated=N * S.samples_per_problem,
                prefill_tokens=N * mean(s.prompt for s in train),
                new_tokens=N * S.samples_per_problem * mean(s.cut(S.max_new_tokens).ends[-1] for s in train),
                notes=[f"{N} problems x {S.samples_per_problem} samples; keeps {N * K} solutions, "
                       f"{states:,.0f} states" + (" (upper bound: all distinct)" if assumed else "")],
                counts={"kept_solutions": N * K, "states": states}),
           Work(f"iter-{k}/label", sequences_generated=states * m, prefill_tokens=N * per["state_tok"],
                new_tokens=N * per["label_new"], upper_bound=assumed,
                notes=[f"{states:,.0f} states x {m} rollouts"], counts={"states": states, "rollouts": states * m})]

    # critic: pooled value examples, a (1 - heldout) share trains, at most max_examples
    examples = states + N * per["examples"]
    train_ex = (1 - C.heldout_fraction) * examples
    if C.max_examples is not None:
        train_ex = min(train_ex, C.max_examples)
    pad = padded_length(critic_lengths, C.batch_size)
    continuing = k > 1 and C.init == "previous"  # planned as if every critic passes its check
    epochs = C.training_epochs(continuing)
    steps = optimizer_steps(train_ex / (C.batch_size * C.grad_accum) * epochs)
    rows = steps * C.batch_size * C.grad_accum
    held, train_states = C.heldout_fraction * states, (1 - C.heldout_fraction) * states
    # the log-ratio critic also runs pi_ref forward on every sequence: in training a third of a
    # trained token's FLOPs (2 of 6 per parameter), in scoring a second forward pass
    log_ratio = C.log_ratio_beta > 0
    out.append(Work(f"iter-{k}/critic", sequences_trained=rows, trained_tokens=rows * pad * (4 / 3 if log_ratio else 1),
                    # rank 0 then scores the held-out states and up to 2000 training states
                    forward_tokens=(held + min(2000, train_states)) * per["state_tok"] / per["states"] * (1 + log_ratio),
                    upper_bound=assumed or a.distinct_value_examples == 1.0,
                    notes=[f"{examples:,.0f} value examples, {train_ex:,.0f} train; {steps} steps of "
                           f"{C.batch_size} x {epochs:g} epochs, padded to ~{pad:.0f} tokens"
                           + (f"; continues iteration {k - 1}'s critic, or, if that one fails its check, trains "
                              f"afresh for {C.epochs:g} epochs" if epochs != C.epochs else "")
                           + ("; critic.shared_prefix is not modelled: every example counted in full (an "
                              "upper bound)" if C.shared_prefix else "")
                           + ("; with pi_ref's forward passes (critic.log_ratio_beta)" if log_ratio else "")
                           + (f"; a critic that fails its check trains {C.recovery_epochs:g} more epoch(s) "
                              f"(critic.recovery_epochs, not counted)" if C.recovery_epochs > 0 else "")],
                    counts={"value_examples": examples, "train_examples": train_ex, "steps": steps}))
    # with advantages.shared_prefix each state runs once and its actions on its keys/values (the
    # log-ratio critic does so twice: through pi_theta and pi_ref)
    out.append(Work(f"iter-{k}/advantages",
                    forward_tokens=(2 if log_ratio else 1) * N
                    * per["adv_tok_shared" if cfg.advantages.shared_prefix else "adv_tok"],
                    upper_bound=assumed or a.distinct_actions == 1.0,
                    notes=[f"critic scores {N * per['adv_rows']:,.0f} distinct state+action pairs"],
                    counts={"scored": N * per["adv_rows"], "states_kept": states * a.gap_kept}))

    # actor: every kept action of every kept state, `epochs` times; ref log-probs once before, and
    # once more on the saved model for the summary
    kept_states = states * a.gap_kept
    actions = N * per["actions"]
    rows_per_state = actions / max(kept_states, 1e-9)
    steps = optimizer_steps(kept_states / (A.states_per_batch * A.grad_accum) * A.epochs)
    states_trained = steps * A.grad_accum * A.states_per_batch
    rows_trained = states_trained * rows_per_state
    if A.shared_prefix:  # each state once, padded among the batch's states; the actions among theirs
        trained = (states_trained * padded_length(state_lengths, A.states_per_batch)
                   + rows_trained * padded_length(action_lengths, max(1, round(A.states_per_batch * rows_per_state))))
        forward = 2 * N * (per["kept_state_tok"] + per["action_only_tok"])
    else:  # every (state, action) row in full, padded to the batch's longest
        trained = rows_trained * padded_length(actor_lengths, A.states_per_batch)
        forward = 2 * N * per["action_tok"]
    out.append(Work(f"iter-{k}/actor", sequences_trained=rows_trained, trained_tokens=trained,
                    forward_tokens=forward, upper_bound=assumed or a.gap_kept == 1.0 or a.kept_actions == 1.0,
                    notes=[f"{kept_states:,.0f} states, {actions:,.0f} actions x {A.epochs:g} epochs"
                           + (", each state once for its actions (shared_prefix)" if A.shared_prefix else "")],
                    counts={"states": kept_states, "actions": actions, "steps": steps}))
    return out


def bootstrap_work(cfg: RunConfig, task, tokenizer) -> tuple[Work, str]:
    b = cfg.bootstrap
    n = task.n_demonstrations
    if n is None:
        raise ConfigError(f"task {cfg.task.name!r} has no demonstrations to bootstrap from: set model=PATH")
    demos = task.demonstrations(min(n, 2000))
    lengths = [(len(tokenizer(task.prompt(p, tokenizer))["input_ids"])
                + len(tokenizer(sol, add_special_tokens=False)["input_ids"]) + 1, 1.0) for p, sol in demos]
    steps = optimizer_steps(n / b.batch_size * b.epochs)
    return (Work("bootstrap", sequences_trained=steps * b.batch_size,
                 trained_tokens=steps * b.batch_size * padded_length(lengths, b.batch_size),
                 notes=[f"{n} demonstrations x {b.epochs:g} epochs: one round; up to {b.max_rounds} if the model "
                        f"misses its criterion (bootstrap.min_step_accuracy)"],
                 counts={"demonstrations": n, "steps": steps}),
            f"bootstrap demonstration length: mean {mean(v for v, _ in lengths):.1f} tokens from {len(demos)} demonstrations")


# -- measuring the assumptions ------------------------------------------------------------------

def pilot(cfg: RunConfig, model: str, n_problems: int = 32, generator=None) -> tuple[Assumptions, list[str], list]:
    """Measure the assumptions on a small real sample: the states and labels stages of `model` (the
    iteration's pi_ref) on the first `n_problems` training problems, in a temporary directory. The
    gap filter is applied with Monte-Carlo values of s + a in place of the critic's (there is no
    critic yet). Returns the assumptions, sentences saying what was measured, and the shapes of the
    kept solutions (what the model writes, in place of the reference solutions' lengths).
    `generator` replaces the model (tests: a scripted policy)."""
    import tempfile
    from pathlib import Path

    from stepdapo.algorithms import value_examples
    from stepdapo.steps import delimiter_token_mask, split_steps
    from stepdapo.models import load_tokenizer, set_threads
    from stepdapo.stages.dpo import dpo_pairs
    from stepdapo.stages.advantages import action_values, advantage_rows
    from stepdapo.stages.labels import read_labels, run_labels
    from stepdapo.stages.states import read_solutions, run_states
    from stepdapo.tasks import get_task

    set_threads(cfg.threads)
    small = cfg.model_copy(deep=True)
    small.states.n_problems = n_problems
    task = get_task(cfg.task)
    tok = generator.tokenizer if generator is not None else load_tokenizer(model)
    is_delim = delimiter_token_mask(tok, task.step_delimiter)
    with tempfile.TemporaryDirectory(prefix="stepdapo-pilot-") as d:
        t0 = time.perf_counter()
        st = run_states(small, model, Path(d) / "states", task, progress=False, generator=generator)
        lab = run_labels(small, model, Path(d) / "states", Path(d) / "labels", task, progress=False,
                         generator=generator)
        seconds = time.perf_counter() - t0
        solutions, labels = read_solutions(Path(d) / "states"), read_labels(Path(d) / "labels")
    m, n = cfg.label.rollouts, st["problems"]
    # states: beyond the one prompt state per problem, the share of the kept solutions' step prefixes left
    prefixes = sum(len(e) - 1 for e in solutions.column("step_ends").to_pylist())
    distinct_states = (st["states"] - n) / prefixes if prefixes else 1.0
    cols = labels.to_pydict()
    actions = sum(len(set(map(tuple, acts))) for acts in cols["action_ids"])
    c = cfg.critic
    bound = 0  # the critic's extra examples if every rollout prefix were new
    for acts, terms, rollouts in zip(cols["action_ids"], cols["action_terminal"], cols["rollout_ids"]):
        for a, term, full in zip(acts, terms, rollouts):
            if not term:
                ends = {len(a)} if c.action_states or c.rollout_prefixes else set()
                bound += len(ends | (set(split_steps(full, is_delim)[:-1]) if c.rollout_prefixes else set()))
    examples = len(value_examples(cols["problem_id"], cols["ids"], cols["n_correct"], cols["outcome"],
                                  cols["action_ids"], cols["action_terminal"], cols["rollout_ids"],
                                  step_ends=lambda ids: split_steps(ids, is_delim),
                                  action_states=c.action_states, rollout_prefixes=c.rollout_prefixes))
    kept_rows, adv = advantage_rows(labels, action_values(labels, "mc", None, tok, task), cfg.advantages)
    adv["actions_kept"] = len(kept_rows["advantage"])  # the kept (state, action) rows
    pairs = len(dpo_pairs(solutions, cfg.dpo.pairs_per_problem))
    most_pairs = n * min(cfg.dpo.pairs_per_problem, cfg.states.keep_per_problem - 1)
    clip = lambda x: min(1.0, max(x, 1e-3))  # noqa: E731
    a = Assumptions(distinct_states=clip(distinct_states), distinct_actions=clip(actions / (lab["states"] * m)),
                    kept_actions=clip(adv["actions_kept"] / (max(adv["states_kept"], 1) * m)) if adv["states_kept"] else 1.0,
                    distinct_value_examples=clip((examples - lab["states"]) / bound) if bound else 1.0,
                    gap_kept=clip(adv["fraction_kept"]), dpo_pairs=clip(pairs / most_pairs) if most_pairs else 1.0)
    sampled = st["tokens_sampled"] / (n * cfg.states.samples_per_problem)
    kept = [Shape(len(p), e) for p, e in zip(solutions.column("prompt_ids").to_pylist(),
                                             solutions.column("step_ends").to_pylist())]
    return a, [f"pilot: {model} on {n} training problems ({seconds:.0f} s): {st['states']} states from "
               f"{solutions.num_rows} kept solutions, {actions} distinct actions of {lab['states'] * m} "
               f"rollouts, {examples} value examples, {adv['states_kept']} states past the gap filter "
               f"(Monte-Carlo values in place of the critic's), {pairs} DPO pairs; sampled solutions "
               f"mean {sampled:.1f} tokens"], kept


# -- the model: tokenizer and size ------------------------------------------------------------------

def model_info(cfg: RunConfig, tokenizer_path: str | None = None, params: int | None = None):
    """(tokenizer, parameters or None, a sentence saying where they come from). Nothing is
    downloaded; a config.json (or GGUF header) is read, weights are not loaded. For a model that
    is not on this machine: `tokenizer_path`, another model's tokenizer to count tokens with, and
    `params`, its parameter count; with both, the model's path is not read."""
    from stepdapo.models import char_tokenizer, load_tokenizer, tiny_llama

    if tokenizer_path is not None or params is not None:
        if tokenizer_path is None or params is None:
            raise ConfigError("plan: --tokenizer and --params go together (a model that is not on this machine)")
        return (load_tokenizer(tokenizer_path), params,
                f"{cfg.model}, not read: {params:,} params (given), tokens counted with {tokenizer_path}'s "
                f"tokenizer (given: a stand-in; the model's own tokenizer gives other counts)")

    if cfg.model is None:
        tok = char_tokenizer()
        params = sum(p.numel() for p in tiny_llama(tok, cfg.bootstrap.model).parameters())
        return tok, params, f"the tiny model bootstrap makes ({params:,} params, character tokenizer)"
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from stepdapo.models import _source

    tok = load_tokenizer(cfg.model)
    d, kw = _source(cfg.model)
    try:
        with torch.device("meta"):  # shapes only, no memory
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(d, **kw)).parameters())
        return tok, params, f"{cfg.model} ({params:,} params from its config)"
    except Exception as e:  # a config transformers cannot read: counts still work, FLOPs do not
        return tok, None, f"{cfg.model} (parameter count unknown: {type(e).__name__})"


# -- the plan ---------------------------------------------------------------------------------------

def make_plan(cfg: RunConfig, throughput: Throughput | None = None, assumptions: Assumptions | None = None,
              probe_throughput: bool = False, tokenizer=None, params: int | None = None,
              processes: int = 1, sampled: list[Shape] | None = None, model_how: str | None = None) -> dict:
    """The plan of `stepdapo run` with `cfg` on `processes` processes, as a JSON-able dict (see
    `format_plan`). `sampled`: a pilot's kept solutions (from the first len(set of their problems)
    training problems); they replace the reference solutions' shapes, and the eval solutions'
    lengths are scaled by sampled / reference length on the pilot's problems. `tokenizer` and
    `params` skip loading them (tests, or a model not on this machine: `model_how` says so).
    `assumptions.train_problems` plans that many training problems without reading the train
    split, shaped like the test split's."""
    from stepdapo.stages.evaluate import eval_problems
    from stepdapo.tasks import get_task

    a = assumptions or Assumptions()
    task = get_task(cfg.task)
    if tokenizer is None:
        tokenizer, params, model_how = model_info(cfg)
    elif model_how is None:
        model_how = f"given tokenizer ({params:,} params)" if params else "given tokenizer"
    n_eval = len(eval_problems(task, cfg.eval))
    longest = max(cfg.states.max_new_tokens, cfg.label.max_new_tokens, cfg.eval.max_new_tokens)
    if a.train_problems:  # the train split is not read: the test split's problems stand in for its shapes
        train_problems = task.problems("test")
        n_train = int(a.train_problems) if cfg.states.n_problems is None else min(cfg.states.n_problems,
                                                                                   int(a.train_problems))
        train, train_how = shapes(task, tokenizer, train_problems, a.steps_per_solution, longest)
        train_how += (f" of the TEST split, standing in for the {n_train} training problems "
                      f"(--assume train_problems={int(a.train_problems)}: the train split was not read)")
    else:
        train_problems = task.problems("train")
        n_train = len(train_problems) if cfg.states.n_problems is None else min(cfg.states.n_problems, len(train_problems))
        train, train_how = shapes(task, tokenizer, train_problems[:n_train], a.steps_per_solution, longest)
    test, test_how = shapes(task, tokenizer, eval_problems(task, cfg.eval), a.steps_per_solution, longest)
    length_note = "every sampled solution and rollout is assumed as long as its problem's reference solution"
    if sampled:
        n_pilot = min(n_train, max(1, round(len(sampled) / cfg.states.keep_per_problem)))
        ref, _ = shapes(task, tokenizer, train_problems[:n_pilot], a.steps_per_solution, longest)
        ratio = mean(s.ends[-1] for s in sampled) / mean(s.cut(cfg.states.max_new_tokens).ends[-1] for s in ref)
        train, train_how = sampled, f"{len(sampled)} solutions the pilot sampled and kept"
        test = [Shape(s.prompt, [max(1, round(e * ratio)) for e in s.ends]) for s in test]
        test_how = f"{test_how}, scaled by {ratio:.2f} (pilot's solutions / reference ones on its problems)"
        length_note = "every sampled solution and rollout is assumed as long as one the pilot sampled"
    cut = [s.cut(cfg.states.max_new_tokens) for s in train]
    estimates = [
        f"model: {model_how}",
        f"train prompts: mean {mean(s.prompt for s in train):.1f} tokens; solutions (cut at "
        f"states.max_new_tokens={cfg.states.max_new_tokens}): mean {mean(s.ends[-1] for s in cut):.1f} "
        f"tokens, steps per solution: mean {mean(len(s.ends) for s in cut):.2f}, from {train_how}",
        f"eval prompts: mean {mean(s.prompt for s in test):.1f} tokens; solutions (cut at "
        f"eval.max_new_tokens={cfg.eval.max_new_tokens}): mean "
        f"{mean(s.cut(cfg.eval.max_new_tokens).ends[-1] for s in test):.1f} tokens, from {test_how}",
        length_note,
    ]

    works: list[Work] = []
    if cfg.model is None or cfg.bootstrap.finetune_model:  # the tiny model, or the given one fine-tuned
        w, how = bootstrap_work(cfg, task, tokenizer)
        works.append(w)
        estimates.append(how)
    works.append(eval_work("iter-0/eval", test, n_eval, cfg))
    n_test = len(task.problems("test"))
    for k in range(1, cfg.iterations + 1):
        iteration = iteration_work(k, cfg, train, n_train, a)
        if cfg.prm.best_of_n:  # after the critic, as the pipeline runs it
            at = next(i for i, w in enumerate(iteration) if w.stage.endswith("/critic")) + 1
            iteration.insert(at, prm_eval_work(k, test, n_test, cfg))
        works += iteration
        works.append(eval_work(f"iter-{k}/eval", test, n_eval, cfg))
        if k == 1:  # the baselines, on iteration 1's samples
            from stepdapo.stages.baselines import BASELINES

            for name in cfg.baselines:
                b = BASELINES[name]
                if b.work is not None:
                    works += [b.work(cfg, train, n_train, a), eval_work(f"iter-1/{name}-eval", test, n_eval, cfg)]
                else:
                    estimates.append(f"baseline {name}: its training is not estimated (no work function)")
                    works.append(eval_work(f"iter-1/{name}-eval", test, n_eval, cfg))

    if throughput is None:
        throughput = probe(cfg, train, tokenizer) if probe_throughput else default_throughput(params)
    for w in works:
        w.cost(params, throughput, processes)
    keys = ("sequences_generated", "prefill_tokens", "new_tokens", "sequences_trained", "trained_tokens",
            "forward_tokens", "flops", "seconds")
    total = {key: (sum(getattr(w, key) for w in works) if all(getattr(w, key) is not None for w in works) else None)
             for key in keys}
    return {
        "config": {"task": cfg.task.name, "model": cfg.model, "iterations": cfg.iterations, "threads": cfg.threads,
                   "processes": processes},
        "parameters": params,
        "throughput": asdict(throughput),
        "estimates": estimates,
        "assumptions": {f.name: {"value": getattr(a, f.name), "upper_bound": getattr(a, f.name) == 1.0,
                                 "source": "upper bound" if getattr(a, f.name) == 1.0 else "given",
                                 "doc": ASSUMPTIONS[f.name]}
                        for f in fields(Assumptions) if f.name not in COUNTS},
        "stages": [asdict(w) for w in works],
        "total": total,
    }


# -- the probe -------------------------------------------------------------------------------------

def probe(cfg: RunConfig, train: list[Shape], tokenizer, budget_s: float = 3.0) -> Throughput:
    """Measure generation, training and forward speed of the config's model (the tiny model, at its
    initialisation, when bootstrap would make it) on this machine with cfg.threads threads: a batch of
    sampling shaped like the labels stage's, a few optimizer steps and forward passes shaped like
    the critic's batches. A few seconds; one process (divide by nothing: scale up yourself for
    several)."""
    import torch

    from stepdapo.generation import HFGenerator, SamplingParams, hf_sampling_dtype
    from stepdapo.models import load_policy, set_threads, tiny_llama

    set_threads(cfg.threads)
    if cfg.model is None:
        model = tiny_llama(tokenizer, cfg.bootstrap.model, seed=cfg.seed)
    else:
        model, tokenizer = load_policy(cfg.model)
    # up to ~300M parameters (SmolLM2-135M on a CPU: ~30 s) the probe samples and trains batches
    # as large as the run's, whose rates depend on the batch; bigger models probe small batches
    small = sum(p.numel() for p in model.parameters()) < 3e8
    prompt = [tokenizer.bos_token_id or 0] * max(1, round(mean(s.prompt for s in train)))
    # whole solutions: a rollout from a deeper state is shorter but starts from a longer state
    new = max(2, min(cfg.label.max_new_tokens, round(mean(s.ends[-1] for s in train))))
    # sampling like the labels stage: label.batch_size rows of `rollouts` samples per state, in the
    # sampler's dtype (generation.dtype)
    rows = cfg.label.batch_size if small else min(cfg.label.batch_size, 8)
    n = min(cfg.label.rollouts, rows)
    model.to(hf_sampling_dtype(cfg.generation))
    gen = HFGenerator(model, tokenizer, batch_size=rows, progress=False)
    gen.eos_ids = torch.tensor([-1])  # no EOS: every row generates `new` tokens
    gen.generate([prompt] * max(1, min(rows, 8) // n), n, SamplingParams(max_new_tokens=new, seed=0))  # warm-up
    stats = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < budget_s / 3 or not stats:
        gen.generate([prompt] * max(1, rows // n), n, SamplingParams(max_new_tokens=new, seed=len(stats)))
        stats.append(gen.last_stats["tokens"] / gen.last_stats["seconds"])
    gen_tok_s = sorted(stats)[len(stats) // 2]

    # training and forward passes on batches shaped like the critic's: padded to the longest row, as
    # the trained tokens are counted
    batch = cfg.critic.batch_size if small else min(cfg.critic.batch_size, 4)
    length = max(2, round(padded_length([(s.prompt + s.ends[-1], 1.0) for s in train], batch)))
    ids = torch.randint(3, len(tokenizer), (batch, length))
    model.float().train()  # the trainers keep float32 weights (bf16 is autocast)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=training_bf16(cfg.bf16)):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as every trainer does (max_grad_norm)
        opt.step()
        opt.zero_grad()

    def rate(fn) -> float:
        fn()  # warm-up
        times = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < budget_s / 3 or not times:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return batch * length / sorted(times)[len(times) // 2]

    train_tok_s = rate(step)
    model.eval()

    @torch.no_grad()
    def forward():
        model(input_ids=ids)

    forward_tok_s = rate(forward)
    return Throughput(gen_tok_s, train_tok_s, forward_tok_s,
                      source=f"--probe on this machine, {cfg.threads} thread(s), one process: sampling "
                             f"{rows} rows x {new} tokens, train / forward batches of {batch} x {length} tokens")


# -- printing -------------------------------------------------------------------------------------

def human(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    for div, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s:.2g} s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def format_plan(plan: dict, title: str = "plan"):
    """A rich table of the plan's stages and a list of its estimates and assumptions."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title))  # plain text: an override like baselines=[dpo] is not markup
    for col in ("stage", "seqs gen", "prefill tok", "new tok", "seqs trained", "trained tok", "fwd-only tok",
                "FLOPs", "time"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for w in plan["stages"]:
        ub = "<= " if w["upper_bound"] else ""
        table.add_row(w["stage"], human(w["sequences_generated"]), human(w["prefill_tokens"]),
                      human(w["new_tokens"]), human(w["sequences_trained"]), human(w["trained_tokens"]),
                      human(w["forward_tokens"]), human(w["flops"]), ub + duration(w["seconds"]))
    t = plan["total"]
    ub = "<= " if any(w["upper_bound"] for w in plan["stages"]) else ""
    table.add_row("[bold]total", human(t["sequences_generated"]), human(t["prefill_tokens"]), human(t["new_tokens"]),
                  human(t["sequences_trained"]), human(t["trained_tokens"]), human(t["forward_tokens"]),
                  human(t["flops"]), f"[bold]{ub}{duration(t['seconds'])}")
    thr = plan["throughput"]
    if thr["gpu_flops"]:
        speed = f"{human(thr['gpu_flops'])}FLOP/s for every token (2 x params per forward token, 6 x per trained token)"
    else:
        speed = (f"generate {human(thr['gen_tok_s'])} tok/s, train {human(thr['train_tok_s'])} tok/s, forward and "
                 f"prefill {human(thr['forward_tok_s'])} tok/s")
    lines = [f"throughput: {speed} ({thr['source']})"]
    lines += [f"estimate: {e}" for e in plan["estimates"]]
    lines += [f"assumption: {name} = {v['value']:.3g} ({v['source'].upper()}): {v['doc']}"
              for name, v in plan["assumptions"].items()]
    lines.append("'<=': counts and times from an upper-bound assumption; --assume NAME=VALUE sets one "
                 "(e.g. from a pilot run)")
    lines += [f"{w['stage']}: {'; '.join(w['notes'])}" for w in plan["stages"] if w["notes"]]
    return Group(table, Text("\n".join(lines)))
