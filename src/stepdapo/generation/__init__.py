"""Sampling from a policy: every stage that samples (evaluation, states, Monte-Carlo labels,
candidate actions) goes through `Generator.generate(prompts, n, params)` (generation/base.py), from
a backend in the table below, chosen by `generation.backend`:

    hf     our batched sampler on the HF model (generation/hf.py): any device, no extra install
    vllm   a vLLM engine (generation/vllm.py): much faster at real scale

A new backend is one file with a `make` function and one entry in `BACKENDS` (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from stepdapo.generation import hf, vllm
from stepdapo.generation.base import (
    Generator,
    Sample,
    SamplingParams,
    chat_turn_end_id,
    encode_prompts,
    end_token_ids,
)
from stepdapo.generation.hf import HFGenerator, hf_sampling_dtype
from stepdapo.generation.vllm import VLLMGenerator, vllm_generator
from stepdapo.precision import sampling_dtype

__all__ = ["BACKENDS", "Backend", "Generator", "HFGenerator", "Sample", "SamplingParams", "VLLMGenerator",
           "chat_turn_end_id", "encode_prompts", "end_token_ids", "hf_sampling_dtype", "policy_generator",
           "release_engine", "sampler_fingerprint", "vllm_generator"]


@dataclass(frozen=True)
class Backend:
    make: Callable[..., Generator]
    """make(policy, step_delimiter, engine, batch_size, progress) -> a Generator for the policy (an HF
    model directory) on this process's device; `engine` is the config's `generation` section."""
    release: Callable[[], None] = lambda: None
    """shut down what the backend keeps alive between stages (an engine holding GPU memory): called
    before every training stage and at the end of a run."""


BACKENDS: dict[str, Backend] = {
    "hf": Backend(make=hf.make),
    "vllm": Backend(make=vllm.make, release=vllm.release),
}


def policy_generator(policy, step_delimiter: str, batch_size: int, progress: bool = True,
                     generator: Generator | None = None, engine=None):
    """A function returning the sampler of the policy at `policy`, started on this process's device
    at the first call, so a process that gets no shard never loads the model: the backend that
    `engine` (the config's `generation` section; None: hf in float32) names. The path is checked
    now: a bad one is an error before any stage is marked started. A given `generator` (tests: a
    scripted policy) is returned instead."""
    from stepdapo.models import check_model_dir

    if generator is None:
        check_model_dir(policy)
    loaded: list[Generator] = [generator] if generator is not None else []

    def get() -> Generator:
        if not loaded:
            backend = BACKENDS[engine.backend if engine is not None else "hf"]
            loaded.append(backend.make(policy, step_delimiter, engine, batch_size, progress))
        return loaded[0]

    get.loaded = loaded  # whether (and what) it loaded: a summary may want its tokenizer
    return get


def release_engine() -> None:
    """Shut down whatever any backend keeps alive in this process (a vLLM engine); a no-op for hf."""
    for backend in BACKENDS.values():
        backend.release()


def sampler_fingerprint(engine) -> dict:
    """What of the `generation` section changes the samples (for the sampling stages' fingerprints;
    empty for the HF backend in float32, so runs made before the section existed still resume).
    The dtype as resolved here: a run resumed on a machine where "auto" means another precision
    samples its remaining shards afresh instead of mixing precisions."""
    dtype = sampling_dtype(engine.dtype)
    if engine.backend == "hf":
        return {} if dtype == "float32" else {"generation": {"dtype": dtype}}
    return {"generation": {"backend": engine.backend, "dtype": dtype}}
