"""Shared fixtures: tiny models with seeded random weights; nothing here touches the network."""

from __future__ import annotations

import os

import pytest

# No test may reach the hub: loading code falls back or fails fast, never waits on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (tiny models step faster without synchronising threads at every small
    kernel); the previous count restored after. A module asks for it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny():
    """The tiny preset with seeded random weights, both kvlib's model and HF's, fp32 on CPU."""
    from kvlib.models.loading import load

    return load("tiny", weights="random", seed=0)


@pytest.fixture(scope="session")
def tiny_saved(tmp_path_factory, tiny):
    """A folder written by HF's save_pretrained: the real from_pretrained path loads it."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny.hf.save_pretrained(path)
    return path
