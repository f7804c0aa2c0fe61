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
        """FLOPs and seconds. Throughputs are the whole run's; the forward-only work is split over
        the processes (reference and final log-probs by prompt, advantages and prm-eval by shard)
        except the critic's evaluation, which rank 0 does alone, at 1/processes of the forward rate
        (RANK0_WAITS)."""
        forward = self.prefill_tokens + self.new_tokens + self.forward_tokens
        if stage_kind(self.stage) not in RANK0_WAITS:
            processes = 1
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


def iteration_work(k: int, cfg: RunConfig, train: list[Shape], n_problems: int, a: Assumptions,
                   lengths: dict | None = None) -> list[Work]:
    """The stages of iteration k (states, label, critic, advantages, actor) for `n_problems`
    training problems whose shapes are like `train` (per-problem means over the shapes). A given
    `lengths` dict receives the (length, weight) distributions of the rows of each stage's batches
    and the rows per state (the memory estimate's micro-batches: `memory_lengths`)."""
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
            if lengths is not None:  # every state (the labels' and Step-DPO's) and its next step
                lengths.setdefault("states", []).append((s.prompt + e, w))
                lengths.setdefault("steps", []).append((s.ends[d] - e, w))
    N = n_problems
    if lengths is not None:
        lengths.update(critic=critic_lengths, actor_states=state_lengths, actor_actions=action_lengths,
                       actor_rows=actor_lengths,
                       actor_rows_per_state=per["actions"] / max(per["states"] * a.gap_kept, 1e-9))
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


def bootstrap_work(cfg: RunConfig, task, tokenizer, out: dict | None = None) -> tuple[Work, str]:
    """The bootstrap SFT's work and a sentence on its demonstrations; a given `out` dict receives
    their (length, weight) distribution as "sft" (the memory estimate's micro-batches)."""
    b = cfg.bootstrap
    n = task.n_demonstrations
    if n is None:
        raise ConfigError(f"task {cfg.task.name!r} has no demonstrations to bootstrap from: set model=PATH")
    demos = task.demonstrations(min(n, 2000))
    lengths = [(len(tokenizer(task.prompt(p, tokenizer))["input_ids"])
                + len(tokenizer(sol, add_special_tokens=False)["input_ids"]) + 1, 1.0) for p, sol in demos]
    steps = optimizer_steps(n / b.batch_size * b.epochs)
    if out is not None:
        out["sft"] = lengths
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

    import pyarrow as pa

    from stepdapo.algorithms import value_examples
    from stepdapo.steps import delimiter_token_mask, split_steps
    from stepdapo.models import load_tokenizer, set_threads
    from stepdapo.stages.dpo import dpo_pairs
    from stepdapo.stages.advantages import SCHEMA, action_values, advantage_rows, summarize
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
    kept_rows, info = advantage_rows(labels, action_values(labels, "mc", None, tok, task), cfg.advantages)
    adv = summarize(pa.Table.from_pydict(kept_rows, SCHEMA), [info], cfg.advantages)  # as the stage's summary
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

def model_info(cfg: RunConfig, tokenizer_path: str | None = None, params: int | None = None,
               params_from: str = "given"):
    """(tokenizer, parameters or None, a sentence saying where they come from). Nothing is
    downloaded; a config.json (or GGUF header) is read, weights are not loaded. For a model that
    is not on this machine: `tokenizer_path`, another model's tokenizer to count tokens with, and
    `params`, its parameter count; with both, the model's path is not read."""
    from stepdapo.models import char_tokenizer, load_tokenizer, tiny_llama

    if tokenizer_path is not None or params is not None:
        if tokenizer_path is None or params is None:
            raise ConfigError("plan: --tokenizer and --params go together (a model that is not on this machine; "
                              "--params may come from --model-shape or a well-known model name instead)")
        return (load_tokenizer(tokenizer_path), params,
                f"{cfg.model}, not read: {params:,} params ({params_from}), tokens counted with {tokenizer_path}'s "
                f"tokenizer (given: a stand-in; the model's own tokenizer gives other counts)")

    if cfg.model is None:
        tok = char_tokenizer()
        params = sum(p.numel() for p in tiny_llama(tok, cfg.bootstrap.model).parameters())
        return tok, params, f"the tiny model bootstrap makes ({params:,} params, character tokenizer)"
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from stepdapo.errors import ModelPathError
    from stepdapo.models import _source

    try:
        tok = load_tokenizer(cfg.model)
    except ModelPathError as e:
        raise ModelPathError(f"{e}; to plan a model that is not on this machine give --tokenizer PATH (another "
                             f"model's tokenizer to count tokens with) and --params N or --model-shape "
                             f"CONFIG.json (or nothing more when the model's name is one of "
                             f"{', '.join(KNOWN_SHAPES)}), and --assume train_problems=N if its train split "
                             f"cannot be read here") from None
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
              processes: int = 1, sampled: list[Shape] | None = None, model_how: str | None = None,
              gpu_memory: float | None = None, fsdp: bool = False, shape: ModelShape | None = None,
              shape_path: str | None = None) -> dict:
    """The plan of `stepdapo run` with `cfg` on `processes` processes, as a JSON-able dict (see
    `format_plan`). `sampled`: a pilot's kept solutions (from the first len(set of their problems)
    training problems); they replace the reference solutions' shapes, and the eval solutions'
    lengths are scaled by sampled / reference length on the pilot's problems. `tokenizer` and
    `params` skip loading them (tests, or a model not on this machine: `model_how` says so).
    `assumptions.train_problems` plans that many training problems without reading the train
    split, shaped like the test split's. The plan's "memory" is every stage's peak memory per GPU
    (`memory_plan`) on `processes` processes (`fsdp`: sharded; else DDP) for the model's `shape`
    (default: `model_shape(cfg, shape_path)`), checked against `gpu_memory` GB if given; None when
    the shape is unknown."""
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
    sft: dict = {}
    if cfg.model is None or cfg.bootstrap.finetune_model:  # the tiny model, or the given one fine-tuned
        w, how = bootstrap_work(cfg, task, tokenizer, sft)
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

    defaults = throughput is None and not probe_throughput  # the CPU table: no timing warnings from it
    if throughput is None:
        throughput = probe(cfg, train, tokenizer) if probe_throughput else default_throughput(params)
    for w in works:
        w.cost(params, throughput, processes)
    if shape is None:
        shape = model_shape(cfg, shape_path)
    memory = None
    if shape is None:
        estimates.append("memory per GPU: not estimated, the model's shape is unknown (--model-shape CONFIG.json)")
    else:
        memory = memory_plan(works, MemorySetup(cfg, processes, fsdp, gpu_memory), shape,
                             memory_lengths(cfg, train, test, a, sft.get("sft")))
        memory["sync_warnings"] = [] if defaults else sync_warnings(works, params, throughput, processes)
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
        "memory": memory,
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


# -- memory per GPU ---------------------------------------------------------------------------------

GiB = 2 ** 30  # "GB" in the memory table: GiB, as torch and nvidia-smi count (an "80 GB" H100 has ~79.2)
HEADROOM = 0.9  # a stage fits when its estimated peak is at most this share of --gpu-memory

# Shapes of well-known models, for a model that is not on this machine (matched, lower case, in the
# config's `model` string; the longest key first). From each model's config.json on the hub.
KNOWN_SHAPES = {
    "qwen2.5-math-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
                              vocab_size=151936, tied=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                         vocab_size=128256, tied=False),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                         vocab_size=151936, tied=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                         vocab_size=49152, tied=True),
}


@dataclass
class ModelShape:
    """A Llama-style decoder (RMSNorm, grouped-query attention, SwiGLU MLP, no biases): what the
    memory estimate needs. Qwen2's q/k/v biases (a few 10^4 parameters) are left out."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tied: bool  # the LM head is the embedding matrix
    head_dim: int = 0  # 0: hidden_size / num_heads
    source: str = ""

    @property
    def q_dim(self) -> int:
        return self.num_heads * (self.head_dim or self.hidden_size // self.num_heads)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * (self.head_dim or self.hidden_size // self.num_heads)

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer: q, k, v, o, gate, up, down."""
        h, i = self.hidden_size, self.intermediate_size
        return [(h, self.q_dim), (h, self.kv_dim), (h, self.kv_dim), (self.q_dim, h), (h, i), (h, i), (i, h)]

    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linears()) + 2 * self.hidden_size  # + its two RMSNorms

    def root_params(self, value_head: bool = False) -> int:
        """Parameters outside the decoder layers: embeddings, the final norm, an untied LM head (or
        the 1-output value head)."""
        if value_head:
            return self.vocab_size * self.hidden_size + 2 * self.hidden_size
        return self.vocab_size * self.hidden_size * (1 if self.tied else 2) + self.hidden_size

    def params(self, value_head: bool = False) -> int:
        """The causal LM's parameters; `value_head`: the sequence-classification model of the same
        backbone (the LM head replaced by a 1-output head, the embeddings kept)."""
        return self.root_params(value_head) + self.num_layers * self.layer_params()

    def linear_params(self) -> int:
        return self.num_layers * sum(a * b for a, b in self.linears())

    def lora_params(self, r: int) -> int:
        """LoRA adapters on every linear layer of every decoder layer (peft's "all-linear", which
        leaves the LM head out): r x (in + out) each."""
        return self.num_layers * r * sum(a + b for a, b in self.linears())

    def kv_bytes_per_token(self, nbytes: int) -> int:
        """Keys and values of one token over all layers."""
        return 2 * self.num_layers * self.kv_dim * nbytes

    def layer_activation_bytes(self, a: int, r: int = 4) -> int:
        """Bytes one token leaves saved for the backward pass in one decoder layer, activations in `a`
        bytes (2 under bf16 autocast) and the residual stream in `r` (4: float32 master weights keep
        it, and the RMSNorms, in float32). Counted tensor by tensor for HF's Llama layer with SDPA
        (no [T, T] scores; cf. Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
        Transformer Models", whose 34 x hidden bytes per token and layer is the same count for a
        GPT layer with a 4 x hidden GeLU MLP and dropout):
          two RMSNorms: each its input and normalised output (2 x r x h) and the linear's cast input (a x h)
          attention: q, k, v after RoPE, the attention output (o_proj's input): a x (2 h + 2 kv)
          SwiGLU MLP: gate, up, silu(gate) and their product (down_proj's input): 4 x a x intermediate"""
        h = self.hidden_size
        return 2 * (2 * r * h + a * h) + a * (self.q_dim + h + 2 * self.kv_dim) + 4 * a * self.intermediate_size


def shape_from_config(get, source: str) -> ModelShape:
    """A ModelShape from an HF config: `get(name)` returns a field or None."""
    missing = [f for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if get(f) is None]
    if missing:
        raise ConfigError(f"plan: {source}: no {', '.join(missing)}: not a decoder-only (Llama-style) model config")
    heads = int(get("num_attention_heads"))
    return ModelShape(int(get("hidden_size")), int(get("intermediate_size")), int(get("num_hidden_layers")), heads,
                      int(get("num_key_value_heads") or heads), int(get("vocab_size")),
                      bool(get("tie_word_embeddings")), int(get("head_dim") or 0), source)


def model_shape(cfg: RunConfig, path: str | None = None) -> ModelShape | None:
    """The model's shape and where it comes from: `path` (--model-shape: a config.json, or a
    directory with one); the tiny model's config section; the model's own config (an HF directory
    or GGUF file on this machine); else the known shape of a well-known name in `model`; else None."""
    import json
    from pathlib import Path

    if path is not None:
        p = Path(path).expanduser()
        f = p / "config.json" if p.is_dir() else p
        try:
            data = json.loads(f.read_text())
        except OSError as e:
            raise ConfigError(f"plan: --model-shape {path}: cannot read it ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"plan: --model-shape {f}: not JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"plan: --model-shape {f}: not a JSON object")
        if "hidden_size" not in data and isinstance(data.get("text_config"), dict):
            data = data["text_config"]  # a multimodal config: its language model
        return shape_from_config(data.get, f"{f} (--model-shape)")
    if cfg.model is None:
        from stepdapo.models import char_tokenizer

        t = cfg.bootstrap.model
        return ModelShape(t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_heads,
                          len(char_tokenizer()), True, source="the tiny model (config section bootstrap.model)")
    from stepdapo.errors import ModelPathError

    try:
        from transformers import AutoConfig

        from stepdapo.models import _source

        d, kw = _source(cfg.model)
        c = AutoConfig.from_pretrained(d, **kw)
        c = getattr(c, "text_config", None) or c
        return shape_from_config(lambda name: getattr(c, name, None), f"{cfg.model}'s config")
    except ModelPathError:
        pass  # not on this machine: a well-known name?
    except (ConfigError, OSError, ValueError):
        return None
    name = str(cfg.model).lower()
    for key in sorted(KNOWN_SHAPES, key=len, reverse=True):
        if key in name:
            return ModelShape(**KNOWN_SHAPES[key], source=f"the known shape of {key} (matched in the model name "
                                                          f"{cfg.model}, which is not on this machine)")
    return None


@dataclass
class MemorySetup:
    """What a memory estimate depends on besides the shapes: the config, the processes and FSDP."""

    cfg: RunConfig
    processes: int = 1
    fsdp: bool = False
    gpu_gb: float | None = None

    def changed(self, **overrides) -> "MemorySetup":
        """A copy with config fields set ({"critic.batch_size": 32, ...}; "fsdp": True sets FSDP)."""
        cfg = self.cfg.model_copy(deep=True)
        fsdp = overrides.pop("fsdp", self.fsdp)
        for key, value in overrides.items():
            *path, name = key.split(".")
            target = cfg
            for p in path:
                target = getattr(target, p)
            setattr(target, name, value)
        return MemorySetup(cfg, self.processes, fsdp, self.gpu_gb)


@dataclass
class StageMemory:
    """One stage's estimated peak memory per GPU, in bytes (GiB in the plan's JSON)."""

    stage: str
    kind: str  # "train", "forward", "sample" or "sample+score"
    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0  # the one that applies (gradient_checkpointing)
    activations_no_ckpt: float | None = None
    activations_ckpt: float | None = None
    checkpointing: bool = False
    logits: float = 0.0
    kv_cache: float = 0.0
    engine: float = 0.0  # vLLM: what its gpu_memory_utilization takes
    peak: float | None = None  # None: vLLM's share of an unknown GPU
    fits: bool | None = None
    fix: str | None = None
    fixed_peak: float | None = None
    forward_peak: float = 0.0  # a training stage's forward-only passes (FORWARD_PHASE)
    refused: str | None = None  # why the run would stop at this stage whatever the memory
    notes: list[str] = field(default_factory=list)


# the trainers: (the config section of their LoRA or None, their micro-batch field, their grad_accum field)
TRAINERS = {
    "bootstrap": ("bootstrap", "bootstrap.batch_size", None),
    "critic": ("critic", "critic.batch_size", "critic.grad_accum"),
    "actor": ("actor", "actor.states_per_batch", "actor.grad_accum"),
    "mc_dapo": ("actor", "actor.states_per_batch", "actor.grad_accum"),  # the actor's settings
    "dpo": (None, "dpo.batch_size", None),
    "step_dpo": (None, "step_dpo.batch_size", None),
    "rft": (None, "rft.batch_size", None),
}
SAMPLERS = {"eval": "eval", "states": "states", "label": "label", "prm-eval": "prm"}  # kind -> its batch_size's section
# stages whose forward-only work (Work.forward_tokens) rank 0 does alone while the other processes
# wait in `runner.on_main`, and in how many waits: the critic's evaluation. Reference and final
# log-probs (actor, baselines), advantages and prm-eval are split over the processes.
RANK0_WAITS = {"critic": 1}
# the trainers whose stage also runs forward-only passes on every process with the whole float32
# model (reference and final log-probs; the critic's evaluation on rank 0)
FORWARD_PHASE = ("critic", "actor", "mc_dapo", "dpo", "step_dpo")


def stage_kind(stage: str) -> str:
    name = stage.rsplit("/", 1)[-1]
    return "eval" if name.endswith("-eval") and name != "prm-eval" else name


def _get(cfg: RunConfig, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def memory_lengths(cfg: RunConfig, train: list[Shape], test: list[Shape], a: Assumptions,
                   sft: list[tuple[float, float]] | None) -> dict:
    """(length, weight) distributions of the rows each stage batches, from the plan's shapes."""
    out: dict = {}
    iteration_work(1, cfg, train, 1, a, lengths=out)
    cut = [s.cut(cfg.states.max_new_tokens) for s in train]
    out.update(sft=sft or [(s.prompt + s.ends[-1], 1.0) for s in cut],
               prompts=[(s.prompt, 1.0) for s in cut], solutions=[(s.ends[-1], 1.0) for s in cut],
               prompt_solutions=[(s.prompt + s.ends[-1], 1.0) for s in cut],
               states_steps=[(v + d, w) for (v, w), (d, _) in zip(out["states"], out["steps"])],
               test_prompts=[(s.prompt, 1.0) for s in test],
               prm_sequences=[(s.prompt + s.cut(cfg.prm.max_new_tokens).ends[-1], 1.0) for s in test])
    return out


def _microbatch(setup: MemorySetup, kind: str, lengths: dict) -> tuple[float, float, float, float]:
    """(tokens through the model, positions whose log-probs are computed, tokens of prefix keys/values
    copied for the continuations (shared prefixes), bytes of a packed batch's 4-D attention mask) of
    one process's micro-batch of trainer `kind`."""
    cfg = setup.cfg
    b = max(1, _get(cfg, TRAINERS[kind][1]) // setup.processes)  # the config's batches are global
    pad = padded_length
    if kind in ("bootstrap", "rft"):
        t = b * pad(lengths["sft" if kind == "bootstrap" else "prompt_solutions"], b)
        return t, t, 0.0, 0.0
    if kind == "critic":
        t = b * pad(lengths["critic"], b)
        return t, t, 0.0, 0.0
    # the shared-prefix trainers: a prefix once and its continuations on copies of its keys/values;
    # under gradient checkpointing (no cache) a prefix and all its continuations packed into one row
    # under a 4-D attention mask (logprobs.packed_sequence_logprobs: bool, and the kernel's additive
    # bf16 copy, 3 bytes an entry); without shared_prefix every (prefix, continuation) its own row
    if kind in ("actor", "mc_dapo"):
        shared, per = cfg.actor.shared_prefix, lengths["actor_rows_per_state"]
        prefix, cont, whole = lengths["actor_states"], lengths["actor_actions"], lengths["actor_rows"]
    elif kind == "dpo":
        shared, per = cfg.dpo.shared_prefix, 2
        prefix, cont, whole = lengths["prompts"], lengths["solutions"], lengths["prompt_solutions"]
    else:  # step_dpo
        shared, per = cfg.step_dpo.shared_prefix, 2
        prefix, cont, whole = lengths["states"], lengths["steps"], lengths["states_steps"]
    rows = max(1.0, b * per)
    if shared and not cfg.gradient_checkpointing:
        p = pad(prefix, b)
        c = rows * pad(cont, max(1, round(rows)))
        return b * p + c, c, rows * p, 0.0
    if shared:  # packed: b rows of the prefix and its `per` continuations
        row = pad(prefix, b) + per * _mean(cont)
        return b * row, rows * _mean(cont), 0.0, 3 * b * row * row
    t = rows * pad(whole, max(1, round(rows)))
    return t, t, 0.0, 0.0


def _forward_pass(shape: ModelShape, cfg: RunConfig, tokens: float, lm_models: int, kv_tokens: float = 0.0,
                  a: int = 4) -> dict:
    """One forward-only batch of `tokens` (no gradients), activations in `a` bytes (2 under bf16
    autocast): one layer's activations at a time, the chunked float32 logits of `lm_models` language
    models, the keys/values of `kv_tokens` in each model."""
    n = max(lm_models, 1)
    return {"activations": tokens * shape.layer_activation_bytes(a),
            "logits": lm_models * 2 * min(tokens, cfg.logits_chunk_tokens) * shape.vocab_size * 4,
            "kv_cache": n * kv_tokens * shape.kv_bytes_per_token(a)}


# Forward-only passes (critic scoring and evaluation, reference and final log-probs) run the models
# as the stages load them, float32 (models.load_policy / load_critic), under bf16 autocast when the
# trainers use it (precision.autocast), except prm-eval's scoring (float32).
FORWARD_BYTES = 4


def _critic_models(cfg: RunConfig) -> tuple[bool, int]:
    """(log-ratio critic?, language models whose logits it computes)."""
    log_ratio = cfg.critic.log_ratio_beta > 0
    return log_ratio, 2 if log_ratio else 0


def _critic_weights(shape: ModelShape, cfg: RunConfig) -> float:
    """The saved critic loaded for scoring: float32, two language models or one value-head model."""
    return FORWARD_BYTES * (2 * shape.params() if cfg.critic.log_ratio_beta > 0 else shape.params(value_head=True))


def _mean(lengths: list[tuple[float, float]]) -> float:
    total = sum(w for _, w in lengths)
    return sum(v * w for v, w in lengths) / total if total > 0 else 0.0


def _sampling(shape: ModelShape, setup: MemorySetup, kind: str, lengths: dict, m: StageMemory) -> None:
    """A sampling stage: vLLM takes gpu_memory_utilization of the GPU; the HF sampler its weights,
    the KV cache of batch_size rows x (padded prompt + max_new_tokens), the prefill's logits (every
    prompt position's, in the sampler's dtype) and one layer's prefill activations."""
    from stepdapo.precision import sampling_dtype

    cfg, g = setup.cfg, setup.cfg.generation
    sb = 4 if sampling_dtype(g.dtype) == "float32" else 2
    section = _get(cfg, SAMPLERS[kind])
    prompts = {"eval": lengths["test_prompts"], "prm-eval": lengths["test_prompts"], "states": lengths["prompts"],
               "label": lengths["states"]}[kind]
    n = {"eval": 1, "prm-eval": max(cfg.prm.best_of_n or [1]), "states": cfg.states.samples_per_problem,
         "label": cfg.label.rollouts}[kind]
    rows = section.batch_size
    per_batch = max(1, rows // n)  # prompts per batch; each prompt's prefill shared by its n samples
    p = padded_length(prompts, per_batch)
    if g.backend == "vllm":
        weights = shape.params() * sb / g.tensor_parallel_size
        one = shape.kv_bytes_per_token(sb) / g.tensor_parallel_size * (g.max_model_len or p + section.max_new_tokens)
        if setup.gpu_gb is None:
            m.notes.append(f"vLLM takes generation.gpu_memory_utilization = {g.gpu_memory_utilization:g} of each GPU "
                           f"(its {weights / GiB:.1f} GB of weights and the KV cache): --gpu-memory checks it")
            return
        m.engine = g.gpu_memory_utilization * setup.gpu_gb * GiB
        m.notes.append(f"vLLM: {weights / GiB:.1f} GB of weights, the rest of its "
                       f"{g.gpu_memory_utilization:g} x {setup.gpu_gb:g} GB for the KV cache")
        if weights + one > m.engine:
            m.refused = (f"vLLM's share (generation.gpu_memory_utilization = {g.gpu_memory_utilization:g}) does not "
                         f"hold its weights and one sequence's keys/values ({(weights + one) / GiB:.1f} GB)")
        return
    m.weights = shape.params() * sb
    m.kv_cache = rows * (p + section.max_new_tokens) * shape.kv_bytes_per_token(sb)
    m.logits = per_batch * p * shape.vocab_size * sb
    m.activations = per_batch * p * shape.layer_activation_bytes(sb, sb)
    m.notes.append(f"HF sampler ({SAMPLERS[kind]}.batch_size = {rows} rows, prompts padded to ~{p:.0f} tokens)")


def _training(shape: ModelShape, setup: MemorySetup, kind: str, lengths: dict, m: StageMemory) -> None:
    """A trainer: float32 master weights, gradients (and DDP's bucket copy) and AdamW's two states of
    what it trains (all of it, or LoRA's adapters), sharded over the processes under FSDP; one
    process's micro-batch of activations, logits and shared-prefix keys/values."""
    cfg, N = setup.cfg, setup.processes
    section, _, _ = TRAINERS[kind]
    tiny = kind == "bootstrap" and cfg.model is None
    bf16 = training_bf16(cfg.bf16) and not tiny  # the tiny model trains in float32, on the CPU
    a = 2 if bf16 else 4
    r = 0 if tiny or section is None else _get(cfg, section).lora_r
    log_ratio = kind == "critic" and cfg.critic.log_ratio_beta > 0
    value_head = kind == "critic" and not log_ratio
    head = shape.hidden_size + 1 if kind == "critic" else 0  # the critic's value head (trains with LoRA too)
    P = shape.params(value_head=True) if value_head else shape.params() + (head if log_ratio else 0)
    trained = P if r == 0 else shape.lora_params(r) + head
    fsdp = setup.fsdp and N > 1
    if fsdp and r:
        m.refused = f"LoRA ({section}.lora_r = {r}) with FSDP is refused by the trainer (not supported yet)"
    if fsdp and log_ratio:
        m.refused = "the log-ratio critic (critic.log_ratio_beta > 0) with FSDP is refused (not supported yet)"
    if fsdp:  # FSDP2: shards, plus gathered layers (2 in flight + 1's unsharded gradients) and the root unit
        pb = 2 if bf16 else 4  # accelerate turns the Trainer's bf16 into FSDP's bf16 param_dtype
        m.weights = 4 * P / N + pb * (3 * shape.layer_params() + shape.root_params(value_head))
        m.gradients, m.optimizer = 4 * P / N, 8 * P / N
        copies = 0.0  # the gathered parameters are bf16 already: autocast keeps no copies
    else:
        m.weights = 4 * (P + (trained if r else 0) + (shape.params() if log_ratio else 0))  # + pi_ref, frozen
        m.gradients = 4 * trained * (2 if N > 1 else 1)  # DDP's buckets: a second copy (gradient_as_bucket_view off)
        m.optimizer = 8 * trained
        # bf16 autocast saves a bf16 copy of each linear weight it casts for the backward pass
        copies = 2 * shape.linear_params() if bf16 else 0.0
    L, h = shape.num_layers, shape.hidden_size

    def parts(ckpt: bool) -> tuple[float, float, float]:
        """(activations, logits, shared-prefix keys/values) with or without gradient checkpointing."""
        tokens, logit_tokens, kv_tokens, mask = _microbatch(setup.changed(gradient_checkpointing=ckpt), kind, lengths)
        per = shape.layer_activation_bytes(a)
        ref = tokens * per if log_ratio else 0.0  # pi_ref's forward, without gradients: one layer at a time
        if ckpt:  # each layer's input kept, one layer's activations (and bf16 weights) recomputed at a time
            act = L * tokens * h * 4 + tokens * per + copies / L + ref + mask
        else:
            act = L * tokens * per + copies + ref + mask
        if kind in ("bootstrap", "rft"):  # the HF model's loss: every position's float32 logits, not chunked
            logits = logit_tokens * shape.vocab_size * 4 * 2
        elif value_head:
            logits = 0.0  # a 1-output head
        else:  # chunked log-probs (logits_chunk_tokens), both models' for the log-ratio critic
            logits = (2 if log_ratio else 1) * 2 * min(logit_tokens, cfg.logits_chunk_tokens) * shape.vocab_size * 4
        return act, logits, kv_tokens * shape.kv_bytes_per_token(a)

    m.activations_no_ckpt, logits_off, kv_off = parts(False)
    m.activations_ckpt, logits_on, kv_on = parts(True)
    m.checkpointing = cfg.gradient_checkpointing
    m.activations, m.logits, m.kv_cache = ((m.activations_ckpt, logits_on, kv_on) if m.checkpointing
                                           else (m.activations_no_ckpt, logits_off, kv_off))
    b = _get(cfg, TRAINERS[kind][1])
    m.notes.append(f"{TRAINERS[kind][1]} = {b}: {max(1, b // N)} a process"
                   + (f"; LoRA r = {r}: {trained / 1e6:.1f}M trained parameters" if r else "")
                   + ("; with pi_ref (frozen, float32)" if log_ratio else "")
                   + ("; bf16 autocast" if bf16 else "; float32") + ("; FSDP" if fsdp else "; DDP" if N > 1 else ""))
    if tiny:
        m.notes.append("the tiny model trains on the CPU (host memory, not the GPU's)")
    if kind in FORWARD_PHASE:  # reference / final log-probs, the critic's evaluation
        m.forward_peak = _forward_phase_peak(shape, cfg, kind, lengths, a)


def _forward_phase_peak(shape: ModelShape, cfg: RunConfig, kind: str, lengths: dict, a: int) -> float:
    """A training stage's forward-only passes, in batches of max_batch_tokens, at the trainers'
    precision: the whole float32 model on the GPU, also under FSDP (every process scores its share
    of the reference log-probs before the model is sharded and of the final ones on the saved
    model; rank 0 evaluates the saved critic)."""
    B = cfg.max_batch_tokens
    if kind == "critic":  # the saved critic, evaluated on the held-out states
        f = _forward_pass(shape, cfg, B, _critic_models(cfg)[1], a=a)
        return _critic_weights(shape, cfg) + sum(f.values())
    # reference (and final) log-probs; with shared prefixes each continuation row gets a copy of its
    # prefix's keys/values: a batch of G prefixes of mean length p, each with r rows of mean length c,
    # fills the budget at G = B / (p + r c) and copies G r p keys/values
    shared, prefix, cont, per = {
        "actor": (cfg.actor.shared_prefix, "actor_states", "actor_actions", lengths["actor_rows_per_state"]),
        "mc_dapo": (cfg.actor.shared_prefix, "actor_states", "actor_actions", lengths["actor_rows_per_state"]),
        "dpo": (cfg.dpo.shared_prefix, "prompts", "solutions", 2),
        "step_dpo": (cfg.step_dpo.shared_prefix, "states", "steps", 2)}[kind]
    p, c = _mean(lengths[prefix]), _mean(lengths[cont])
    kv = B / max(p + per * c, 1e-9) * per * p if shared else 0.0
    f = _forward_pass(shape, cfg, B, 1, kv, a)
    return FORWARD_BYTES * shape.params() + sum(f.values())


def stage_memory(stage: str, setup: MemorySetup, shape: ModelShape, lengths: dict) -> StageMemory:
    """The peak memory per GPU of one stage (docs/plan.md, "Memory per GPU")."""
    cfg = setup.cfg
    kind = stage_kind(stage)
    if kind in SAMPLERS:
        m = StageMemory(stage, "sample+score" if kind == "prm-eval" else "sample")
        _sampling(shape, setup, kind, lengths, m)
        if kind == "prm-eval":  # the critic scores each shard's samples once they are drawn
            longest = padded_length(lengths["prm_sequences"], cfg.prm.batch_size)
            t = min(cfg.prm.batch_size * longest, max(cfg.max_batch_tokens, longest))
            f = _forward_pass(shape, cfg, t, _critic_models(cfg)[1], 0.0, 2 if training_bf16(cfg.bf16) else 4)
            critic = _critic_weights(shape, cfg)
            if cfg.generation.backend == "vllm":  # the engine is shut down before the critic loads (prm_eval.py)
                if m.engine is not None and critic + f["activations"] + f["logits"] > m.engine:
                    m.engine, m.weights = 0.0, critic
                    m.activations, m.logits, m.kv_cache = f["activations"], f["logits"], 0.0
                m.notes.append("and, with the engine shut down, the critic (float32 weights) scoring batches of "
                               f"<= max_batch_tokens = {cfg.max_batch_tokens}")
            else:
                m.weights += critic  # beside the HF sampler's model
                # the HF sampler's cache and prefill logits are gone when the critic scores: the larger of the two
                if f["activations"] + f["logits"] > m.activations + m.logits + m.kv_cache:
                    m.activations, m.logits, m.kv_cache = f["activations"], f["logits"], 0.0
                m.notes.append(f"and the critic (float32 weights) scoring batches of <= max_batch_tokens = "
                               f"{cfg.max_batch_tokens} beside the sampler's model")
    elif kind == "advantages":
        m = StageMemory(stage, "forward")
        f = _forward_pass(shape, cfg, cfg.max_batch_tokens, _critic_models(cfg)[1],
                          cfg.max_batch_tokens if cfg.advantages.shared_prefix else 0.0,
                          2 if training_bf16(cfg.bf16) else 4)
        m.weights = _critic_weights(shape, cfg)
        m.activations, m.logits, m.kv_cache = f["activations"], f["logits"], f["kv_cache"]
        m.notes.append(f"the critic (float32 weights), batches of max_batch_tokens = {cfg.max_batch_tokens}")
    elif kind in TRAINERS:
        m = StageMemory(stage, "train")
        _training(shape, setup, kind, lengths, m)
    else:
        raise ValueError(f"no memory estimate for stage {stage!r}")
    if m.kind.startswith("sample") and cfg.generation.backend == "vllm" and setup.gpu_gb is None:
        m.peak = None  # vLLM's share of a GPU of unknown size
    else:
        m.peak = m.weights + m.gradients + m.optimizer + m.activations + m.logits + m.kv_cache + m.engine
        if m.forward_peak > m.peak:
            m.peak = m.forward_peak
            m.notes.append(f"its peak is its forward-only passes ({m.forward_peak / GiB:.1f} GB: the whole "
                           f"float32 model, batches of max_batch_tokens = {cfg.max_batch_tokens})")
    if kind == "bootstrap" and cfg.model is None:
        m.kind = "train (CPU)"  # not the GPU's memory: nothing to check
    elif setup.gpu_gb is not None and m.peak is not None:
        m.fits = m.refused is None and m.peak <= HEADROOM * setup.gpu_gb * GiB
    elif m.refused is not None:
        m.fits = False
    return m


Fix = tuple[str, dict]  # (the setting as the user writes it, its overrides for MemorySetup.changed)


def _halvings(cfg: RunConfig, key: str, least: int, accum: str | None = None, step: int = 1) -> list[Fix]:
    """`key` halved, again and again while it stays a multiple of `step` and at least `least`;
    with `accum`, that field doubled each time (the same optimizer batch)."""
    out, v, k = [], _get(cfg, key), 2
    while v % k == 0 and v // k >= least and (v // k) % step == 0:
        o = {key: v // k}
        if accum:
            o[accum] = _get(cfg, accum) * k
        out.append((" ".join(f"{kk}={vv}" for kk, vv in o.items()), o))
        k *= 2
    return out


def _fixes(stage: str, setup: MemorySetup, shape: ModelShape, lengths: dict) -> list:
    """The settings to try, in order of preference: functions of the setup they start from, each
    returning its candidates from mild to strong."""
    from stepdapo.precision import sampling_dtype

    cfg, N = setup.cfg, setup.processes
    kind = stage_kind(stage)
    groups = []
    if kind in TRAINERS:
        section, key, accum = TRAINERS[kind]
        log_ratio = kind == "critic" and cfg.critic.log_ratio_beta > 0
        lora = section is not None and _get(cfg, section).lora_r > 0
        if not cfg.gradient_checkpointing:
            groups.append(lambda s: [("gradient_checkpointing=true", {"gradient_checkpointing": True})])
        groups.append(lambda s: _halvings(cfg, key, N, accum, N))
        if N > 1 and not setup.fsdp and not log_ratio and not lora:
            groups.append(lambda s: [("--fsdp", {"fsdp": True})])
        if section is not None and not lora and not (kind == "bootstrap" and cfg.model is None):
            groups.append(lambda s: [(f"{section}.lora_r=16", {f"{section}.lora_r": 16})])
        if kind in FORWARD_PHASE:  # its forward-only passes
            groups.append(lambda s: _halvings(cfg, "max_batch_tokens", 64))
    elif kind == "advantages":
        groups += [lambda s: _halvings(cfg, "max_batch_tokens", 64), lambda s: _halvings(cfg, "logits_chunk_tokens", 1)]
    else:
        if kind == "prm-eval" or cfg.generation.backend != "vllm":
            groups.append(lambda s: _halvings(cfg, f"{SAMPLERS[kind]}.batch_size", 1))
        if cfg.generation.backend != "vllm" and sampling_dtype(cfg.generation.dtype) == "float32":
            groups.append(lambda s: [("generation.dtype=bfloat16", {"generation.dtype": "bfloat16"})])
        if cfg.generation.backend == "vllm":
            def utilization(s: MemorySetup) -> list[Fix]:
                """vLLM's share, lowered to what the rest of the stage (prm-eval's critic) leaves."""
                m = stage_memory(stage, s, shape, lengths)
                if m.peak is None:
                    return []
                gpu = s.gpu_gb * GiB
                u = math.floor(100 * (HEADROOM * gpu - (m.peak - m.engine)) / gpu) / 100
                if not 0 < u < s.cfg.generation.gpu_memory_utilization:
                    return []
                return [(f"generation.gpu_memory_utilization={u:.2f}", {"generation.gpu_memory_utilization": u})]
            groups.append(utilization)
    return groups


def find_fix(stage: str, setup: MemorySetup, shape: ModelShape, lengths: dict) -> tuple[str | None, float | None]:
    """The setting that brings a stage that does not fit under the limit, checked by recomputing
    the estimate with it: the first single fix (in `_fixes`' order) that does; else the fixes
    together, in that order, each group at its strongest before the next is added (a group that
    does not lower the peak is skipped), then each one dropped or made milder where the stage still
    fits; (None, None) if nothing does."""
    def fits(fixes: list[Fix]) -> StageMemory | None:
        s = setup
        for _, o in fixes:
            s = s.changed(**o)
        m = stage_memory(stage, s, shape, lengths)
        return m if m.fits else None

    groups = _fixes(stage, setup, shape, lengths)
    for group in groups:
        for fix in group(setup):
            if (m := fits([fix])) is not None:
                return fix[0], m.peak
    chosen: list[tuple[int, list[Fix], int]] = []  # (group, its candidates, the one taken)
    current, peak = setup, stage_memory(stage, setup, shape, lengths).peak
    for gi, group in enumerate(groups):
        cands = group(current)
        if not cands:
            continue
        tried = current.changed(**cands[-1][1])
        m = stage_memory(stage, tried, shape, lengths)
        if m.refused is not None or m.peak is None or m.peak >= peak:
            continue  # no help (or a combination the run refuses, e.g. LoRA under FSDP)
        chosen.append((gi, cands, len(cands) - 1))
        current, peak = tried, m.peak
        if m.fits:
            break
    else:
        return None, None

    def taken(ch) -> list[Fix]:
        return [cands[i] for _, cands, i in ch]

    for k in range(len(chosen) - 1, -1, -1):  # drop what is not needed, then take the mildest that fits
        if len(chosen) > 1 and fits(taken(chosen[:k] + chosen[k + 1:])) is not None:
            del chosen[k]
    for k, (gi, cands, _) in enumerate(chosen):
        for i in range(len(cands)):
            trial = chosen[:k] + [(gi, cands, i)] + chosen[k + 1:]
            if fits(taken(trial)) is not None:
                chosen[k] = (gi, cands, i)
                break
    m = fits(taken(chosen))
    return " ".join(label for label, _ in taken(chosen)), m.peak


LEFT_OUT = ("the CUDA context (~0.5-1 GB a process), the caching allocator's fragmentation, NCCL's buffers, "
            "vLLM's own overheads beyond its gpu_memory_utilization, the dataloader and tokenizer, Python objects")


def memory_plan(works: list[Work], setup: MemorySetup, shape: ModelShape, lengths: dict) -> dict:
    """Every stage's peak memory per GPU (GiB), whether it fits `setup.gpu_gb` x HEADROOM, and a fix
    for each that does not."""
    from stepdapo.precision import fast_bf16, sampling_dtype

    cfg = setup.cfg
    out = []
    for w in works:
        m = stage_memory(w.stage, setup, shape, lengths)
        if m.fits is False and setup.gpu_gb is not None:
            m.fix, m.fixed_peak = find_fix(w.stage, setup, shape, lengths)
        d = asdict(m)
        for k in ("weights", "gradients", "optimizer", "activations", "activations_no_ckpt", "activations_ckpt",
                  "logits", "kv_cache", "engine", "peak", "fixed_peak", "forward_peak"):
            if d[k] is not None:
                d[k] = round(d[k] / GiB, 3)
        out.append(d)
    bf16 = training_bf16(cfg.bf16)
    return {
        "shape": {f.name: getattr(shape, f.name) for f in fields(ModelShape) if f.name != "source"},
        "shape_source": shape.source,
        "parameters": shape.params(),
        "processes": setup.processes,
        "fsdp": setup.fsdp and setup.processes > 1,
        "gpu_memory_gb": setup.gpu_gb,
        "headroom": HEADROOM,
        "bf16": bf16,
        "bf16_why": "set in the config" if cfg.bf16 != "auto" else f"auto, on this machine: {fast_bf16()[1]}",
        "sampling_dtype": sampling_dtype(cfg.generation.dtype),
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "unit": "GiB (2^30 bytes)",
        "left_out": LEFT_OUT,
        "stages": out,
    }


def sync_warnings(works: list[Work], params: int | None, t: Throughput, processes: int) -> list[str]:
    """Stages where the forward-only work rank 0 does alone (the others waiting at a synchronisation
    point) would pass the sync timeout (STEPDAPO_SYNC_TIMEOUT_S, default 2 h), at the plan's
    throughputs (given, probed or --gpu-flops: the default table is a CPU's, which says nothing
    about a GPU run's waits)."""
    from stepdapo.runner import sync_timeout

    if processes < 2:
        return []
    timeout = sync_timeout()
    out = []
    for w in works:
        waits = RANK0_WAITS.get(stage_kind(w.stage))
        if not waits or not w.forward_tokens:
            continue
        if t.gpu_flops:
            if not params:
                continue
            seconds = 2 * params * w.forward_tokens / (t.gpu_flops / processes)
        else:
            seconds = w.forward_tokens / (t.forward_tok_s / processes)
        longest = seconds / waits
        if longest > timeout:
            ub = "<= " if w.upper_bound else ""
            out.append(f"{w.stage}: rank 0 alone runs {ub}~{duration(longest)} of forward-only passes at one "
                       f"synchronisation point while the other {processes - 1} processes wait, past the sync "
                       f"timeout ({duration(timeout)}, STEPDAPO_SYNC_TIMEOUT_S): set STEPDAPO_SYNC_TIMEOUT_S above it "
                       f"(every process's environment)")
    return out


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
    parts = [table, Text("\n".join(lines))]
    if plan.get("memory"):
        parts += format_memory(plan["memory"])
    return Group(*parts)


def gb(x: float | None) -> str:
    return "-" if not x else f"{x:.3g}"


def format_memory(mem: dict) -> list:
    """The memory table (GiB per GPU) and what it assumed, what does not fit and what fixes it."""
    from rich.table import Table
    from rich.text import Text

    gpu = mem["gpu_memory_gb"]
    n = mem["processes"]
    how = f"{n} processes, {'FSDP' if mem['fsdp'] else 'DDP'}" if n > 1 else "1 process"
    title = (f"memory per GPU (GB = GiB): {how}"
             + (f", {gpu:g} GB GPUs (fits: peak <= {mem['headroom']:g} x {gpu:g} GB)" if gpu else ""))
    table = Table(title=Text(title))
    ckpt = mem["gradient_checkpointing"]
    for col in ("stage", "weights", "grads", "optimizer", "activations", "act. " + ("no ckpt" if ckpt else "ckpt"),
                "logits", "KV cache", "vLLM", "peak") + (("fits",) if gpu else ()):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for m in mem["stages"]:
        other = m["activations_no_ckpt"] if ckpt else m["activations_ckpt"]
        peak = gb(m["peak"]) if m["peak"] is not None else "util x GPU"
        row = [m["stage"], gb(m["weights"]), gb(m["gradients"]), gb(m["optimizer"]), gb(m["activations"]),
               f"({gb(other)})" if other is not None else "", gb(m["logits"]), gb(m["kv_cache"]), gb(m["engine"]), peak]
        if gpu:
            row.append("cpu" if m["kind"] == "train (CPU)" else
                       "yes" if m["fits"] else "[bold red]NO" if m["fits"] is False else "?")
        table.add_row(*row)
    s = mem["shape"]
    lines = [f"memory: model shape from {mem['shape_source']}: hidden {s['hidden_size']}, intermediate "
             f"{s['intermediate_size']}, {s['num_layers']} layers, {s['num_heads']} heads ({s['num_kv_heads']} "
             f"key/value), vocabulary {s['vocab_size']:,}{', tied embeddings' if s['tied'] else ''}: "
             f"{mem['parameters']:,} parameters",
             f"memory: training bf16 autocast {'on' if mem['bf16'] else 'off'} ({mem['bf16_why']}), float32 master "
             f"weights, AdamW; sampling in {mem['sampling_dtype']}; forward-only passes: float32 weights at the "
             f"trainers' precision (prm-eval's critic too, after vLLM's engine is shut down); "
             f"gradient_checkpointing={'true' if ckpt else 'false'} (the act. column in parentheses: the other "
             f"setting)",
             f"memory: left out: {mem['left_out']}"]
    for m in mem["stages"]:
        if m["kind"] == "train (CPU)":
            lines.append(f"{m['stage']}: {'; '.join(m['notes'])}")
        if m["refused"]:
            lines.append(f"{m['stage']}: {m['refused']}")
        if m["fits"] is False and gpu:
            over = (f"peak {m['peak']:.1f} GB > {mem['headroom']:g} x {gpu:g} GB" if m["peak"] is not None
                    else "does not fit")
            fix = (f"fix: {m['fix']} -> {m['fixed_peak']:.1f} GB" if m["fix"] else
                   "no setting tried fits (gradient checkpointing, smaller micro-batches, --fsdp, LoRA): shorter "
                   "sequences (max_new_tokens), a bigger GPU or tensor parallelism")
            lines.append(f"DOES NOT FIT {m['stage']}: {over} ({'; '.join(m['notes'])}); {fix}")
    lines += [f"warning: {w}" for w in mem.get("sync_warnings", [])]
    return [table, Text("\n".join(lines))]
