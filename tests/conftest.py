"""Shared fixtures: tiny random models (fast, offline) and deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never reach a model hub: fail fast instead of waiting on network timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# No progress bars in the test output (tests/test_progress_and_warnings.py turns them back on where it checks them).
os.environ.setdefault("STEER_NO_PROGRESS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_llama():
    from steer.models import tiny_causal_lm

    return tiny_causal_lm("llama", seed=0)


@pytest.fixture
def tiny_gpt2():
    from steer.models import tiny_causal_lm

    return tiny_causal_lm("gpt2", seed=0)


@pytest.fixture
def steer_cache(tmp_path, monkeypatch):
    """An isolated STEER_CACHE for tests that convert models."""
    monkeypatch.setenv("STEER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def one_thread():
    """One intra-op thread (torch and BLAS/OpenMP pools): tiny ops run fastest and steadiest that way."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random llama saved as a model directory (for subprocess and multi-rank runs)."""
    from helpers.models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
