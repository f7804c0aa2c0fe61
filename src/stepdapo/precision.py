"""Precision chosen for the hardware: what `bf16: auto` and `generation.dtype: auto` become.

bf16 pays only where the hardware computes it natively: a CUDA device that supports it, or a CPU
with AMX or AVX512-BF16. Elsewhere (an AVX2-only CPU) torch emulates it and a 135M model's SFT step
took 133 s instead of 6.5 s in float32 (issue 21), so `auto` means float32 there. The choice is made
once per process, from the device the stages run on (CUDA when present, else the CPU), and logged
by the pipeline and kept in its report.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

import torch


def _cpuinfo(field: str) -> str | None:
    """The first `field` line's value in /proc/cpuinfo (None where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(field)), None)


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return set((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name, for the machine line of measured numbers."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _cpu_has(probe: str, flag: str) -> bool:
    """torch's own probe of an instruction set (it knows what its kernels use), else the flag."""
    fn = getattr(torch.cpu, probe, None)
    if fn is not None:
        try:
            return bool(fn())
        except Exception:  # noqa: BLE001 - a private probe; fall back to the kernel's flags
            pass
    return flag in _cpu_flags()


@lru_cache(maxsize=None)
def fast_bf16() -> tuple[bool, str]:
    """(whether this process's compute device has fast bf16, why in words)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"CUDA device {name} supports bf16"
        return False, f"CUDA device {name} has no native bf16"
    if _cpu_has("_is_amx_tile_supported", "amx_bf16"):
        return True, "the CPU has AMX"
    if _cpu_has("_is_avx512_bf16_supported", "avx512_bf16"):
        return True, "the CPU has AVX512-BF16"
    return False, "the CPU has no bf16 instructions (neither AMX nor AVX512-BF16): bf16 would be emulated, many times slower"


def training_bf16(setting: bool | str) -> bool:
    """The run config's `bf16` (true, false or "auto") as the trainers use it."""
    return fast_bf16()[0] if setting == "auto" else bool(setting)


def sampling_dtype(setting: str) -> str:
    """`generation.dtype` ("auto", "float32", "bfloat16", "float16") as the samplers use it."""
    if setting == "auto":
        return "bfloat16" if fast_bf16()[0] else "float32"
    return setting


def describe(bf16: bool | str, generation_dtype: str) -> dict:
    """What the run's precision settings became on this machine, and why (for the log and report)."""
    ok, why = fast_bf16()
    return {"bf16": {"setting": bf16, "used": training_bf16(bf16), "why": why if bf16 == "auto" else "set in the config"},
            "generation_dtype": {"setting": generation_dtype, "used": sampling_dtype(generation_dtype),
                                 "why": why if generation_dtype == "auto" else "set in the config"}}


def autocast(bf16: bool, device):
    """A forward-only pass at the trainers' precision: bf16 autocast when they train under it (so a
    reference log-prob computed here is the one training computes, and the log-ratio starts at 0),
    a no-op otherwise."""
    import torch

    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bool(bf16))
