"""A scripted policy for the arithmetic task (no model): every operation step goes wrong (+1) with
a known probability p, so the value of every state is known in closed form."""

from __future__ import annotations

import math
import random

from stepdapo.generation import Sample

from stepdapo.steps import delimiter_token_mask
from stepdapo.tasks.arithmetic import _STEP_RE


class ScriptedArithmeticPolicy:
    def __init__(self, task, tokenizer, p: float):
        self.task, self.tokenizer, self.p = task, tokenizer, p
        self.is_delim = delimiter_token_mask(tokenizer, "\n")
        self.by_question = {}

    def _problem(self, question):
        if question not in self.by_question:
            for split in ("train", "test"):
                for pr in self.task.problems(split):
                    self.by_question[pr.question] = pr
        return self.by_question[question]

    def value(self, state_text: str) -> float:
        """V(s) in closed form: 0 after an error, else (1-p)^(operation steps left)."""
        question, *done = [x for x in state_text.split("\n")]
        done = [x for x in done if x]
        problem = self._problem(question)
        chain = self.task.chain_of(problem)
        r = chain.first % self.task.cfg.modulus
        for line, (op, x) in zip(done, chain.ops):
            m = _STEP_RE.match(line)
            if int(m.group(4)) != self.task.apply(op, r, x):
                return 0.0
            r = int(m.group(4))
        return (1 - self.p) ** (len(chain.ops) - len(done))

    def _continue(self, state_text: str, rng: random.Random, one_step: bool):
        question, *done = state_text.split("\n")
        done = [x for x in done if x]
        chain = self.task.chain_of(self._problem(question))
        r = chain.first % self.task.cfg.modulus
        if done:
            r = int(_STEP_RE.match(done[-1]).group(4))
        lines, logps = [], []
        for op, x in chain.ops[len(done):]:
            y = self.task.apply(op, r, x)
            wrong = rng.random() < self.p
            logps.append(math.log(self.p if wrong else 1 - self.p))
            y = (y + 1) % self.task.cfg.modulus if wrong else y
            lines.append(f"{r}{op}{x}={y}\n")
            r = y
            if one_step:
                return lines, logps, False
        lines.append(f"A={r}")
        logps.append(0.0)
        return lines, logps, True

    def generate(self, prompts, n, params, desc=""):
        rng = random.Random(params.seed)
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            samples = []
            for _ in range(n):
                lines, logps, ended = self._continue(text, rng, params.stop == "step")
                token_ids, token_lps = [], []
                for line, lp in zip(lines, logps):
                    t = self.tokenizer(line, add_special_tokens=False)["input_ids"]
                    token_ids += t
                    token_lps += [0.0] * (len(t) - 1) + [lp]
                if ended:
                    token_ids.append(self.tokenizer.eos_token_id)
                    token_lps.append(0.0)
                samples.append(Sample(token_ids, "".join(lines), sum(token_lps),
                                      "eos" if ended else "step", token_lps))
            out.append(samples)
        return out


