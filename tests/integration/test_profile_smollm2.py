"""The real bundled model, end to end through the profiler (small calibration set)."""
import pytest
import torch

from mi_opt.arch import get_adapter
from mi_opt.data import token_windows
from mi_opt.profile.ablation import AblationConfig, profile_ablation

pytestmark = pytest.mark.integration


def test_profile_smollm2(smollm2):
    model, tok = smollm2
    adapter = get_adapter(model)
    assert adapter.n_layers() == 30 and adapter.heads(0).n_heads == 9 and adapter.heads(0).n_kv_heads == 3
    windows = token_windows(tok, "handbook", 4, 32, seed=0)
    profile = profile_ablation(model, windows, AblationConfig(unit_kinds=("layer", "head"), batch_size=2,
                                                              ablations_per_forward=6), progress=False)
    assert len(profile.units("layer")) == 30 and len(profile.units("head")) == 270
    assert 1.0 < profile.base_loss < 6.0  # a trained model on English prose, not a random one
    layer_scores = torch.tensor([profile.score(k) for k in profile.units("layer")])
    # Removing a whole layer of a trained model matters far more in some layers than others,
    # and layer 0 (token embedding refinement) is among the critical ones in SmolLM2.
    assert layer_scores.max() > 5 * layer_scores.median().abs()
    assert profile.score("L0") > layer_scores.median()
    assert all(s.kl >= -1e-6 for s in profile.scores.values())


def test_bundled_model_cached_as_safetensors(smollm2):
    from mi_opt.models import cache_dir

    folder = cache_dir() / "models" / "smollm2-135m"
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
