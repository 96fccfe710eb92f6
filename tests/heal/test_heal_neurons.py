"""Healing a neuron-pruned model: the narrowed layers are damage sites, training keeps their new
shapes, and the healed model exports and reloads (also with its LoRA adapters kept unmerged)."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from mi_opt.export import export, load_compressed, reference_logits, stored_parameters
from mi_opt.heal import HealConfig, heal_
from mi_opt.heal.sites import damage_blocks
from mi_opt.plan import CompressionPlan
from mi_opt.surgery import apply_
from mi_opt.surgery.neurons import mlp_sizes

SMALL = dict(steps=4, batch_size=2, seq_len=16, save_steps=2, local_steps=20, local_windows=4, lr=1e-3,
             local_lr=1e-3, source="kjv")
IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(5))
PLAN = CompressionPlan(model={"n_layers": 4}, prune_neurons={1: list(range(40)), 3: list(range(0, 64, 2))},
                       neuron_mode="free", prune_heads={1: [0]}, head_mode="free")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _pair(family: str = "llama"):
    teacher = tiny_model(family)
    student = copy.deepcopy(teacher)
    apply_(student, PLAN)
    return student, teacher


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, use_cache=False).logits.float()


def test_neuron_pruned_layers_are_damage_sites():
    blocks = damage_blocks(PLAN, 4, radius=1)
    assert [(b.layers, b.why) for b in blocks] == [([1], "heads and MLP neurons of L1"), ([3], "MLP neurons of L3")]
    assert blocks[-1].teacher_point == 4  # the last layer's output


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_local_and_distill_heal_a_neuron_pruned_model_and_it_still_exports(family, tokenizer, tmp_path):
    student, teacher = _pair(family)
    sizes = mlp_sizes(student)
    record = heal_(student, teacher, PLAN, HealConfig(method="local+distill", train="localized", **SMALL), tokenizer,
                   progress=False)
    assert record.kl_to_teacher["after"] < record.kl_to_teacher["before"]
    assert all(b["relative_mse_after"] < b["relative_mse_before"] for b in record.local)
    assert mlp_sizes(student) == sizes  # healing changes weights, never shapes
    out = export(student, None, PLAN, tmp_path / "healed", heal=record)  # verified by its reload inside
    assert "MLP neurons of L3" in (out / "README.md").read_text()
    reloaded = load_compressed(out, dtype="fp32")
    want = reference_logits(student, IDS, stored_parameters(student, torch.bfloat16))
    torch.testing.assert_close(_logits(reloaded), want, atol=1e-5, rtol=1e-5)


def test_kept_lora_adapters_on_narrowed_mlps_reload(tokenizer, tmp_path):
    student, teacher = _pair()
    record = heal_(student, teacher, PLAN, HealConfig(method="distill", train="lora", adapters="keep", lr=1e-2,
                                                      **{k: v for k, v in SMALL.items() if k != "lr"}),
                   tokenizer, progress=False)
    assert record.trained["adapters"] == "kept"
    healed = _logits(student)
    out = export(student, None, PLAN, tmp_path / "kept", heal=record, dtype="fp32")
    reloaded = load_compressed(out)
    assert mlp_sizes(reloaded) == [64, 24, 64, 32]
    torch.testing.assert_close(_logits(reloaded), healed, atol=1e-4, rtol=1e-4)


def test_cli_heal_heals_a_free_neuron_checkpoint(tmp_path, capsys):
    from tiny import save_tiny

    from mi_opt.artifacts import model_fingerprint
    from mi_opt.cli import main
    from mi_opt.models import load_model

    folder = str(save_tiny(tmp_path / "model"))
    model, _ = load_model(folder)
    plan = CompressionPlan(model={"spec": folder, "fingerprint": model_fingerprint(model), "n_layers": 4},
                           prune_neurons=PLAN.prune_neurons, neuron_mode="free")
    plan.save(tmp_path / "plan.json")
    checkpoint, out = tmp_path / "ckpt", tmp_path / "healed"
    assert main(["apply", folder, str(tmp_path / "plan.json"), "--out", str(checkpoint)]) == 0
    options = {"source": "kjv", "batch_size": 2, "seq_len": 16, "local_steps": 10, "local_windows": 4,
               "local_lr": 1e-3}
    assert main(["heal", str(checkpoint), "--teacher", folder, "--out", str(out), "--method", "local",
                 *[f"--option={k}={v}" for k, v in options.items()]]) == 0
    assert "healed:" in capsys.readouterr().out
    healed = load_compressed(out)
    assert mlp_sizes(healed) == [64, 24, 64, 32]
    with torch.no_grad():
        assert not torch.equal(_logits(healed), _logits(load_compressed(checkpoint)))
