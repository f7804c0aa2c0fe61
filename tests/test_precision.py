"""`bf16: auto` / `generation.dtype: auto`: bf16 only where the device computes it natively."""

import pytest
import torch

from stepdapo import precision
from stepdapo.config import GenerationConfig, load_config


@pytest.fixture
def hardware(monkeypatch):
    """Pretend to be a machine with or without fast bf16."""
    def set_fast(fast: bool):
        precision.fast_bf16.cache_clear()
        monkeypatch.setattr(precision, "_cpu_has", lambda probe, flag: fast)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    yield set_fast
    precision.fast_bf16.cache_clear()


def test_auto_is_bf16_only_with_native_bf16(hardware):
    from stepdapo.generation import hf_sampling_dtype, sampler_fingerprint

    hardware(False)  # e.g. an AVX2-only CPU: emulated bf16, many times slower
    ok, why = precision.fast_bf16()
    assert not ok and "no bf16 instructions" in why
    assert precision.training_bf16("auto") is False and precision.sampling_dtype("auto") == "float32"
    assert hf_sampling_dtype(GenerationConfig(dtype="auto")) == torch.float32
    assert sampler_fingerprint(GenerationConfig(dtype="auto")) == {}  # as float32: old runs still resume
    hardware(True)  # AMX or AVX512-BF16
    assert precision.fast_bf16()[0] and "AMX" in precision.fast_bf16()[1]
    assert precision.training_bf16("auto") is True and precision.sampling_dtype("auto") == "bfloat16"
    assert hf_sampling_dtype(GenerationConfig(dtype="auto")) == torch.bfloat16
    # the fingerprint holds what "auto" became here: resumed where it means another dtype, the
    # sampling stages start afresh instead of mixing precisions
    assert sampler_fingerprint(GenerationConfig(dtype="auto")) == {"generation": {"dtype": "bfloat16"}}
    assert sampler_fingerprint(GenerationConfig(backend="vllm", dtype="auto"))["generation"]["dtype"] == "bfloat16"


def test_explicit_settings_are_kept_whatever_the_hardware(hardware):
    for fast in (False, True):
        hardware(fast)
        assert precision.training_bf16(True) is True and precision.training_bf16(False) is False
        assert precision.sampling_dtype("float32") == "float32" and precision.sampling_dtype("bfloat16") == "bfloat16"
        d = precision.describe(True, "float32")
        assert d["bf16"] == {"setting": True, "used": True, "why": "set in the config"}
        d = precision.describe("auto", "auto")
        assert d["bf16"]["used"] is fast and d["generation_dtype"]["used"] == ("bfloat16" if fast else "float32")
        assert d["bf16"]["why"] == precision.fast_bf16()[1]


def test_configs_choose_precision_for_the_hardware():
    """The shipped real-model configs say auto; the built-in default is float32 on every machine."""
    for path in ("configs/arithmetic-smollm2.yaml", "configs/gsm8k-smollm2.yaml", "configs/math-llama3.1-8b.yaml",
                 "configs/math-qwen2.5-math-1.5b.yaml"):
        cfg = load_config(path)
        assert cfg.bf16 == "auto", path
    assert load_config("configs/arithmetic-smollm2.yaml").generation.dtype == "auto"
    default = load_config("configs/arithmetic.yaml")
    assert default.bf16 is False and default.generation.dtype == "float32"
    assert load_config(None).bf16 is False and load_config(None).generation.dtype == "float32"
    assert load_config(None, ["bf16=auto"]).bf16 == "auto"
