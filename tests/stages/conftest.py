"""Fixtures of the stage tests: one torch thread (the models are tiny) and the model stages' inputs."""

import pytest
import torch
from tiny_stages import make_inputs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: one thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny bootstrapped policy, and states, labels and Monte-Carlo advantages from a scripted
    policy (no sampling): every model stage's input, in a few seconds."""
    return make_inputs(tmp_path_factory.mktemp("inputs"))
