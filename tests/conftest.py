"""Shared fixtures. Tiny models come from tests/tiny.py; the real model is loaded once per session."""
from __future__ import annotations

import os

# Tests never reach a model hub: everything they load is built here or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the bundled SmolLM2-135M, fp32 on CPU. Converted once into the cache."""
    from mi_opt.models import load_model

    return load_model("smollm2-135m")
