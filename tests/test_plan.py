"""`stepdapo plan`: counts against hand-computed values, against the stages run with a scripted
policy, the time and FLOP arithmetic, the CLI and its JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scripted import ScriptedArithmeticPolicy

from stepdapo.algorithms import value_examples
from stepdapo.cli import main
from stepdapo.config import load_config
from stepdapo.steps import split_steps
from stepdapo.models import char_tokenizer, tiny_llama
from stepdapo.plan import Assumptions, Throughput, make_plan, padded_length, pilot
from stepdapo.stages.labels import read_labels, run_labels
from stepdapo.stages.states import run_states
from stepdapo.tasks import get_task

# Every problem has exactly 3 operations on one-digit numbers, so with the character tokenizer:
#   prompt   "<s>" + "a+b-c+d" + "\n"                    = 9 tokens
#   solution 3 x "r+x=y\n" (6 tokens) + "A=r" + "</s>"    = 22 tokens, step ends [6, 12, 18, 22], T = 4
SMALL = ["task.arithmetic.n_ops_min=3", "task.arithmetic.n_ops_max=3", "task.arithmetic.n_train=40",
         "task.arithmetic.n_test=20", "task.arithmetic.n_demos=100", "states.n_problems=10",
         "states.samples_per_problem=4", "states.keep_per_problem=2", "label.rollouts=3", "eval.limit=5",
         "eval.samples=2", "eval.k=2", "critic.epochs=2.0", "critic.batch_size=4", "iterations=1", "threads=1"]
P, L, T = 9, 22, 4
THR = Throughput(gen_tok_s=100.0, train_tok_s=10.0, forward_tok_s=1000.0, source="test")


def small_cfg(*extra):
    return load_config(None, SMALL + list(extra))


def plan_of(cfg, assumptions=None, **kw):
    return make_plan(cfg, THR, assumptions, tokenizer=char_tokenizer(), params=1000, **kw)


def stage(plan, name):
    """The stage's entry, its floats rounded to 6 places (counts are means times counts)."""
    s = next(s for s in plan["stages"] if s["stage"] == name)
    r = lambda v: round(v, 6) if isinstance(v, float) else v  # noqa: E731
    return {k: ({kk: r(vv) for kk, vv in v.items()} if isinstance(v, dict) else r(v)) for k, v in s.items()}


def test_counts_match_hand_computed_values():
    plan = plan_of(small_cfg())
    assert [s["stage"] for s in plan["stages"]] == [
        "bootstrap", "iter-0/eval", "iter-1/states", "iter-1/label", "iter-1/critic", "iter-1/prm-eval",
        "iter-1/advantages", "iter-1/actor", "iter-1/eval", "iter-1/dpo", "iter-1/dpo-eval"]

    pe = stage(plan, "iter-1/prm-eval")  # the 20 test problems x 16 samples, each scored by the critic
    assert pe["sequences_generated"] == 20 * 16 and pe["prefill_tokens"] == 20 * P
    assert pe["new_tokens"] == 20 * 16 * L and pe["forward_tokens"] == 20 * 16 * (P + L)

    ev = stage(plan, "iter-0/eval")  # 5 problems x (greedy + 2 samples); each pass prefills every prompt once
    assert ev["sequences_generated"] == 15 and ev["prefill_tokens"] == 5 * 2 * P and ev["new_tokens"] == 15 * L

    st = stage(plan, "iter-1/states")  # 10 problems x 4 samples, the prompt prefilled once per problem
    assert st["sequences_generated"] == 40 and st["prefill_tokens"] == 10 * P and st["new_tokens"] == 40 * L
    # states: the prompt (shared by the kept solutions) + 2 kept solutions x 3 later step prefixes
    assert st["counts"]["states"] == 10 * (1 + 2 * (T - 1)) == 70

    lab = stage(plan, "iter-1/label")  # 70 states x 3 rollouts, each state prefilled once
    assert lab["sequences_generated"] == 70 * 3
    assert lab["prefill_tokens"] == 10 * (P + 2 * ((P + 6) + (P + 12) + (P + 18)))
    # a rollout from the state after d steps writes the rest of the solution: 22, 16, 10, 4 tokens
    assert lab["new_tokens"] == 10 * 3 * (22 + 2 * (16 + 10 + 4))
    assert lab["upper_bound"]

    cr = stage(plan, "iter-1/critic")
    # every rollout prefix of a non-terminal rollout: 3 x (T - d - 1) per state at depth d
    examples = 70 + 10 * 3 * ((T - 1) + 2 * ((T - 2) + (T - 3)))
    assert cr["counts"]["value_examples"] == examples == 340
    steps = math.ceil(0.9 * examples / 4 * 2)  # 10% held out, batch 4, 2 epochs
    assert cr["counts"]["steps"] == steps and cr["sequences_trained"] == steps * 4

    adv = stage(plan, "iter-1/advantages")  # terminal actions are not scored: states at depth < 3
    assert adv["counts"]["scored"] == 10 * (1 + 2 * 2) * 3

    act = stage(plan, "iter-1/actor")  # every state, every rollout a distinct action (upper bounds)
    assert act["counts"]["states"] == 70 and act["counts"]["actions"] == 210
    assert act["counts"]["steps"] == math.ceil(70 / 16 * 3)
    # reference and final log-probs, each state once for its 3 actions (actor.shared_prefix, the default);
    # the actions: 3 steps of 6 tokens, then "A=r</s>" of 4
    assert act["forward_tokens"] == 2 * 10 * ((P + 2 * ((P + 6) + (P + 12) + (P + 18))) + 3 * (6 + 2 * (6 + 6 + 4)))
    # the log-ratio critic (the default): each state once for its 3 actions (advantages.shared_prefix),
    # through pi_theta and pi_ref; a value head alone: once
    shared = 10 * ((P + 3 * 6) + 2 * ((P + 6) + 3 * 6) + 2 * ((P + 12) + 3 * 6))
    assert adv["forward_tokens"] == 2 * shared
    head_only = plan_of(small_cfg("critic.log_ratio_beta=0"))
    assert stage(head_only, "iter-1/advantages")["forward_tokens"] == shared
    # without shared_prefix every s + a whole
    whole = plan_of(small_cfg("advantages.shared_prefix=false"))
    assert stage(whole, "iter-1/advantages")["forward_tokens"] == \
        2 * 10 * (3 * (P + 6) + 2 * 3 * (P + 12) + 2 * 3 * (P + 18))
    # and no pi_ref forward pass in training (a third of a trained token's FLOPs)
    head_cr = stage(head_only, "iter-1/critic")
    assert cr["trained_tokens"] == pytest.approx(4 / 3 * head_cr["trained_tokens"])
    assert cr["forward_tokens"] == pytest.approx(2 * head_cr["forward_tokens"])

    dpo = stage(plan, "iter-1/dpo")  # at most keep - 1 = 1 pair per problem
    assert dpo["forward_tokens"] == 10 * (P + 2 * L)  # the prompt once for both solutions (shared_prefix)
    assert dpo["counts"]["pairs"] == 10 and dpo["counts"]["steps"] == math.ceil(10 / 16 * 3)
    assert dpo["sequences_trained"] == 2 * dpo["counts"]["steps"] * 16

    boot = stage(plan, "bootstrap")
    assert boot["counts"]["steps"] == math.ceil(100 / 64) and boot["trained_tokens"] == 2 * 64 * (P + L)


def test_a_given_model_fine_tuned_first_is_planned_with_its_bootstrap():
    given = plan_of(small_cfg("model=/some/model"))
    assert "bootstrap" not in [s["stage"] for s in given["stages"]]
    tuned = plan_of(small_cfg("model=/some/model", "bootstrap.finetune_model=true"))
    assert stage(tuned, "bootstrap") == stage(plan_of(small_cfg()), "bootstrap")  # same demonstrations, same tokens


def test_critic_grad_accum_and_continue_epochs():
    examples = 340  # test_counts_match_hand_computed_values
    acc = stage(plan_of(small_cfg("critic.grad_accum=3")), "iter-1/critic")
    steps = math.ceil(0.9 * examples / (4 * 3) * 2)
    assert acc["counts"]["steps"] == steps and acc["sequences_trained"] == steps * 4 * 3
    two = plan_of(small_cfg("iterations=2", "critic.continue_epochs=0.5"))
    assert stage(two, "iter-1/critic")["counts"]["steps"] == math.ceil(0.9 * examples / 4 * 2)  # from the policy
    second = stage(two, "iter-2/critic")  # continues from iteration 1's critic: 0.5 epochs
    assert second["counts"]["steps"] == math.ceil(second["counts"]["value_examples"] * 0.9 / 4 * 0.5)
    policy = plan_of(small_cfg("iterations=2", "critic.continue_epochs=0.5", "critic.init=policy"))
    assert stage(policy, "iter-2/critic")["counts"]["steps"] == math.ceil(second["counts"]["value_examples"] * 0.9 / 4 * 2)


def test_without_shared_prefix_every_row_is_counted_in_full():
    # (a value head alone: the log-ratio critic always scores whole rows)
    plan = plan_of(small_cfg("actor.shared_prefix=false", "advantages.shared_prefix=false",
                             "dpo.shared_prefix=false", "critic.log_ratio_beta=0"))
    shared = plan_of(small_cfg("critic.log_ratio_beta=0"))
    assert stage(plan, "iter-1/actor")["forward_tokens"] == 2 * 10 * 3 * ((P + 6) + 2 * ((P + 12) + (P + 18) + (P + 22)))
    assert stage(plan, "iter-1/advantages")["forward_tokens"] == 10 * 3 * ((P + 6) + 2 * ((P + 12) + (P + 18)))
    assert stage(plan, "iter-1/dpo")["forward_tokens"] == 2 * 10 * (P + L)
    for name in ("iter-1/actor", "iter-1/dpo"):
        assert stage(plan, name)["trained_tokens"] > stage(shared, name)["trained_tokens"]
        assert stage(plan, name)["sequences_trained"] == stage(shared, name)["sequences_trained"]


def test_assumptions_scale_the_uncertain_counts():
    full = plan_of(small_cfg())
    half = plan_of(small_cfg(), Assumptions(distinct_states=0.5, gap_kept=0.25, kept_actions=1 / 3, dpo_pairs=0.5))
    assert stage(half, "iter-1/states")["counts"]["states"] == 10 * (1 + 0.5 * 2 * 3)
    assert stage(half, "iter-1/label")["sequences_generated"] == 40 * 3
    assert stage(half, "iter-1/actor")["counts"]["states"] == 0.25 * 40
    assert stage(half, "iter-1/actor")["counts"]["actions"] == pytest.approx(0.25 * 40 * 1)
    assert stage(half, "iter-1/dpo")["counts"]["pairs"] == 5
    # the counts that need no assumption do not move
    for name in ("iter-0/eval", "iter-1/states", "bootstrap"):
        for key in ("sequences_generated", "new_tokens", "prefill_tokens", "trained_tokens"):
            assert stage(half, name)[key] == stage(full, name)[key]


def test_seconds_and_flops_follow_the_throughputs():
    """Forward-only work is split over the processes, except the critic's evaluation, which rank 0
    runs alone (at 1/processes of the forward rate)."""
    plan = plan_of(small_cfg(), processes=2)
    for s in plan["stages"]:
        rank0 = 2 if s["stage"].endswith("/critic") else 1
        want = (s["prefill_tokens"] / 1000 + s["forward_tokens"] * rank0 / 1000 + s["new_tokens"] / 100
                + s["trained_tokens"] / 10)
        assert s["seconds"] == pytest.approx(want, rel=1e-3)
        fwd = s["prefill_tokens"] + s["new_tokens"] + s["forward_tokens"]
        assert s["flops"] == pytest.approx(2 * 1000 * fwd + 6 * 1000 * s["trained_tokens"], rel=1e-3)
    assert plan["total"]["seconds"] == pytest.approx(sum(s["seconds"] for s in plan["stages"]), rel=1e-3)
    gpu = make_plan(small_cfg(), Throughput(gpu_flops=1e6), tokenizer=char_tokenizer(), params=1000)
    for s in gpu["stages"]:
        assert s["seconds"] == pytest.approx(s["flops"] / 1e6, rel=1e-3)


def test_padded_length_is_the_expected_longest_row():
    assert padded_length([(1, 1.0), (3, 1.0)], 1) == pytest.approx(2.0)
    assert padded_length([(1, 1.0), (3, 1.0)], 2) == pytest.approx(1 * 0.25 + 3 * 0.75)
    assert padded_length([(5, 2.0)], 64) == pytest.approx(5)


def test_plan_matches_the_stages_run_with_a_scripted_policy(tmp_path):
    """The states and labels stages, run for real with a scripted policy that writes solutions of
    the reference shape (some steps wrong): the plan with upper bounds bounds every count; with the
    assumptions a pilot measures on the same problems it reproduces them."""
    cfg = small_cfg()
    task = get_task(cfg.task)
    policy = ScriptedArithmeticPolicy(task, char_tokenizer(), 0.3)
    st = run_states(cfg, "scripted", tmp_path / "s", task, progress=False, generator=policy)
    lab = run_labels(cfg, "scripted", tmp_path / "s", tmp_path / "l", task, progress=False, generator=policy)
    c = read_labels(tmp_path / "l").to_pydict()
    examples = len(value_examples(c["problem_id"], c["ids"], c["n_correct"], c["outcome"], c["action_ids"],
                                  c["action_terminal"], c["rollout_ids"],
                                  step_ends=lambda ids: split_steps(ids, policy.is_delim),
                                  action_states=True, rollout_prefixes=True))
    measured = {"states": st["states"], "rollouts": lab["states"] * 3, "label_tokens": sum(len(r) for rs in c["rollout_ids"] for r in rs),
                "examples": examples}

    def predicted(plan):
        return {"states": stage(plan, "iter-1/states")["counts"]["states"],
                "rollouts": stage(plan, "iter-1/label")["sequences_generated"],
                "label_tokens": stage(plan, "iter-1/label")["new_tokens"],
                "examples": stage(plan, "iter-1/critic")["counts"]["value_examples"]}

    upper = predicted(plan_of(cfg))
    assert stage(plan_of(cfg), "iter-1/states")["new_tokens"] == st["tokens_sampled"]  # the exact count
    for k, v in measured.items():
        assert upper[k] >= v, k
    assert upper["states"] > measured["states"]  # identical correct prefixes did merge

    assumed, notes, sampled = pilot(cfg, "scripted", cfg.states.n_problems, generator=policy)
    assert "10 training problems" in notes[0]
    assert len(sampled) == 20 and all(s.prompt == P and s.ends == [6, 12, 18, 22] for s in sampled)
    got = predicted(plan_of(cfg, assumed))
    assert predicted(plan_of(cfg, assumed, sampled=sampled)) == got  # the scripted policy writes reference shapes
    assert got["states"] == pytest.approx(measured["states"])
    assert got["rollouts"] == pytest.approx(measured["rollouts"])
    # deduplication merges shallow prefixes more than deep ones, and the plan spreads it evenly over
    # the depths: the counts that depend on the depths of the states are close, not equal
    assert got["examples"] == pytest.approx(measured["examples"], rel=0.1)
    assert got["label_tokens"] == pytest.approx(measured["label_tokens"], rel=0.2)


# -- the command ------------------------------------------------------------------------------------

def write_cfg(tmp_path):
    p = tmp_path / "small.yaml"
    p.write_text("\n".join(f"{k.replace('=', ': ', 1)}" for k in ["seed=0"]) + "\n")
    return p


def test_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    cfg = write_cfg(tmp_path)
    out = tmp_path / "plan.json"
    rc = main(["plan", str(cfg), *SMALL, "--gen-tok-s", "100", "--train-tok-s", "10", "--forward-tok-s", "1000",
               "--assume", "gap_kept=0.5", "--json", str(out)])
    assert rc == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    for word in ("iter-1/label", "iter-1/critic", "total", "UPPER BOUND", "steps per solution: mean 4.00",
                 "from 10 reference solutions"):
        assert word in text, word
    plan = json.loads(out.read_text())
    assert set(plan) == {"config", "parameters", "throughput", "estimates", "assumptions", "stages", "total", "memory"}
    assert plan["throughput"]["gen_tok_s"] == 100 and plan["parameters"] > 0
    assert plan["assumptions"]["gap_kept"] == {"value": 0.5, "upper_bound": False, "source": "given",
                                               "doc": plan["assumptions"]["gap_kept"]["doc"]}
    assert plan["assumptions"]["distinct_states"]["source"] == "upper bound"
    keys = {"stage", "sequences_generated", "prefill_tokens", "new_tokens", "sequences_trained", "trained_tokens",
            "forward_tokens", "upper_bound", "notes", "counts", "flops", "seconds"}
    for s in plan["stages"]:
        assert set(s) == keys and s["seconds"] >= 0
    assert plan["total"]["sequences_generated"] == pytest.approx(sum(s["sequences_generated"] for s in plan["stages"]))
    assert stage(plan, "iter-1/states")["sequences_generated"] == 40


@pytest.mark.parametrize("args, message", [
    (["no-such.yaml"], "config file not found"),
    (["{cfg}", "critic.no_such_key=1"], "no_such_key"),
    (["{cfg}", "--assume", "nonsense=0.5"], "--assume 'nonsense=0.5'"),
    (["{cfg}", "--assume", "gap_kept=2"], "must be in (0, 1]"),
    (["{cfg}", "--gen-tok-s", "-5"], "--gen-tok-s must be a positive finite number"),
    (["{cfg}", "--gen-tok-s", "inf"], "--gen-tok-s must be a positive finite number"),
    (["{cfg}", "--params", "inf", "--tokenizer", "x"], "--params must be a parameter count"),
    (["{cfg}", "--gpu-flops", "1e12", "--probe"], "--gpu-flops replaces"),
    (["{cfg}", "--pilot", "10"], "--pilot-model"),
    (["{cfg}", "--params", "8e9"], "--tokenizer and --params go together"),
    (["{cfg}", "--assume", "train_problems=2.5"], "whole number"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, args, message):
    cfg = write_cfg(tmp_path)
    rc = main(["plan", *[a.format(cfg=cfg) for a in args]])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("stepdapo plan: error:") and message in err, err


def test_pilot_solution_lengths_replace_the_reference_ones():
    """A model that writes twice as long as the references: the pilot's solutions set the training
    shapes, and scale the eval solutions by the same ratio (2)."""
    from stepdapo.plan import Shape

    sampled = [Shape(P, [12, 24, 36, 44])] * 20  # 10 problems x 2 kept
    plan = plan_of(small_cfg(), sampled=sampled)
    assert stage(plan, "iter-1/states")["new_tokens"] == 40 * 44
    assert stage(plan, "iter-1/label")["new_tokens"] == 10 * 3 * (44 + 2 * (32 + 20 + 8))
    assert stage(plan, "iter-0/eval")["new_tokens"] == 15 * 44
    assert any("scaled by 2.00" in e for e in plan["estimates"])


def test_probe_measures_plausible_rates_quickly():
    from stepdapo.plan import Shape, probe

    t = probe(small_cfg(), [Shape(P, [6, 12, 18, 22])], char_tokenizer(), budget_s=0.3)
    assert all(math.isfinite(r) and r > 0 for r in (t.gen_tok_s, t.train_tok_s, t.forward_tok_s)), t
    # the same batch, forward only against forward + backward + optimizer step: several times faster
    assert t.forward_tok_s > 1.5 * t.train_tok_s, t
    assert "--probe" in t.source and "1 thread(s)" in t.source


def test_probe_rates_are_the_tokens_over_the_time_they_took(monkeypatch):
    """A clock that only the model's forward calls move: NO_GRAD seconds for one without
    gradients (a sampling step, a forward-only pass), GRAD for one with (a training step). The
    probe's rates are then known exactly from the batches it should run: sampling the labels
    stage's label.batch_size rows (as whole states of label.rollouts samples) for the solution's 22
    tokens, one forward call per token; training and forward passes on critic.batch_size rows of the
    padded prompt + solution (9 + 22 tokens). A probe that counts the prompt as generated, leaves
    out a dimension of a batch, mixes the rates up or times the wrong thing gives other numbers."""
    from types import SimpleNamespace

    import torch

    from stepdapo import models, plan
    from stepdapo.generation import hf as generation
    from stepdapo.plan import Shape, probe

    NO_GRAD, GRAD = 0.01, 0.25
    now = [0.0]
    clock = SimpleNamespace(perf_counter=lambda: now[0])
    monkeypatch.setattr(plan, "time", clock)
    monkeypatch.setattr(generation, "time", clock)
    calls = []

    def tick(module, args, kwargs):
        calls.append((torch.is_grad_enabled(), tuple(kwargs["input_ids"].shape)))
        now[0] += GRAD if torch.is_grad_enabled() else NO_GRAD

    tiny = models.tiny_llama

    def timed_tiny_llama(*args, **kwargs):
        model = tiny(*args, **kwargs)
        model.register_forward_pre_hook(tick, with_kwargs=True)
        return model

    monkeypatch.setattr(models, "tiny_llama", timed_tiny_llama)
    cfg = small_cfg()
    t = probe(cfg, [Shape(P, [6, 12, 18, 22])], char_tokenizer(), budget_s=0.3)

    rows, new = cfg.label.batch_size, L  # L = 22 < label.max_new_tokens
    sampled = rows // cfg.label.rollouts * cfg.label.rollouts  # whole states
    batch, length = cfg.critic.batch_size, P + L
    assert t.gen_tok_s == pytest.approx(sampled * new / (new * NO_GRAD))
    assert t.train_tok_s == pytest.approx(batch * length / GRAD)
    assert t.forward_tok_s == pytest.approx(batch * length / NO_GRAD)
    assert f"sampling {rows} rows x {new} tokens, train / forward batches of {batch} x {length} tokens" in t.source
    # what it ran: sampling (a prefill of each state, then one token a step for each of its
    # samples), training steps, forward passes
    assert (False, (sampled // cfg.label.rollouts, P)) in calls and (False, (sampled, 1)) in calls
    assert (True, (batch, length)) in calls and (False, (batch, length)) in calls


# -- the paper-scale recipes: they load, and plan offline with stand-ins -----------------------------

RECIPES = ["configs/math-llama3.1-8b.yaml", "configs/math-qwen2.5-math-1.5b.yaml"]
MATH500 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "math500" / "test.jsonl"


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_has_the_papers_settings(path):
    cfg = load_config(path)
    assert cfg.generation.backend == "vllm" and cfg.generation.dtype == "auto" and cfg.bf16 == "auto"
    assert (cfg.states.samples_per_problem, cfg.states.keep_per_problem, cfg.label.rollouts) == (32, 6, 16)
    assert cfg.states.n_problems is None and cfg.iterations == 2 and cfg.critic.epochs == 1.0
    assert cfg.eval.max_new_tokens == 2048 and cfg.advantages.min_gap == 0.1 and cfg.advantages.weighting == "unique"
    assert cfg.task.name == "math" and cfg.task.math.step_delimiter == "\n"
    text = Path(path).read_text()
    assert "configs/accelerate/" in text and "NOT RUN" in text


@pytest.mark.skipif(not MATH500.is_file(), reason=f"MATH-500 not found at {MATH500}")
@pytest.mark.parametrize("path", RECIPES)
def test_recipe_plans_offline(tmp_path, capsys, path):
    """Neither the model nor the hub train split is on this machine (and the tests run with
    HF_HUB_OFFLINE): --tokenizer / --params stand in for the model, --assume train_problems for the
    train split, which is then not read."""
    tok_dir = tmp_path / "tok"
    tok = char_tokenizer()
    tok.save_pretrained(tok_dir)
    tiny_llama(tok, load_config(None).bootstrap.model).config.save_pretrained(tok_dir)
    out = tmp_path / "plan.json"
    rc = main(["plan", path, f"task.math.test={MATH500}", "--tokenizer", str(tok_dir), "--params", "8.03e9",
               "--assume", "train_problems=7500", "--processes", "8", "--gen-tok-s", "48000",
               "--train-tok-s", "56000", "--forward-tok-s", "200000", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    text = " ".join(capsys.readouterr().out.split())
    assert "not read: 8,030,000,000 params (given)" in text and "standing in for the 7500 training problems" in text
    plan = json.loads(out.read_text())
    assert plan["parameters"] == 8_030_000_000 and plan["config"]["processes"] == 8
    assert "train_problems" not in plan["assumptions"]
    st, lab = stage(plan, "iter-1/states"), stage(plan, "iter-1/label")
    assert st["sequences_generated"] == 7500 * 32 and st["notes"][0].startswith("7500 problems x 32 samples")
    assert lab["sequences_generated"] == st["counts"]["states"] * 16
    assert [s["stage"] for s in plan["stages"]][-1] == "iter-2/eval"
    assert all(s["seconds"] > 0 for s in plan["stages"])


def test_every_baseline_is_counted():
    """Each baseline of `baselines` gets its training and its evaluation in the plan: MC-DAPO the
    actor's work, Step-DPO a pair per kept state (the state once, both steps), RFT every kept
    solution (all correct: an upper bound)."""
    plan = plan_of(small_cfg("baselines=[dpo,step_dpo,rft,mc_dapo]"))
    names = [s["stage"] for s in plan["stages"]]
    assert names[-8:] == ["iter-1/dpo", "iter-1/dpo-eval", "iter-1/step_dpo", "iter-1/step_dpo-eval",
                          "iter-1/rft", "iter-1/rft-eval", "iter-1/mc_dapo", "iter-1/mc_dapo-eval"]
    actor, mc = stage(plan, "iter-1/actor"), stage(plan, "iter-1/mc_dapo")
    assert {k: v for k, v in mc.items() if k not in ("stage", "notes", "flops", "seconds")} == \
        {k: v for k, v in actor.items() if k not in ("stage", "notes", "flops", "seconds")}
    sd = stage(plan, "iter-1/step_dpo")  # 70 states (upper bound); the prompt once per problem, 2 x 3 later states
    state = (P + 2 * ((P + 6) + (P + 12) + (P + 18))) / 7
    step = (6 + 2 * (6 + 6 + 4)) / 7
    assert sd["counts"]["pairs"] == 70 and sd["counts"]["steps"] == math.ceil(70 / 16 * 3)
    assert sd["forward_tokens"] == pytest.approx(70 * (state + 2 * step))
    assert sd["sequences_trained"] == 2 * sd["counts"]["steps"] * 16 and sd["upper_bound"]
    rft = stage(plan, "iter-1/rft")  # 10 problems x 2 kept solutions, 3 epochs of batch 16
    assert rft["counts"]["solutions"] == 20 and rft["counts"]["steps"] == math.ceil(20 / 16 * 3)
    assert rft["trained_tokens"] == rft["counts"]["steps"] * 16 * (P + L) and rft["upper_bound"]


# -- memory per GPU ---------------------------------------------------------------------------------

from stepdapo.plan import (GiB, HEADROOM, KNOWN_SHAPES, MemorySetup, ModelShape, Shape, find_fix,  # noqa: E402
                           memory_lengths, stage_memory)

LLAMA8B = ModelShape(**KNOWN_SHAPES["llama-3.1-8b"], source="test")


def memory_of(cfg, stage_name, shape=LLAMA8B, processes=1, fsdp=False, gpu=None):
    """One stage's memory (bytes), on the small config's shapes (character tokenizer)."""
    train = [Shape(P, [6, 12, 18, 22])]  # the SMALL config's problems
    lengths = memory_lengths(cfg, train, train, Assumptions(), None)
    return stage_memory(stage_name, MemorySetup(cfg, processes, fsdp, gpu), shape, lengths)


def test_parameter_counts_match_transformers_built_on_the_meta_device():
    """The shape's arithmetic against the models transformers builds (no weights, no network):
    Llama-3.1-8B's shape is its 8,030,261,248 parameters (8.03e9, as published); its value-head
    critic (AutoModelForSequenceClassification, 1 label) loses the untied LM head; tied models
    (SmolLM2, Qwen2.5 without its q/k/v biases) count the embedding once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    assert LLAMA8B.params() == 8_030_261_248
    assert LLAMA8B.params() == pytest.approx(8.03e9, rel=0.01)
    for name in ("llama-3.1-8b", "smollm2-135m", "qwen2.5-math-1.5b"):
        s = ModelShape(**KNOWN_SHAPES[name])
        c = LlamaConfig(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size, num_hidden_layers=s.num_layers,
                        num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads, vocab_size=s.vocab_size,
                        tie_word_embeddings=s.tied, num_labels=1)
        with torch.device("meta"):
            lm = sum(p.numel() for p in LlamaForCausalLM(c).parameters())
            vh = sum(p.numel() for p in LlamaForSequenceClassification(c).parameters())
        assert s.params() == lm, name
        assert s.params(value_head=True) == vh, name
    assert ModelShape(**KNOWN_SHAPES["smollm2-135m"]).params() == 134_515_008  # SmolLM2-135M's published count
    assert ModelShape(**KNOWN_SHAPES["qwen2.5-math-1.5b"]).params() == pytest.approx(1.54e9, rel=0.01)


def test_lora_parameters_are_what_peft_adds():
    """r x (in + out) on every linear layer of every decoder layer (peft's all-linear: not the LM head)."""
    from peft import LoraConfig, get_peft_model

    tok = char_tokenizer()
    cfg = load_config(None).bootstrap.model
    model = tiny_llama(tok, cfg)
    shape = ModelShape(cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_heads, len(tok), True)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert shape.lora_params(4) == sum(p.numel() for p in peft.parameters() if p.requires_grad)


def test_full_fine_tuning_weights_gradients_and_adam_state():
    """Full fine-tuning: float32 weights (4 B/param), gradients (4) and AdamW's two states (8) = 16
    B/param on one process; DDP on 8 processes adds its gradient buckets (another 4: 20 B/param);
    FSDP on 8 shards the 16 B/param and adds the gathered layers (2 in flight + 1's gradients) and the
    root unit (embeddings, LM head, norm) in bf16."""
    P = 8_030_261_248
    cfg = small_cfg("bf16=true")
    one = memory_of(cfg, "iter-1/actor")
    assert (one.weights, one.gradients, one.optimizer) == (4 * P, 4 * P, 8 * P)
    assert one.weights + one.gradients + one.optimizer == 16 * P
    ddp = memory_of(cfg, "iter-1/actor", processes=8)  # states_per_batch 16: 2 a process
    assert ddp.weights + ddp.gradients + ddp.optimizer == 20 * P
    fsdp = memory_of(cfg, "iter-1/actor", processes=8, fsdp=True)
    layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336 + 2 * 4096  # q, o, k, v, MLP, norms
    root = 2 * 128256 * 4096 + 4096  # embeddings, untied LM head, final norm
    assert layer == LLAMA8B.layer_params() and 32 * layer + root == P
    assert fsdp.gradients == pytest.approx(4 * P / 8) and fsdp.optimizer == pytest.approx(8 * P / 8)
    assert fsdp.weights == pytest.approx(4 * P / 8 + 2 * (3 * layer + root))
    # in GiB: 8.03e9 x 16 B = 119.7 GiB on one process
    assert (one.weights + one.gradients + one.optimizer) / GiB == pytest.approx(119.66, abs=0.01)


def test_lora_trains_only_the_adapters():
    P, r = 8_030_261_248, 16
    lora = 32 * r * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 2 * (4096 + 14336) + (14336 + 4096))  # q, o; k, v; gate, up; down
    assert LLAMA8B.lora_params(r) == lora == 41_943_040  # the usual 41.9M of an all-linear r=16 LoRA on 8B
    m = memory_of(small_cfg("actor.lora_r=16"), "iter-1/actor", processes=8)
    assert m.weights == 4 * (P + lora)  # the frozen base and the adapters
    assert m.gradients == 2 * 4 * lora and m.optimizer == 8 * lora  # DDP's buckets: the adapters only
    assert memory_of(small_cfg("actor.lora_r=16"), "iter-1/actor", processes=8, fsdp=True).refused  # not supported


def test_gradient_checkpointing_keeps_each_layers_input_and_one_layer():
    """Float32 (no autocast copies), the critic (no shared prefix, no vocabulary logits): without
    checkpointing every layer's activations, L x T x p with p = 368,640 B per token and layer for
    Llama-3.1-8B in float32 (norms 2 x (2 x 4 x 4096 + 4 x 4096), attention 4 x (4096 + 4096 + 2 x
    1024), MLP 4 x 4 x 14336); with it each layer's float32 input (L x T x 4096 x 4) plus one layer
    recomputed (T x p): 13.2 x less."""
    p = 2 * (2 * 4 * 4096 + 4 * 4096) + 4 * (4096 + 4096 + 2 * 1024) + 4 * 4 * 14336
    assert p == 368_640 == LLAMA8B.layer_activation_bytes(4)
    cfg = small_cfg("critic.log_ratio_beta=0")
    m = memory_of(cfg, "iter-1/critic")
    examples = memory_lengths(cfg, [Shape(P, [6, 12, 18, 22])], [], Assumptions(), None)["critic"]
    assert sorted({v for v, _ in examples}) == [P, P + 6, P + 12, P + 18]  # states and rollout prefixes
    T = 4 * padded_length(examples, 4)  # critic.batch_size 4 on one process, padded to the longest
    assert m.activations_no_ckpt == pytest.approx(32 * T * p)
    assert m.activations_ckpt == pytest.approx(32 * T * 4096 * 4 + T * p)
    ratio = m.activations_no_ckpt / m.activations_ckpt
    assert ratio == pytest.approx(32 * p / (32 * 4096 * 4 + p)) and ratio == pytest.approx(13.21, abs=0.01)
    assert m.activations == m.activations_no_ckpt and m.logits == 0
    on = memory_of(small_cfg("critic.log_ratio_beta=0", "gradient_checkpointing=true"), "iter-1/critic")
    assert on.activations == on.activations_ckpt == pytest.approx(m.activations_ckpt) and on.checkpointing


def test_log_ratio_critic_holds_two_language_models():
    """log_ratio_beta > 0: pi_theta trained (weights, gradients, AdamW) plus pi_ref frozen (weights
    only) and a 1-output head, and both models' chunked logits; 0: one value-head model, no
    vocabulary logits. Scoring (advantages): two float32 language models against one."""
    N, h, V = 8_030_261_248, 4096, 128256
    pv = LLAMA8B.params(value_head=True)
    two, one = memory_of(small_cfg(), "iter-1/critic"), memory_of(small_cfg("critic.log_ratio_beta=0"), "iter-1/critic")
    assert two.weights == 4 * (N + h + 1) + 4 * N and two.optimizer == 8 * (N + h + 1)
    assert one.weights == 4 * pv and one.optimizer == 8 * pv and pv == N - V * h + h
    tokens = 4 * padded_length(memory_lengths(small_cfg(), [Shape(P, [6, 12, 18, 22])], [], Assumptions(),
                                              None)["critic"], 4)
    assert two.logits == 2 * 2 * min(tokens, 4096) * V * 4 and one.logits == 0
    adv2, adv1 = memory_of(small_cfg(), "iter-1/advantages"), memory_of(small_cfg("critic.log_ratio_beta=0"),
                                                                         "iter-1/advantages")
    assert adv2.weights == 2 * 4 * N and adv1.weights == 4 * pv
    assert adv2.logits == 2 * 2 * 4096 * V * 4 and adv1.logits == 0  # batches of max_batch_tokens >= the chunk


def test_sampling_memory():
    """HF: weights in the sampler's dtype, the KV cache of batch_size rows x (prompt + max_new_tokens);
    vLLM: gpu_memory_utilization of the GPU."""
    m = memory_of(small_cfg("generation.dtype=bfloat16"), "iter-1/label")
    rows, new = 512, 64  # label.batch_size, label.max_new_tokens
    kv = 2 * 32 * 1024 * 2  # bytes a token: keys and values, 32 layers, 8 heads x 128, bf16
    assert m.weights == 2 * 8_030_261_248 and m.gradients == m.optimizer == 0
    assert rows * (P + new) * kv <= m.kv_cache <= rows * (P + 18 + new) * kv
    v = memory_of(small_cfg("generation.backend=vllm", "generation.gpu_memory_utilization=0.5"), "iter-1/label", gpu=80)
    assert v.peak == 0.5 * 80 * GiB and v.fits
    assert memory_of(small_cfg("generation.backend=vllm"), "iter-1/label").peak is None  # no GPU size given
    # prm-eval with vLLM: the engine is shut down before the critic (here two float32 language models)
    # loads to score, so the peak is the larger of the two, not their sum
    pe = memory_of(small_cfg("generation.backend=vllm"), "iter-1/prm-eval", gpu=80)
    critic = 2 * 4 * 8_030_261_248
    assert pe.weights == critic and pe.engine == 0 and pe.peak == pe.weights + pe.activations + pe.logits
    assert pe.peak > 0.85 * 80 * GiB  # 64 GB of critic weights and their scoring: above vLLM's share
    assert pe.fits == (pe.peak <= 0.9 * 80 * GiB)
    small = memory_of(small_cfg("generation.backend=vllm", "critic.log_ratio_beta=0"), "iter-1/prm-eval", gpu=80)
    assert small.peak == small.engine == 0.85 * 80 * GiB and small.fits  # one 32 GB model: vLLM's share is the peak
    hf = memory_of(small_cfg(), "iter-1/prm-eval", gpu=80)  # the HF sampler's model stays beside the critic
    assert hf.weights == critic + memory_of(small_cfg(), "iter-1/label", gpu=80).weights


def fix_overrides(fix: str) -> tuple[list[str], bool]:
    words = fix.split()
    return [w for w in words if "=" in w], "--fsdp" in words


@pytest.mark.parametrize("extra, processes", [((), 8), (("generation.backend=vllm",), 8), ((), 1),
                                              (("critic.log_ratio_beta=0", "baselines=[dpo,step_dpo,rft,mc_dapo]"), 8)])
def test_every_fix_brings_its_stage_under_the_limit(extra, processes):
    """Llama-3.1-8B's shape on 40 GB GPUs: a stage that does not fit names a setting, and the plan
    made again with it (config overrides, --fsdp) has that stage under 90% of the GPU, at the peak
    the fix said; or says that nothing it tried fits, and then nothing it tries does."""
    def plan(overrides, fsdp):
        return make_plan(small_cfg("bf16=true", "critic.batch_size=8", "actor.states_per_batch=8",
                                   "dpo.batch_size=8", "step_dpo.batch_size=8", "rft.batch_size=8",
                                   "bootstrap.batch_size=8", *extra, *overrides),
                         THR, tokenizer=char_tokenizer(), params=1000, processes=processes, fsdp=fsdp,
                         gpu_memory=40, shape=LLAMA8B)

    before = plan([], False)["memory"]
    missing = [m for m in before["stages"] if m["fits"] is False]
    assert any(m["fix"] for m in missing), "the test should exercise fixes"
    for m in missing:
        if m["fix"] is None:  # e.g. an 8B log-ratio critic (two float32 language models) beside its sampler
            assert m["fixed_peak"] is None
            continue
        assert m["fixed_peak"] <= HEADROOM * 40
        overrides, fsdp = fix_overrides(m["fix"])
        after = next(s for s in plan(overrides, fsdp)["memory"]["stages"] if s["stage"] == m["stage"])
        assert after["fits"] and after["peak"] == pytest.approx(m["fixed_peak"], abs=1e-3), (m["fix"], after)
    for m in before["stages"]:
        assert m["fits"] is not None or m["kind"] == "train (CPU)"
        if m["fits"]:
            assert m["peak"] <= HEADROOM * 40


def test_the_first_fix_in_order_of_preference():
    """Checkpointing first where it is enough; --fsdp where only sharding is (8B's 20 B/param under DDP)."""
    cfg = small_cfg("bf16=true", "critic.log_ratio_beta=0", "critic.batch_size=64")
    big = MemorySetup(cfg, 1, False, 80)

    shape = ModelShape(**KNOWN_SHAPES["qwen2.5-math-1.5b"])
    lengths = memory_lengths(cfg, [Shape(400, [200, 400, 600, 800])], [], Assumptions(), None)
    m = stage_memory("iter-1/critic", big, shape, lengths)
    assert m.fits is False
    fix, peak = find_fix("iter-1/critic", big, shape, lengths)
    assert fix == "gradient_checkpointing=true" and peak <= 0.9 * 80 * GiB
    ddp = MemorySetup(small_cfg("bf16=true", "critic.log_ratio_beta=0"), 8, False, 80)
    lengths = memory_lengths(ddp.cfg, [Shape(P, [6, 12, 18, 22])], [], Assumptions(), None)
    assert stage_memory("iter-1/critic", ddp, LLAMA8B, lengths).fits is False
    assert find_fix("iter-1/critic", ddp, LLAMA8B, lengths)[0] == "--fsdp"


def test_rank0_sync_timeout_warning(monkeypatch):
    """Only the critic's evaluation still runs on rank 0 alone (reference and final log-probs,
    advantages and prm-eval are split over the processes): a warning when it would pass
    STEPDAPO_SYNC_TIMEOUT_S at the plan's throughputs; none from the default (CPU) throughputs."""
    monkeypatch.setenv("STEPDAPO_SYNC_TIMEOUT_S", "1")
    plan = plan_of(small_cfg(), processes=8)
    warnings = plan["memory"]["sync_warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("iter-1/critic: rank 0 alone")
    assert make_plan(small_cfg(), None, tokenizer=char_tokenizer(), params=1000,
                     processes=8)["memory"]["sync_warnings"] == []
    monkeypatch.setenv("STEPDAPO_SYNC_TIMEOUT_S", "7200")
    assert plan_of(small_cfg(), processes=8)["memory"]["sync_warnings"] == []


def test_cli_prints_the_memory_table(tmp_path, capsys):
    cfg = write_cfg(tmp_path)
    out = tmp_path / "plan.json"
    rc = main(["plan", str(cfg), *SMALL, "--gpu-memory", "0.01", "--processes", "2", "states.n_problems=10",
               "critic.batch_size=4", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    text = " ".join(capsys.readouterr().out.split())
    for word in ("memory per GPU (GB = GiB): 2 processes, DDP, 0.01 GB GPUs", "the tiny model (config section",
                 "DOES NOT FIT iter-1/critic", "fix:", "left out: the CUDA context"):
        assert word in text, word
    mem = json.loads(out.read_text())["memory"]
    assert mem["processes"] == 2 and mem["gpu_memory_gb"] == 0.01 and not mem["fsdp"]
    assert [m["stage"] for m in mem["stages"]] == [s["stage"] for s in json.loads(out.read_text())["stages"]]
    assert next(m for m in mem["stages"] if m["stage"] == "bootstrap")["kind"] == "train (CPU)"


@pytest.mark.parametrize("args, message", [
    (["--gpu-memory", "0"], "--gpu-memory must be each GPU's memory in GB, a positive number"),
    (["--gpu-memory", "-80"], "--gpu-memory must be"),
    (["--gpu-memory", "inf"], "--gpu-memory must be"),
    (["--gpu-memory", "nan"], "--gpu-memory must be"),
    (["--fsdp"], "--fsdp shards over several processes"),
    (["--model-shape", "no-such.json"], "--model-shape no-such.json: cannot read it"),
    (["--model-shape", "{bad}"], "not JSON"),
    (["--model-shape", "{partial}"], "no intermediate_size, num_hidden_layers"),
])
def test_cli_memory_bad_input_exits_2(tmp_path, capsys, args, message):
    cfg = write_cfg(tmp_path)
    (tmp_path / "bad.json").write_text("{hidden_size: 1")
    (tmp_path / "partial.json").write_text('{"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10}')
    args = [a.format(bad=tmp_path / "bad.json", partial=tmp_path / "partial.json") for a in args]
    rc = main(["plan", str(cfg), *SMALL, *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("stepdapo plan: error:") and message in err, err


def test_a_model_not_here_is_planned_from_its_shape(tmp_path, capsys):
    """A hub name not on this machine: the error says what to give; --model-shape (a config.json)
    gives the shape and, with --tokenizer, the parameter count; a well-known name its known shape."""
    tok_dir = tmp_path / "tok"
    tok = char_tokenizer()
    tok.save_pretrained(tok_dir)
    tiny_llama(tok, load_config(None).bootstrap.model).config.save_pretrained(tok_dir)
    cfg = write_cfg(tmp_path)
    rc = main(["plan", str(cfg), *SMALL, "model=/nowhere/Some-Model-7B"])
    assert rc == 2 and "--model-shape" in capsys.readouterr().err
    shape = tmp_path / "config.json"
    shape.write_text(json.dumps({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                                 "tie_word_embeddings": False}))
    out = tmp_path / "plan.json"
    rc = main(["plan", str(cfg), *SMALL, "model=/nowhere/Some-Model-7B", "--tokenizer", str(tok_dir),
               "--model-shape", str(shape), "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    plan = json.loads(out.read_text())
    assert plan["parameters"] == 8_030_261_248 and "(--model-shape)" in plan["memory"]["shape_source"]
    rc = main(["plan", str(cfg), *SMALL, "model=/nowhere/Meta-Llama-3.1-8B-Instruct", "--tokenizer", str(tok_dir),
               "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    plan = json.loads(out.read_text())
    assert plan["parameters"] == 8_030_261_248
    assert plan["memory"]["shape_source"].startswith("the known shape of llama-3.1-8b")
