"""The built-in task: a chain of integer operations mod M, solved one operation per line.

    prompt:    "3+5-2+7\n"
    solution:  "3+5=8\n8-2=6\n6+7=3\nA=3"

Each step copies the running value, the next operator and operand (written where it is used, so no
step needs memory of more than the previous line) and the result; the last line gives the answer.
Because results are taken mod M, one wrong step shifts every later running value by the same amount:
a single error always ends in a wrong answer, so a step's correctness and the final outcome agree.

Demonstrations for the bootstrap SFT are flawed on purpose (see ArithmeticConfig): a *systematic*
flaw (a spurious carry on "+" steps whose sum reaches `flaw_min_sum`, written with probability
`flaw_prob` > 0.5) makes the SFT model's most likely step wrong at identifiable states, which is what
step-level credit assignment should repair; rare random noise on other steps adds sampling errors.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from pydantic import Field, field_validator

from stepdapo.errors import ConfigError
from stepdapo.settings import Section, bounded_by
from stepdapo.tasks import Problem, Task, Verdict


class ArithmeticConfig(Section):
    """The built-in task: a chain of operations mod `modulus`, one operation per line."""

    n_ops_min: int = Field(3, ge=1, le=1000)
    """fewest operations in a problem."""
    n_ops_max: int = Field(4, ge=1, le=1000)
    """most operations in a problem (>= n_ops_min)."""
    max_operand: int = Field(9, ge=0, le=10**9)
    """operands are drawn uniformly from 0..max_operand."""
    modulus: int = Field(10, ge=2, le=10**9)
    """all results are taken mod this number (10 keeps every number one digit)."""
    operators: str = Field("+-", pattern=r"^[+\-*]+$")
    """the operators to draw from: a string of characters among "+-*"."""
    flaw_prob: float = Field(0.6, ge=0, le=1)
    """probability that a demonstration gets a *flaw-case* step wrong. A flaw case is a "+" step whose
    running value plus operand is at least `flaw_min_sum`; the demonstration then writes the result
    plus one (a spurious carry). Above 0.5 this makes the SFT model's most likely step wrong exactly
    there, which greedy decoding shows."""
    flaw_min_sum: int = Field(12, ge=0, le=10**9)
    """the smallest running value + operand that makes a "+" step a flaw case."""
    noise_prob: float = Field(0.02, ge=0, le=1)
    """probability of a random +-1 error on any other step of a demonstration."""
    n_train: int = Field(2000, ge=1, le=10**8)
    """number of training problems."""
    n_test: int = Field(1000, ge=1, le=10**8)
    """number of test problems."""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """share of the problem space reserved for the test split (by a hash of the problem text, so
    train and test never overlap whatever the seed or sizes)."""
    n_demos: int = Field(60000, ge=1, le=10**9)
    """number of flawed demonstrations generated for the bootstrap SFT."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """seed of the problem and demonstration generators."""

    _max_at_least_min = field_validator("n_ops_max")(bounded_by("n_ops_min", at_most=False))

_STEP_RE = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)$")
_ANSWER_RE = re.compile(r"^A=(\d+)$")


@dataclass(frozen=True)
class Chain:
    """A parsed problem: the first operand, then (operator, operand) pairs."""

    first: int
    ops: tuple[tuple[str, int], ...]


def _hash01(text: str) -> float:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2**64


class ArithmeticTask(Task):
    name = "arithmetic"
    step_delimiter = "\n"
    supports_step_checks = True

    def __init__(self, cfg: ArithmeticConfig | None = None):
        self.cfg = cfg or ArithmeticConfig()
        self.n_demonstrations = self.cfg.n_demos
        self._cache: dict[str, list[Problem]] = {}

    # -- problems ------------------------------------------------------------------------------
    def _space_size(self) -> int:
        c = self.cfg
        return sum((c.max_operand + 1) ** (n + 1) * len(c.operators) ** n
                   for n in range(c.n_ops_min, c.n_ops_max + 1))

    def _split_of(self, question: str) -> str:
        return "test" if _hash01(question) < self.cfg.test_fraction else "train"

    def _random_chain(self, rng: random.Random) -> Chain:
        c = self.cfg
        n = rng.randint(c.n_ops_min, c.n_ops_max)
        return Chain(rng.randint(0, c.max_operand),
                     tuple((rng.choice(c.operators), rng.randint(0, c.max_operand)) for _ in range(n)))

    def _make_problem(self, chain: Chain) -> Problem:
        q = self.question_text(chain)
        values = self.running_values(chain)
        return Problem(id="arith-" + hashlib.sha1(q.encode()).hexdigest()[:12], question=q,
                       answer=str(values[-1]), meta={"first": chain.first, "ops": list(chain.ops)})

    def problems(self, split: str) -> list[Problem]:
        """`n_train` / `n_test` distinct problems, deterministic from `seed`; the splits are disjoint
        because a problem's split is decided by a hash of its text."""
        if split not in ("train", "test"):
            raise ConfigError(f"arithmetic task: unknown split {split!r} (use 'train' or 'test')")
        if split in self._cache:
            return self._cache[split]
        c = self.cfg
        want = c.n_train if split == "train" else c.n_test
        share = c.test_fraction if split == "test" else 1 - c.test_fraction
        if want > 0.5 * share * self._space_size():
            raise ConfigError(
                f"arithmetic task: {want} distinct {split} problems requested but only about "
                f"{int(share * self._space_size())} exist with these settings; lower "
                f"task.arithmetic.n_{split} or widen the problem space")
        # Each split has its own stream so that changing n_test never changes the train problems.
        rng = random.Random(f"{c.seed}-{split}")
        seen: set[str] = set()
        out: list[Problem] = []
        while len(out) < want:
            chain = self._random_chain(rng)
            q = self.question_text(chain)
            if q in seen or self._split_of(q) != split:
                continue
            seen.add(q)
            out.append(self._make_problem(chain))
        self._cache[split] = out
        return out

    # -- text ----------------------------------------------------------------------------------
    @staticmethod
    def question_text(chain: Chain) -> str:
        return str(chain.first) + "".join(f"{op}{x}" for op, x in chain.ops)

    @staticmethod
    def chain_of(problem: Problem) -> Chain:
        return Chain(problem.meta["first"], tuple((op, x) for op, x in problem.meta["ops"]))

    def processbench_rows(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """For each of the first `n` problems of `split`: its correct worked solution (label -1) or,
        for every other problem, one with a single wrong step at a random position (the steps after
        it carry on from the written value, as a model's would; label = that step)."""
        rng = random.Random(seed)
        rows = []
        for k, problem in enumerate(self.problems(split)[:n]):
            n_ops = len(self.chain_of(problem).ops)
            label = -1 if k % 2 == 0 else rng.randrange(n_ops)
            text = self.demonstration(problem, errors={} if label == -1 else {label: rng.randrange(1, self.cfg.modulus)})
            lines = text.split(self.step_delimiter)
            rows.append({"id": f"{split}/{problem.id}", "problem": problem.question, "label": label,
                         "steps": [s + self.step_delimiter for s in lines[:-1]] + [lines[-1]],
                         "final_answer_correct": self.verify(problem, text).correct})
        return rows

    def reference_solution(self, problem: Problem) -> str:
        return self.demonstration(problem)  # the correct worked solution

    def prompt(self, problem: Problem, tokenizer=None) -> str:
        # The tiny model has no chat template: the prompt is the question and a newline.
        return problem.question + "\n"

    def apply(self, op: str, a: int, b: int) -> int:
        m = self.cfg.modulus
        return (a + b) % m if op == "+" else (a - b) % m if op == "-" else (a * b) % m

    def running_values(self, chain: Chain) -> list[int]:
        vals = [chain.first % self.cfg.modulus]
        for op, x in chain.ops:
            vals.append(self.apply(op, vals[-1], x))
        return vals

    def is_flaw_case(self, op: str, running: int, operand: int) -> bool:
        return op == "+" and running + operand >= self.cfg.flaw_min_sum

    def demonstration(self, problem: Problem, rng: random.Random | None = None,
                      errors: dict[int, int] | None = None) -> str:
        """A worked solution. With `rng`, the configured flaw and noise are applied; `errors` maps a
        step index to a delta added to that step's written result (for tests). An error carries on:
        later steps start from the written, wrong value."""
        c = self.cfg
        chain = self.chain_of(problem)
        r = chain.first % c.modulus
        lines = []
        for i, (op, x) in enumerate(chain.ops):
            y = self.apply(op, r, x)
            if rng is not None:
                if self.is_flaw_case(op, r, x):
                    if rng.random() < c.flaw_prob:
                        y = (y + 1) % c.modulus
                elif rng.random() < c.noise_prob:
                    y = (y + rng.choice((-1, 1))) % c.modulus
            if errors and i in errors:
                y = (y + errors[i]) % c.modulus
            lines.append(f"{r}{op}{x}={y}")
            r = y
        lines.append(f"A={r}")
        return "\n".join(lines)

    def demonstrations(self, n: int | None = None, seed: int | str | None = None,
                       exclude: set[str] = frozenset()) -> list[tuple[Problem, str]]:
        """Flawed SFT data on training-split problems (drawn with repetition, each with fresh flaws),
        none of whose question is in `exclude`; another `seed` draws another set from the task's seed."""
        c = self.cfg
        n = c.n_demos if n is None else n
        rng = random.Random(f"{c.seed}-demos" if seed is None else f"{c.seed}-{seed}-demos")
        out = []
        while len(out) < n:
            chain = self._random_chain(rng)
            q = self.question_text(chain)
            if q in exclude or self._split_of(q) != "train":
                continue
            p = self._make_problem(chain)
            out.append((p, self.demonstration(p, rng)))
        return out

    def sft_check_problems(self, n: int) -> list[Problem]:
        """`n` distinct training-split problems for judging the bootstrap SFT model, from their own
        stream (the bootstrap keeps them out of its demonstrations)."""
        rng = random.Random(f"{self.cfg.seed}-sft-check")
        seen: dict[str, Problem] = {}
        for _ in range(1000 * n):
            if len(seen) >= n:
                break
            chain = self._random_chain(rng)
            q = self.question_text(chain)
            if q not in seen and self._split_of(q) == "train":
                seen[q] = self._make_problem(chain)
        return list(seen.values())

    # -- verification --------------------------------------------------------------------------
    def verify(self, problem: Problem, completion: str) -> Verdict:
        answer = None
        for line in reversed(completion.strip().split("\n")):
            m = _ANSWER_RE.match(line.strip())
            if m:
                answer = m.group(1)
                break
        if answer is None:
            return Verdict(False, None, "no answer line")
        if int(answer) == int(problem.answer):
            return Verdict(True, answer, "correct")
        return Verdict(False, answer, f"wrong answer {answer} (expected {problem.answer})")

    def step_is_correct(self, problem: Problem, prefix: str, step: str) -> bool:
        """Is `step` (one line, delimiter optional) the right next step after the solution text
        `prefix`, judged from what `prefix` wrote (so it can be right after an earlier error)?"""
        chain = self.chain_of(problem)
        done = [line for line in prefix.split("\n") if line]
        r = chain.first % self.cfg.modulus
        if done:
            m = _STEP_RE.match(done[-1])
            if not m:
                return False
            r = int(m.group(4)) % self.cfg.modulus
        line = step.rstrip("\n")
        i = len(done)
        if i < len(chain.ops):
            op, x = chain.ops[i]
            return line == f"{r}{op}{x}={self.apply(op, r, x)}"
        return i == len(chain.ops) and line == f"A={r}"

    def analyze(self, problem: Problem, completion: str) -> dict[str, int]:
        """Step-level diagnostics of one completion: how many steps were right, split into flaw
        cases and the rest. A step is judged given the line before it (is this step's arithmetic and
        copying right?), so one early error does not make later steps count as wrong."""
        chain = self.chain_of(problem)
        lines = completion.split("\n")
        stats = {"steps": 0, "steps_correct": 0, "flaw_steps": 0, "flaw_steps_correct": 0,
                 "well_formed": 0}
        r = chain.first % self.cfg.modulus
        well_formed = len(lines) == len(chain.ops) + 1 and bool(_ANSWER_RE.match(lines[-1]))
        for i, (op, x) in enumerate(chain.ops):
            line = lines[i] if i < len(lines) else ""
            m = _STEP_RE.match(line)
            flaw = self.is_flaw_case(op, r, x)
            ok = bool(m) and (int(m.group(1)), m.group(2), int(m.group(3))) == (r, op, x) \
                and int(m.group(4)) == self.apply(op, r, x)
            well_formed = well_formed and bool(m)
            stats["steps"] += 1
            stats["steps_correct"] += ok
            stats["flaw_steps"] += flaw
            stats["flaw_steps_correct"] += flaw and ok
            # Judge the next step from what was written, as the model sees it.
            r = int(m.group(4)) % self.cfg.modulus if m else self.apply(op, r, x)
        stats["well_formed"] = int(well_formed)
        return stats
