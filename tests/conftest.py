"""Shared fixtures. Tiny models come from tests/tiny.py; the real model is loaded once per session."""
from __future__ import annotations

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
