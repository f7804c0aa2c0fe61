import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# 2 threads (CI); STEPDAPO_TEST_THREADS=1 when two suites share a 2-core machine (OpenMP spin-waits)
torch.set_num_threads(int(os.environ.get("STEPDAPO_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory):
    """A quickly bootstrapped tiny model (a few seconds of SFT): writes well-formed multi-step
    solutions, which the generation tests need; not as accurate as the default bootstrap."""
    from stepdapo.config import load_config
    from stepdapo.stages.bootstrap import bootstrap

    out = tmp_path_factory.mktemp("models") / "small"
    cfg = load_config(None, ["task.arithmetic.n_demos=10000", "bootstrap.batch_size=64",
                            "bootstrap.max_rounds=1", "bootstrap.check_problems=100"])
    bootstrap(cfg, out, progress=False)
    return out
