"""Where the tests find the real LM and data: SmolLM2-135M-Instruct (a GGUF from
../shared/tools/get-smollm2; `.ci/run` fetches it and sets STEPDAPO_SMOLLM2) and GSM8K in
../shared/data. Tests that need them carry `NEEDS_SMOLLM2` and are skipped, saying why, without."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "gsm8k"
GGUF = Path(os.environ.get("STEPDAPO_SMOLLM2", Path.home() / ".cache/stepdapo-test-models/smollm2-135m-instruct/"
                           "SmolLM2-135M-Instruct.Q4_1.gguf"))

NEEDS_SMOLLM2 = [
    pytest.mark.slow,
    pytest.mark.skipif(not GGUF.is_file(), reason=f"SmolLM2 not found at {GGUF}: run ../shared/tools/get-smollm2"),
    pytest.mark.skipif(not DATA.is_dir(), reason=f"GSM8K data not found at {DATA}"),
]
