"""`stepdapo critic` (stage 3): the value model V(s) = sigmoid(logit).

The critic is initialised from the policy (or from the previous iteration's critic) and trained
with `critic_loss` (BCE against the soft MC targets) by a `transformers.Trainer`. Its logit is a
value head on the last token plus, with `critic.log_ratio_beta` > 0 (the default), beta times the
log-ratio of the solution so far between the critic's own language model and the frozen policy it
started from (`stepdapo.models.LogRatioCritic`: saved as that language model, the head and a note
of where the reference is; `load_critic` reloads it). With `log_ratio_beta: 0` it is the paper's
critic, an `AutoModelForSequenceClassification(num_labels=1)` saved as a standard HF artifact.
Training examples are the labelled states and, with `action_states`, the action-extended states
s+a where the advantage stage queries the critic: their label pools the outcomes of the rollouts that
began with a (and the rollouts from s+a itself when it is also a state), all unbiased samples of
V^{pi_ref}(s+a); with `rollout_prefixes`, every step boundary of every rollout likewise
(`stepdapo.algorithms.value_examples`). With `shared_prefix`, batches are made state by state and each
state is computed once for all its examples (stepdapo.models.critic_logits).

Quality is measured on states of held-out problems, each metric next to the constant predictor
(the training mean): BCE, Brier score, expected calibration error with a reliability plot, AUC for
telling MC = 0 states from MC > 0 ones, and, where the task can judge single steps, how often the
critic scores a right next step above a wrong one at the same state.

Every process of a data-parallel run trains (the Trainer's DDP / FSDP / DeepSpeed; the log-ratio
critic: DDP only, for now); rank 0 alone
evaluates the saved critic and draws the plot. The Trainer checkpoints 4 times (the last one kept),
so a killed critic resumes from its last checkpoint; the summary says from which step.

Logged training metrics (to the trackers in `report_to`, which show them as `train/<name>`):
  loss           `critic_loss` (BCE against the pooled MC targets), the mean since the previous log;
  grad_norm      the gradient norm before clipping, of the logged step;
  learning_rate  the scheduled learning rate of the logged step.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from stepdapo.algorithms import TokenValueExample, ValueExample, token_value_examples, value_examples
from stepdapo.config import CriticConfig, RunConfig, to_dict
from stepdapo.errors import StageInputError
from stepdapo.steps import delimiter_token_mask, split_steps
from stepdapo.losses import critic_loss
from stepdapo.metrics import cross_fitted_calibration, grouped_bootstrap_interval, quality
from stepdapo.models import (
    LogRatioCritic,
    check_critic as check_critic_dir,
    critic_logits,
    critic_token_logits,
    critic_values,
    load_critic,
    model_fingerprint,
)
from stepdapo.logprobs import LOGITS_CHUNK, MAX_BATCH_TOKENS
from stepdapo.precision import autocast, training_bf16
from stepdapo.runner import ModelStage, on_main, stage_fingerprint
from stepdapo.report import plot_reliability
from stepdapo.stages.labels import read_labels
from stepdapo.training import check_lora_supported, fit, release_memory, resume_step, train_steps, training_args


def heldout(problem_id: str, fraction: float) -> bool:
    return int(hashlib.sha1(problem_id.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def critic_examples(labels, c: CriticConfig, is_delim, seed: int
                    ) -> tuple[list[ValueExample] | list[TokenValueExample], list[ValueExample], list[ValueExample]]:
    """(train, held, train_states): the examples of the training problems (pooled step-level ones,
    or with `c.token_targets` one per rollout with a target at every token; at most
    `c.max_examples`, a seeded sample), the labelled states of the held-out problems and those of
    the training problems."""
    cols = labels.select(["problem_id", "ids", "n_correct", "outcome", "action_ids", "action_terminal",
                          "rollout_ids", "mc"]).to_pydict()
    for i, outs in enumerate(cols["outcome"]):  # imported labels (stepdapo.prm_data) have no rollouts:
        if not outs:                            # the state's label `mc` is its target, as one rollout's
            cols["n_correct"][i], cols["outcome"][i] = cols["mc"][i], [None]
    examples = value_examples(cols["problem_id"], cols["ids"], cols["n_correct"], cols["outcome"],
                              cols["action_ids"], cols["action_terminal"], cols["rollout_ids"],
                              step_ends=lambda ids: split_steps(ids, is_delim),
                              action_states=c.action_states and not c.token_targets,
                              rollout_prefixes=c.rollout_prefixes and not c.token_targets)
    held, train_states = [], []
    for e in examples:
        if e.is_state:
            (held if heldout(e.problem_id, c.heldout_fraction) else train_states).append(e)
    if c.token_targets:
        examples = token_value_examples(cols["problem_id"], cols["ids"], cols["n_correct"], cols["outcome"],
                                        cols["rollout_ids"])
    train = [e for e in examples if not heldout(e.problem_id, c.heldout_fraction)]
    if c.max_examples is not None and len(train) > c.max_examples:
        keep = np.random.default_rng(seed).choice(len(train), c.max_examples, replace=False)
        train = [train[i] for i in sorted(keep)]
    return train, held, train_states


def prompt_lengths(labels) -> dict[str, int]:
    """Each problem's prompt length in tokens (every sequence of a problem starts with its prompt):
    where the log-ratio critic's sum over the solution starts."""
    return dict(zip(labels.column("problem_id").to_pylist(), labels.column("prompt_len").to_pylist()))


class _ValueCollator:
    def __init__(self, shared_prefix: bool, prompt_len: dict[str, int] | None = None):
        self.shared_prefix, self.prompt_len = shared_prefix, prompt_len

    def __call__(self, examples: list[ValueExample] | list[TokenValueExample]) -> dict:
        prompt_lens = None if self.prompt_len is None else [self.prompt_len[e.problem_id] for e in examples]
        if isinstance(examples[0], TokenValueExample):  # targets [B, T], NaN where there is none
            T = max(len(e.input_ids) for e in examples)
            targets = torch.full((len(examples), T), float("nan"))
            for i, e in enumerate(examples):
                targets[i, e.start:e.start + len(e.targets)] = torch.tensor(e.targets)
            return {"sequences": [list(e.input_ids) for e in examples], "prefix_lens": None, "targets": targets,
                    "prompt_lens": prompt_lens}
        return {"sequences": [list(e.input_ids) for e in examples], "prompt_lens": prompt_lens,
                # a state shares all but its last token with its s + a and rollout prefixes: the
                # head reads each example's own last token, which must lie after the shared part
                "prefix_lens": [e.state_len - 1 for e in examples] if self.shared_prefix else None,
                "targets": torch.tensor([e.target for e in examples], dtype=torch.float)}


class _StateGroupedSampler(torch.utils.data.Sampler):
    """The examples state by state: the states in a seeded random order each epoch, each state's
    examples shuffled and consecutive, so a batch holds few states and computes each once."""

    def __init__(self, examples: list[ValueExample], seed: int):
        groups: dict[tuple, list[int]] = {}
        for i, e in enumerate(examples):
            groups.setdefault(e.input_ids[:e.state_len], []).append(i)
        self.groups, self.seed, self.epoch = list(groups.values()), seed, 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls it at every epoch (and on resume)
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        for g in rng.permutation(len(self.groups)):
            yield from (int(i) for i in rng.permutation(self.groups[g]))


class CriticTrainer(Trainer):
    """A Trainer whose loss is `critic_loss` on the critic's logit; with `shared_prefix`, batches of
    whole states, each state computed once. A LogRatioCritic's checkpoints hold its trained weights
    (pi_theta and the head, not the frozen pi_ref) in one file."""

    CHECKPOINT = "log_ratio_critic.pt"

    def __init__(self, *args, pad_id: int, shared_prefix: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad_id, self.shared_prefix = pad_id, shared_prefix

    def _get_train_sampler(self, *args, **kwargs):
        if not self.shared_prefix:
            return super()._get_train_sampler(*args, **kwargs)
        return _StateGroupedSampler(self.train_dataset, self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = inputs["targets"]
        if targets.dim() == 2:  # token targets: the mean over every target of the batch
            logits = critic_token_logits(model, inputs["sequences"], self.pad_id, inputs["prompt_lens"])
            targets = targets.to(logits.device)
            keep = ~torch.isnan(targets)
            logits, targets = logits[keep], targets[keep]
        else:
            logits = critic_logits(model, inputs["sequences"], self.pad_id, inputs["prefix_lens"], inputs["prompt_lens"])
        loss = critic_loss(logits, targets.to(logits.device))
        return (loss, logits) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not isinstance(self.model, LogRatioCritic):
            return super()._save(output_dir, state_dict)
        if self.args.should_save:  # torch.save keeps tied weights tied (safetensors refuses them)
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            trained = {k: v for k, v in self.model.state_dict().items() if not k.startswith("reference.")}
            torch.save(trained, Path(output_dir) / self.CHECKPOINT)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not isinstance(self.model, LogRatioCritic):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        state = torch.load(Path(resume_from_checkpoint) / self.CHECKPOINT, map_location="cpu", weights_only=True)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("reference.") for k in missing):
            raise StageInputError(f"{resume_from_checkpoint}: not a checkpoint of this critic "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def check_log_ratio_supported(trainer: Trainer) -> None:
    """The log-ratio critic holds two models in one module: not sharded by FSDP / DeepSpeed yet."""
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        raise StageInputError("the log-ratio critic (critic.log_ratio_beta > 0) with FSDP or DeepSpeed is not "
                              "supported yet: use data parallel (DDP), or critic.log_ratio_beta=0")


def new_critic(init: str | Path, pad_id: int, c: CriticConfig, initial_value: float, continuing: bool):
    """The critic to train: from a policy, a new one (the paper's initialisation: the policy plus a
    value head); from a critic the critic stage saved, that critic, to continue. LoRA adapters on the
    backbone with `c.lora_r`."""
    from peft import LoraConfig, get_peft_model

    if continuing and LogRatioCritic.saved_in(init) != (c.log_ratio_beta > 0):
        raise StageInputError(f"{init}: a critic {'with' if LogRatioCritic.saved_in(init) else 'without'} the log-ratio "
                              f"term cannot be continued with critic.log_ratio_beta={c.log_ratio_beta}: set it back "
                              f"or start from the policy (critic.init=policy)")
    lora = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules="all-linear")
    if c.log_ratio_beta > 0:
        model = LogRatioCritic.from_pretrained(init) if continuing else \
            LogRatioCritic.start(init, c.log_ratio_beta, initial_value)
        if model.beta != c.log_ratio_beta:  # another beta would rescale what the critic learnt
            raise StageInputError(f"{init}: a critic trained with critic.log_ratio_beta={model.beta} cannot be "
                                  f"continued with {c.log_ratio_beta}: set it back or start from the policy "
                                  f"(critic.init=policy)")
        if c.lora_r > 0:  # on pi_theta; the head is a plain module, fully trained
            lora.task_type = "CAUSAL_LM"
            model.policy = get_peft_model(model.policy, lora)
        return model
    model = AutoModelForSequenceClassification.from_pretrained(init, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = pad_id
    model.config.id2label, model.config.label2id = {0: "value_logit"}, {"value_logit": 0}
    if c.lora_r > 0:  # SEQ_CLS keeps the new value head ("score") fully trainable
        lora.task_type = "SEQ_CLS"
        model = get_peft_model(model, lora)
    return model


def train_critic(init: str | Path, train: list[ValueExample] | list[TokenValueExample], tok, c: CriticConfig,
                 args: TrainingArguments, prompt_len: dict[str, int], model_dir: Path, published: Path,
                 continuing: bool = False, resume: str | None = None, logits_chunk: int = LOGITS_CHUNK):
    """The critic (`new_critic`) trained on `train` (continuing from the Trainer checkpoint
    `resume`) and saved to `model_dir` (to be published as `published`); returns (the Trainer, its
    TrainOutput)."""
    pad_id = tok.pad_token_id
    torch.manual_seed(args.seed)  # the new value head's initialisation, whatever ran before in the process
    targets = [t for e in train for t in ((e.target,) if isinstance(e, ValueExample) else e.targets)]
    model = new_critic(init, pad_id, c, float(np.mean(targets)), continuing)
    if isinstance(model, LogRatioCritic):
        model.logits_chunk = logits_chunk
    # token targets: one example per rollout, no state shared between examples to group by
    shared = c.shared_prefix and not c.token_targets
    trainer = CriticTrainer(model=model, args=args, train_dataset=train, data_collator=_ValueCollator(shared, prompt_len),
                            pad_id=pad_id, shared_prefix=shared)
    check_lora_supported(trainer, c.lora_r > 0)
    if c.log_ratio_beta > 0:
        check_log_ratio_supported(trainer)
    result = fit(trainer, tok, model_dir, args.report_to, resume, published=published)
    return trainer, result


def step_ranking(model, tok, labels, task, problems: dict, examples_held: set,
                 max_batch_tokens: int = MAX_BATCH_TOKENS) -> dict | None:
    """At held-out states with both a right and a wrong non-terminal next step among the sampled
    actions (as the task judges single steps): how often V(s+right) > V(s+wrong) (ties: 1/2)."""
    if not task.supports_step_checks:
        return None
    pairs_right, pairs_wrong, prompt_lens, pair_problem = [], [], [], []
    cols = {n: labels.column(n).to_pylist() for n in
            ("problem_id", "ids", "prompt_len", "action_ids", "action_terminal", "action_text")}
    for pid, ids, plen, acts, terms, texts in zip(*cols.values()):
        if pid not in examples_held:
            continue
        prefix = tok.decode(ids[plen:], skip_special_tokens=True)
        right, wrong = {}, {}
        for a, term, text in zip(acts, terms, texts):
            if term:
                continue
            (right if task.step_is_correct(problems[pid], prefix, text) else wrong)[tuple(a)] = ids + a
        for r in right.values():
            for w in wrong.values():
                pairs_right.append(r)
                pairs_wrong.append(w)
                prompt_lens.append(plen)
                pair_problem.append(pid)
    if not pairs_right:
        return {"pairs": 0, "right_above_wrong": None}
    v = critic_values(model, pairs_right + pairs_wrong, tok.pad_token_id, prompt_lens=prompt_lens * 2,
                      max_batch_tokens=max_batch_tokens)
    vr, vw = np.array(v[:len(pairs_right)]), np.array(v[len(pairs_right):])
    score = (vr > vw) + 0.5 * (vr == vw)
    return {"pairs": len(pairs_right), "problems": len(set(pair_problem)),
            "right_above_wrong": float(score.mean()),
            "right_above_wrong_ci95": list(grouped_bootstrap_interval(score, np.ones(len(score)), pair_problem)),
            "mean_gap": float((vr - vw).mean())}


PROCESSBENCH_ROWS = 500  # test problems whose earliest wrong step is known (Task.processbench_rows): ~2 s


def processbench_quality(model, tok, task) -> dict | None:
    """The critic as a process reward model, where the task makes solutions whose earliest wrong
    step is known (Task.processbench_rows): ProcessBench's scores (stepdapo.prm; the threshold
    chosen on half of the rows, scored on the other half); None for other tasks."""
    from stepdapo.prm import evaluate_critic_processbench, processbench_items

    rows = task.processbench_rows("test", PROCESSBENCH_ROWS)
    return evaluate_critic_processbench(model, tok, processbench_items(rows), task, batch_size=64) if rows else None


def evaluate_critic(model, tok, train_states: list[ValueExample], held: list[ValueExample], labels, task,
                    calibrate: bool = False, max_batch_tokens: int = MAX_BATCH_TOKENS) -> dict:
    """The critic's quality on the held-out states and on (up to 2000) training states, each metric
    next to the constant prediction of the training states' mean target; with `calibrate`, the
    Platt map fitted on the held-out states and (`heldout_calibrated`) the quality of its
    cross-fitted values."""
    baseline = float(np.mean([e.target for e in train_states]))
    prompt_len = prompt_lengths(labels)

    def values(examples: list[ValueExample]) -> list[float]:
        return critic_values(model, [e.input_ids for e in examples], tok.pad_token_id,
                             prompt_lens=[prompt_len[e.problem_id] for e in examples], max_batch_tokens=max_batch_tokens)
    pred, target, groups = values(held), [e.target for e in held], [e.problem_id for e in held]
    q = quality(pred, target, baseline, groups=groups)
    problems = {p.id: p for p in task.problems("train")}
    q["step_ranking"] = step_ranking(model, tok, labels, task, problems, {e.problem_id for e in held}, max_batch_tokens)
    tr_sample = train_states[:2000]
    q_train = quality(values(tr_sample), [e.target for e in tr_sample], baseline)
    out = {"constant_prediction": baseline, "heldout": q,
           "train_subset": {k: v for k, v in q_train.items() if k != "calibration"}}
    if calibrate:
        oof, ab = cross_fitted_calibration(pred, target, groups)
        if ab is not None:  # an increasing map: the sibling ranking is the raw critic's
            out["calibration"] = {"a": ab[0], "b": ab[1], "states": len(target)}
            out["heldout_calibrated"] = {**quality(oof, target, baseline, groups=groups),
                                         "step_ranking": q["step_ranking"]}
    return out


RANKING_MIN_PAIRS = 20  # fewer held-out sibling pairs than this say too little to fail a critic on


def check_critic(heldout: dict, min_gain: float, min_ranking: float = 0.0) -> str | None:
    """None when the critic's values beat the constant prediction on held-out states with 95%
    confidence (the lower end of the interval, over problems, of its Brier-score gain above
    `min_gain`) and, where the task judges single steps and the held-out states have >=
    RANKING_MIN_PAIRS sibling pairs (a right and a wrong next step), the lower end of the interval
    of how often it ranks the right one above the wrong one is above `min_ranking` (or when there
    were no held-out states to tell); otherwise what is wrong, in words.

    Why the Brier score: an advantage is a difference of values, so an error in V enters it
    linearly, and the squared error is the loss that measures that; BCE is unbounded, and a few
    states valued confidently wrong outweigh hundreds right (a critic that ranked right > wrong in
    0.80 of 343 held-out pairs had a Brier score better than the constant's and a BCE worse).
    Both checks matter: a critic can beat the constant by learning how far along a solution is
    while not telling siblings apart. A summary from before the intervals is judged on its point
    estimates."""
    if heldout.get("bce") is None:
        return None
    gain = heldout.get("brier_gain", heldout["brier_constant"] - heldout["brier"])
    lo = (heldout.get("brier_gain_ci95") or [gain])[0]
    if lo <= min_gain:
        auc_ = heldout.get("auc_mc0_vs_positive")
        return (f"the critic is not shown to beat a constant: held-out Brier score {heldout['brier']:.4f} against the "
                f"constant prediction's {heldout['brier_constant']:.4f}, a gain of {gain:.4f} whose 95% interval over "
                f"{heldout['n']} states starts at {lo:.4f} (must be above {min_gain}; BCE {heldout['bce']:.3f} against "
                f"{heldout['bce_constant']:.3f}, AUC {'–' if auc_ is None else f'{auc_:.2f}'}), so its advantages "
                f"would be noise")
    rank = heldout.get("step_ranking") or {}
    if rank.get("right_above_wrong") is not None and rank["pairs"] >= RANKING_MIN_PAIRS:
        r_lo = (rank.get("right_above_wrong_ci95") or [rank["right_above_wrong"]])[0]
        if r_lo <= min_ranking:
            return (f"the critic is not shown to tell a right next step from a wrong one: it ranks the right one "
                    f"above in {rank['right_above_wrong']:.2f} of {rank['pairs']} held-out sibling pairs, 95% "
                    f"interval from {r_lo:.2f} (must be above {min_ranking}; its Brier score {heldout['brier']:.4f} "
                    f"against the constant's {heldout['brier_constant']:.4f} comes from other features), so its "
                    f"advantages would be noise")
    return None


# -- the stage ------------------------------------------------------------------------------------

def fingerprint(cfg: RunConfig, init: str | Path, labels_dir: str | Path) -> dict:
    # the checks and the fallback judge a trained critic and do not change it: changing them must
    # not throw away a finished critic
    trained_by = {k: v for k, v in to_dict(cfg.critic).items()
                  if k not in ("min_brier_gain", "min_step_ranking", "fallback", "recovery_epochs")}
    return {"init": model_fingerprint(init), "labels": stage_fingerprint(labels_dir, "labels"),
            "critic": trained_by, "seed": cfg.seed}


def run_critic(cfg: RunConfig, init: str | Path, labels_dir: str | Path, out_dir: str | Path, task,
               progress: bool = True) -> dict:
    """Train the critic from `init` (a policy or a previous critic) on the labels; save to `out_dir`
    (skipped when done; a killed run resumes from its last checkpoint). Every process of a
    data-parallel run calls this; rank 0 alone evaluates the saved critic."""
    stage = ModelStage(out_dir, "critic", fingerprint(cfg, init, labels_dir))
    if (done := stage.done()) is not None:  # before reading the labels
        return done
    init_dir = check_critic_dir(init)  # a policy or a critic; a broken one is an error before the stage starts
    t0 = time.perf_counter()
    c = cfg.critic
    labels = read_labels(labels_dir)
    tok = AutoTokenizer.from_pretrained(init_dir)
    train, held, train_states = critic_examples(labels, c, delimiter_token_mask(tok, task.step_delimiter), cfg.seed)
    if not train:
        raise StageInputError(f"{labels_dir}: no training states for the critic")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def work() -> dict:
        resume = stage.last_checkpoint()
        # 4 checkpoints, the last one kept: a killed critic resumes from it
        continuing = (Path(init) / stage.summary_name).is_file()  # init is a critic this stage saved
        epochs = c.training_epochs(continuing)
        args = training_args(stage.checkpoints, steps=train_steps(len(train), c.batch_size, epochs, c.grad_accum),
                             batch_size=c.batch_size, batch_key="critic.batch_size", grad_accum=c.grad_accum, lr=c.lr,
                             lr_scheduler=c.lr_scheduler, warmup_ratio=c.warmup_ratio, weight_decay=c.weight_decay,
                             logs=10, checkpoints=4, bf16=training_bf16(cfg.bf16), seed=cfg.seed,
                             report_to=cfg.report_to, gradient_checkpointing=cfg.gradient_checkpointing,
                             progress=progress, run_name=str(stage.dir))
        trainer, result = train_critic(init, train, tok, c, args, prompt_lengths(labels), stage.model_dir, stage.dir,
                                       continuing, resume, cfg.logits_chunk_tokens)
        global_step, processes, dev = trainer.state.global_step, trainer.args.world_size, trainer.args.device
        del trainer
        release_memory()
        train_seconds = time.perf_counter() - t0

        def evaluate() -> dict:  # on the saved critic: what is published, however training was sharded
            model = load_critic(stage.model_dir)[0].to(dev)
            if isinstance(model, LogRatioCritic):
                model.logits_chunk = cfg.logits_chunk_tokens
            with autocast(training_bf16(cfg.bf16), dev):  # at the precision the advantages will score with
                metrics = evaluate_critic(model, tok, train_states, held, labels, task, calibrate=c.calibrate,
                                          max_batch_tokens=cfg.max_batch_tokens)
                metrics["processbench"] = processbench_quality(model, tok, task)
            plot_reliability(metrics["heldout"], stage.model_dir / "reliability.png", "critic on held-out states")
            return metrics

        metrics = on_main(evaluate)
        return {
            "init": str(init),
            "train_examples": len(train),
            "train_states": len(train_states),
            "heldout_states": len(held),
            "constant_prediction": metrics["constant_prediction"],
            "train_loss": result.training_loss,
            "epochs": epochs,
            "steps": args.max_steps,
            "global_step": global_step,
            "resumed_from_step": resume_step(resume),
            "processes": processes,
            "heldout": metrics["heldout"],
            "calibration": metrics.get("calibration"),
            "heldout_calibrated": metrics.get("heldout_calibrated"),
            "train_subset": metrics["train_subset"],
            "processbench": metrics.get("processbench"),
            "seconds": time.perf_counter() - t0,
            "train_seconds": train_seconds,
        }

    return stage.run(work)
