"""What the shared code does with a real BPE tokenizer: SmolLM2-135M-Instruct's (byte-level BPE,
49k tokens, ChatML template, <|im_end|> both EOS and pad). Tokenizer only: the models below are
tiny random Llamas over SmolLM2's vocabulary, so no weights are loaded.

- step delimiters inside larger tokens ("\\n\\n", " \\n", "\\n   ") end a step; blank lines, which
  this tokenizer writes as separate "\\n" tokens, do not make empty steps; a delimiter it splits
  across tokens ("\\n\\n") is refused instead of silently giving one-step solutions;
- chat-template tokens in prompts and states: no doubled BOS, prompts never cut into steps, the
  TRL export keeps the template's tokens;
- EOS vs end of turn: the chat template's <|im_end|> ends a solution even where the tokenizer's EOS
  is <|endoftext|>;
- padding: <|im_end|> is the pad token AND sits inside every chat prompt, so masks must come from
  lengths, never from `ids != pad`; generation pads left, the critic right, log-probs left, and
  none of it depends on the tokenizer's padding_side;
- a tokenizer without a pad token (Llama 3.1's) gets EOS as pad.
"""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from smollm2 import DATA, GGUF
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from stepdapo.errors import ConfigError
from stepdapo.generation import HFGenerator, SamplingParams, chat_turn_end_id, encode_prompts, end_token_ids
from stepdapo.generation.base import _eos_ids
from stepdapo.steps import check_step_delimiter, delimiter_token_mask, split_steps
from stepdapo.logprobs import sequence_logprobs
from stepdapo.models import critic_values, load_tokenizer
from stepdapo.stages.labels import export_stepwise
from stepdapo.stages.states import SCHEMA as STATES_SCHEMA
from stepdapo.stages.states import unique_states
from stepdapo.tasks.math import MathConfig, MathTask

pytestmark = pytest.mark.skipif(not GGUF.is_file(), reason=f"SmolLM2 not found at {GGUF}: run ../shared/tools/get-smollm2")
IM_START, IM_END, ENDOFTEXT = 1, 2, 0


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GGUF)  # the tokenizer only (GGUF metadata), ~5 s


@pytest.fixture(scope="module")
def is_delim(tok):
    return delimiter_token_mask(tok, "\n")


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def steps_of(tok, is_delim, text):
    ids = ids_of(tok, text)
    ends = split_steps(ids, is_delim)
    return [tok.decode(ids[a:b]) for a, b in zip([0] + ends[:-1], ends)]


def tiny_llama(tok, cls=LlamaForCausalLM, **kw):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=IM_START, eos_token_id=IM_END, **kw)
    return cls(config).eval()


def edited_copy(tok, d, edit):
    """SmolLM2's tokenizer saved to `d` with `edit(tokenizer_config)` applied, beside a tiny model
    config (load_tokenizer wants an HF model directory)."""
    tok.save_pretrained(d)
    tiny_llama(tok).config.save_pretrained(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    edit(cfg)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


# -- the tokenizer as loaded --------------------------------------------------------------------

def test_smollm2_tokenizer_as_the_code_sees_it(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (IM_START, IM_END, IM_END)
    assert tok.padding_side == "left"
    assert chat_turn_end_id(tok) == IM_END
    assert end_token_ids(tok) == [IM_END]


# -- step delimiters ----------------------------------------------------------------------------

def test_delimiter_inside_larger_tokens_ends_a_step(tok, is_delim):
    merged = {t: tok.convert_tokens_to_ids(t) for t in ("Ċ", "ĊĊ", "ĠĊ", "ĊĠĠĠ", "čĊ")}  # \n \n\n " \n" "\n   " \r\n
    assert all(is_delim[i] for i in merged.values()), merged
    assert int(is_delim.sum()) > 100  # SmolLM2 has 129 tokens that hold a newline
    for special in (IM_START, IM_END, ENDOFTEXT):
        assert not is_delim[special]
    # " \n" is one token here: the step ends after it, the space before the newline included
    ids = ids_of(tok, "x = 3 \n y = 4")
    assert tok.convert_ids_to_tokens(ids).count("ĠĊ") == 1
    assert steps_of(tok, is_delim, "x = 3 \n y = 4") == ["x = 3 \n", " y = 4"]
    # indentation merged into the newline token stays with the step before it (but for the space
    # that GPT-2-style pre-tokenizers keep with the next word)
    assert steps_of(tok, is_delim, "def f():\n    return 1\n") == ["def f():\n   ", " return 1\n"]


def test_blank_lines_make_no_empty_steps(tok, is_delim):
    """SmolLM2 writes "7.\\n\\nThen" as ".", "\\n", "\\n", "Then": a lone "\\n" would be a step (a
    state whose action is an empty line) without the run rule of split_steps."""
    assert tok.convert_ids_to_tokens(ids_of(tok, "So 3+4=7.\n\nThen"))[-3:] == ["Ċ", "Ċ", "Then"]
    assert steps_of(tok, is_delim, "So 3+4=7.\n\nThen 7*2=14.\n\n\nThe answer is 14.") == [
        "So 3+4=7.\n\n", "Then 7*2=14.\n\n\n", "The answer is 14."]
    assert steps_of(tok, is_delim, "\n\nFirst.\nSecond.") == ["\n\nFirst.\n", "Second."]  # leading blank lines
    assert steps_of(tok, is_delim, "\n\n") == ["\n\n"]


def _texts():
    """Worked solutions as a policy writes them: GSM8K's, MATH-500's (LaTeX, [asy] blocks, blank
    lines), and some made-up layouts."""
    texts = ["a\n\nb", "a \n b\n", "line\r\nnext\r\n\r\nlast", "x:\n  - y\n  - z\n\n\nEnd.", "a\n \n b", "$$\n\\boxed{7}\n$$"]
    for path in (DATA / "train.jsonl", DATA.parent / "math500" / "test.jsonl"):
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines()[:60]]
            texts += [r.get("solution") or r["answer"] for r in rows]
    return texts


def test_steps_are_the_non_blank_lines(tok, is_delim):
    """On real text, with "\\n" as the delimiter: the steps put back together are the text; each
    step holds exactly one non-blank line (its trailing blank lines and indentation with it)."""
    texts = _texts()
    assert len(texts) > 100
    for text in texts:
        assert tok.decode(ids_of(tok, text)) == text
        steps = steps_of(tok, is_delim, text)
        assert "".join(steps) == text
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        assert [s.strip() for s in steps if s.strip()] == lines, text[:200]
        assert all(s.strip() for s in steps[:-1]), (text[:200], steps)  # no whitespace-only step
    # what the rule cannot see (it knows delimiter tokens, not whitespace): a space token that is
    # not a delimiter before a newline at the start of a text counts as content
    assert steps_of(tok, is_delim, " \n \nq") == [" \n \n", "q"]


def test_delimiter_split_across_tokens_is_refused(tok):
    """"\\n\\n" is never one token in "a.\\n\\nb" here, so it would end no step: every solution one
    step, no states, nothing learnt. The states stage and the plan refuse it, saying why."""
    check_step_delimiter(tok, "\n")
    with pytest.raises(ConfigError, match="across several tokens"):
        check_step_delimiter(tok, "\n\n")


def test_plan_refuses_a_split_delimiter(tok):
    if not (DATA / "train.jsonl").is_file():
        pytest.skip(f"GSM8K data not found at {DATA}")
    from stepdapo.config import load_config
    from stepdapo.plan import make_plan

    cfg = load_config(None, ["task.name=gsm8k", f"task.gsm8k.train={DATA / 'train.jsonl'}",
                             f"task.gsm8k.test={DATA / 'test.jsonl'}", "states.n_problems=5", "eval.limit=5",
                             "task.gsm8k.step_delimiter=\"\\n\\n\""])
    assert cfg.task.gsm8k.step_delimiter == "\n\n"
    with pytest.raises(ConfigError, match="across several tokens"):
        make_plan(cfg, tokenizer=tok, params=134_515_008)


# -- chat-template tokens in prompts and states --------------------------------------------------

def math_task(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"problem": "What is 3*4?", "answer": "12"}) + "\n")
    return MathTask(MathConfig(train=str(path), test=str(path), question_field="problem"), name="math")


def test_chat_prompt_tokens(tok, tmp_path):
    task = math_task(tmp_path)
    problem = task.problems("train")[0]
    text = task.prompt(problem, tok)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    [ids] = encode_prompts(tok, [text])
    templated = tok.apply_chat_template([{"role": "user", "content": task.user_message(problem)}],
                                        tokenize=True, add_generation_prompt=True)
    templated = templated["input_ids"] if not isinstance(templated, list) else templated
    assert ids == list(templated)  # the template's tokens as single special tokens, no doubled BOS
    assert ids[0] == IM_START and ids.count(IM_START) == 3 and ids.count(IM_END) == 2
    assert tok.decode(ids) == text


def test_prompts_encode_the_same_in_one_batch_as_one_by_one(tok, tmp_path):
    """encode_prompts tokenizes a list in batched calls; a batch mixing templated prompts (which carry
    their BOS) and plain ones (which get the tokenizer's) gives each the ids it gets alone."""
    task = math_task(tmp_path)
    templated = task.prompt(task.problems("train")[0], tok)
    texts = [templated, "What is 3*4?\n", templated + "Let", "", "  spaced  \n\n"]
    bos = tok.bos_token
    one_by_one = [tok(t, add_special_tokens=not (bos and t.startswith(bos)))["input_ids"] for t in texts]
    assert encode_prompts(tok, texts) == one_by_one
    assert encode_prompts(tok, []) == []


def test_states_keep_the_prompt_whole_and_export_its_template(tok, is_delim, tmp_path):
    """The prompt holds newlines and <|im_end|> (the pad and EOS token); states cut only the
    solution; the TRL export's prompt is the text the policy saw, template tokens included."""
    task = math_task(tmp_path)
    problem = task.problems("train")[0]
    [prompt] = encode_prompts(tok, [task.prompt(problem, tok)])
    solution = ids_of(tok, "3*4 = 12.\n\nSo the answer is 12.\n\\boxed{12}") + [IM_END]
    ends = split_steps(solution, is_delim)
    assert len(ends) == 3 and ends[-1] == len(solution)
    row = {"problem_id": problem.id, "sample_index": 0, "prompt_ids": prompt, "solution_ids": solution,
           "step_ends": ends, "text": tok.decode(solution, skip_special_tokens=True), "correct": True,
           "finish": "eos", "logprob": -1.0, "problem_n_correct": 1}
    solutions = pa.Table.from_pylist([row], schema=STATES_SCHEMA)
    states = unique_states(solutions)
    assert [s["ids"] for s in states] == [prompt] + [prompt + solution[:e] for e in ends[:-1]]
    assert all(s["prompt_len"] == len(prompt) for s in states)
    assert tok.decode(states[1]["ids"]) == task.prompt(problem, tok) + "3*4 = 12.\n\n"

    labels = pa.table({"ids": [s["ids"] for s in states[1:]], "mc": [1.0, 1.0]})
    export_stepwise(solutions, labels, task, tok, tmp_path / "stepwise.parquet")
    [out] = pq.read_table(tmp_path / "stepwise.parquet").to_pylist()
    assert out["prompt"] == task.prompt(problem, tok)  # "<|im_start|>system\n...": re-tokenizes to `prompt`
    assert encode_prompts(tok, [out["prompt"]])[0] == prompt
    assert out["completions"] == ["3*4 = 12.\n\n", "So the answer is 12.\n", "\\boxed{12}"]


# -- EOS and end of turn ------------------------------------------------------------------------

def test_eos_ends_the_last_step(tok, is_delim):
    """<|im_end|> is part of the last step (a terminal action); after a final newline it is a step
    of its own: the decision to end the turn, scored by the verifier."""
    sol = ids_of(tok, "4*3=12.\nThe answer is \\boxed{12}.") + [IM_END]
    assert split_steps(sol, is_delim)[-2:] == [len(ids_of(tok, "4*3=12.\n")), len(sol)]
    sol = ids_of(tok, "The answer is \\boxed{12}.\n") + [IM_END]
    assert split_steps(sol, is_delim) == [len(sol) - 1, len(sol)]


def test_end_of_turn_stops_where_eos_is_the_document_end(tok, tmp_path):
    """A tokenizer whose EOS is <|endoftext|> (a base model given the ChatML template) and a model
    without a generation config that names <|im_end|>: the template's end of turn still stops
    sampling, in both backends."""
    d = edited_copy(tok, tmp_path / "tok", lambda cfg: cfg.update(eos_token="<|endoftext|>"))
    (d / "generation_config.json").unlink(missing_ok=True)
    base = load_tokenizer(d)
    assert base.eos_token_id == ENDOFTEXT and base.chat_template
    assert end_token_ids(base) == [ENDOFTEXT, IM_END]
    model = tiny_llama(base)
    model.generation_config.eos_token_id = None
    assert HFGenerator(model, base, progress=False).eos_ids.tolist() == [ENDOFTEXT, IM_END]
    assert _eos_ids(base, d) == [ENDOFTEXT, IM_END]  # the vLLM backend's stop tokens (no generation_config.json)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END, 5]}))
    assert _eos_ids(base, d) == [ENDOFTEXT, IM_END, 5]


# -- padding --------------------------------------------------------------------------------------

def chat_prompts(tok, tmp_path):
    task = math_task(tmp_path)
    p = task.problems("train")[0]
    texts = [task.prompt(p, tok), task.prompt(p, tok).replace("What is 3*4?", "What is 3*4, plus the square of 5?")]
    prompts = encode_prompts(tok, texts)
    assert all(IM_END in x[:-1] for x in prompts)  # the pad token sits inside every prompt
    assert len(prompts[0]) != len(prompts[1])
    return prompts


def test_generation_left_padding_with_the_pad_token_inside_prompts(tok, tmp_path):
    """Batched (left-padded) greedy samples equal each prompt's own, whatever padding_side says:
    attention masks come from the lengths, not from `ids != pad_token_id`."""
    prompts = chat_prompts(tok, tmp_path)
    model = tiny_llama(tok)
    params = SamplingParams(temperature=0, max_new_tokens=6)
    alone = [HFGenerator(model, tok, progress=False).generate([p], 1, params)[0][0] for p in prompts]
    for side in ("left", "right"):
        tok.padding_side = side
        try:
            both = HFGenerator(model, tok, progress=False).generate(prompts, 1, params)
        finally:
            tok.padding_side = "left"
        for a, [b] in zip(alone, both):
            assert a.token_ids == b.token_ids
            assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)


def test_logprobs_padding_with_the_pad_token_inside_prompts(tok, tmp_path):
    prompts = chat_prompts(tok, tmp_path)
    completions = [ids_of(tok, "3*4 = 12.\n"), ids_of(tok, "The answer is 37.\n\n") + [IM_END]]
    model = tiny_llama(tok)
    with torch.no_grad():
        manual = []
        for p, c in zip(prompts, completions):
            logits = model(input_ids=torch.tensor([p + c])).logits[0].float().log_softmax(-1)
            manual.append(sum(logits[len(p) - 1 + j, t].item() for j, t in enumerate(c)))
        for shared in (False, True):
            got = sequence_logprobs(model, prompts, completions, tok.pad_token_id, shared_prefix=shared)
            assert got.tolist() == pytest.approx(manual, abs=1e-4)


def test_critic_right_padding_with_the_pad_token_inside_states(tok, tmp_path):
    """The critic's head reads the last token that is not the pad token; <|im_end|> inside a state
    must not move it (transformers takes the rightmost non-pad token; batches pad on the right)."""
    prompts = chat_prompts(tok, tmp_path)
    states = [prompts[0] + ids_of(tok, "3*4 = 12.\n"), prompts[1]]
    critic = tiny_llama(tok, LlamaForSequenceClassification, num_labels=1, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        manual = [torch.sigmoid(critic(input_ids=torch.tensor([s])).logits[0, 0]).item() for s in states]
    assert critic_values(critic, states, tok.pad_token_id) == pytest.approx(manual, abs=1e-5)
    sa = [states[0] + ids_of(tok, "So 12."), states[0] + ids_of(tok, "Hence\n")]  # s + a_j on s's cache
    with torch.no_grad():
        manual = [torch.sigmoid(critic(input_ids=torch.tensor([s])).logits[0, 0]).item() for s in sa]
    assert critic_values(critic, sa, tok.pad_token_id, prefix_lens=[len(states[0])] * 2) == pytest.approx(manual, abs=1e-5)


# -- a tokenizer without a pad token -------------------------------------------------------------

def test_tokenizer_without_pad_token(tok, tmp_path):
    """Llama 3.1's tokenizer has no pad token: loading gives it EOS as pad, left padding, and
    batched generation works."""
    d = edited_copy(tok, tmp_path / "nopad", lambda cfg: cfg.pop("pad_token", None))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(d).pad_token is None
    nopad = load_tokenizer(d)
    assert nopad.pad_token_id == nopad.eos_token_id == IM_END and nopad.padding_side == "left"
    prompts = chat_prompts(nopad, tmp_path)
    gen = HFGenerator(tiny_llama(nopad), nopad, progress=False)
    assert gen.pad_id == IM_END
    out = gen.generate(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=4, seed=0))
    assert [len(o) for o in out] == [2, 2] and all(1 <= len(s.token_ids) <= 4 for o in out for s in o)
    assert not re.search(r"<\|im_(start|end)\|>", "".join(s.text for o in out for s in o))
