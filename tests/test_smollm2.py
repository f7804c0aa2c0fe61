"""A real LM through a very small slice of the pipeline: SmolLM2-135M-Instruct (GGUF) on GSM8K.

States -> labels -> critic (LoRA, real backbone) -> advantages -> one LoRA actor step, each with the
stage code a full run uses. The model comes from ../shared/tools/get-smollm2 (`.ci/run` fetches it
and sets STEPDAPO_SMOLLM2); without it the test is skipped, saying why.
"""

from __future__ import annotations

import pytest
import torch

from stepdapo.config import load_config
from stepdapo.logprobs import batched_sequence_logprobs
from stepdapo.models import LogRatioCritic, critic_values, import_model, load_critic, load_policy
from stepdapo.stages.actor import run_actor
from stepdapo.stages.advantages import read_advantages, run_advantages
from stepdapo.stages.critic import run_critic
from stepdapo.stages.labels import read_labels, run_labels
from stepdapo.stages.states import run_states
from stepdapo.tasks import get_task
from smollm2 import DATA, GGUF, NEEDS_SMOLLM2, ROOT

pytestmark = NEEDS_SMOLLM2


def test_smollm2_pipeline_slice(tmp_path):
    overrides = [
        f"model={GGUF}", f"task.gsm8k.train={DATA / 'train.jsonl'}", f"task.gsm8k.test={DATA / 'test.jsonl'}",
        "states.n_problems=2", "states.samples_per_problem=2", "states.keep_per_problem=1",
        "states.max_new_tokens=40", "label.rollouts=2", "label.max_new_tokens=24",
        "critic.max_examples=8", "critic.batch_size=8", "critic.epochs=1",
        "advantages.min_gap=0.0", "actor.states_per_batch=64", "actor.epochs=1", "actor.lora_r=4",
        "actor.lr=1e-3"]
    cfg = load_config(ROOT / "configs" / "gsm8k-smollm2.yaml", overrides)
    torch.set_num_threads(2)
    task = get_task(cfg.task)
    policy = import_model(cfg.model, tmp_path / "base-model")
    assert (policy / "config.json").is_file() and "quantization_config" not in (policy / "config.json").read_text()

    states = run_states(cfg, policy, tmp_path / "states", task, progress=False)
    assert states["problems"] == 2 and states["solutions_kept"] == 2 and states["states"] >= 2
    labels = run_labels(cfg, policy, tmp_path / "states", tmp_path / "labels", task, progress=False)
    table = read_labels(tmp_path / "labels")
    assert labels["states"] == table.num_rows >= 2
    assert all(len(o) == 2 for o in table.column("outcome").to_pylist())

    critic = run_critic(cfg, policy, tmp_path / "labels", tmp_path / "critic", task, progress=False)
    assert critic["steps"] == 1
    model, _ = load_critic(tmp_path / "critic")  # LoRA merged: a plain HF artifact
    assert not any("lora" in n for n, _ in model.named_parameters())

    # the log-ratio critic on a real LM: LoRA merged into pi_theta, the chat-templated prompt left
    # out of the sum (its values against the head plus the sequence log-probs of the solutions)
    lr_cfg = load_config(ROOT / "configs" / "gsm8k-smollm2.yaml", overrides + ["critic.log_ratio_beta=1"])
    run_critic(lr_cfg, policy, tmp_path / "labels", tmp_path / "lr-critic", task, progress=False)
    lr_critic, tok = load_critic(tmp_path / "lr-critic")
    assert isinstance(lr_critic, LogRatioCritic) and not any("lora" in n for n, _ in lr_critic.named_parameters())
    ids, plens = table.column("ids").to_pylist(), table.column("prompt_len").to_pylist()
    got = critic_values(lr_critic, ids, tok.pad_token_id, prompt_lens=plens)
    deeper = [i for i, (x, p) in enumerate(zip(ids, plens)) if len(x) > p]  # states past the prompt
    prompts, solutions = [ids[i][:plens[i]] for i in deeper], [ids[i][plens[i]:] for i in deeper]
    ratio = [0.0] * len(ids)
    for i, a, b in zip(deeper, batched_sequence_logprobs(lr_critic.policy, prompts, solutions, tok.pad_token_id),
                       batched_sequence_logprobs(lr_critic.reference, prompts, solutions, tok.pad_token_id)):
        ratio[i] = a - b
    with torch.no_grad():
        head = [lr_critic.head(lr_critic.policy(input_ids=torch.tensor([x]), output_hidden_states=True)
                               .hidden_states[-1][0, -1]).item() for x in ids]
    assert got == pytest.approx([float(torch.sigmoid(torch.tensor(h + r))) for h, r in zip(head, ratio)], abs=1e-4)
    assert max(abs(r) for r in ratio) > 1e-3  # the step moved pi_theta

    adv = run_advantages(cfg, tmp_path / "critic", tmp_path / "labels", tmp_path / "advantages", task,
                         progress=False)
    assert adv["states_kept"] >= 1
    actor = run_actor(cfg, policy, tmp_path / "advantages", tmp_path / "actor", progress=False)
    assert actor["steps"] == 1 and actor["lora"]

    # the merged actor is a plain HF model whose action log-probs moved away from pi_ref's
    rows = read_advantages(tmp_path / "advantages").to_pylist()
    before, tok = load_policy(policy)
    after, _ = load_policy(tmp_path / "actor")
    assert not any("lora" in n for n, _ in after.named_parameters())
    s, a = [r["state_ids"] for r in rows], [r["action_ids"] for r in rows]
    lp0 = batched_sequence_logprobs(before, s, a, tok.pad_token_id)
    lp1 = batched_sequence_logprobs(after, s, a, tok.pad_token_id)
    assert max(abs(x - y) for x, y in zip(lp0, lp1)) > 1e-3
