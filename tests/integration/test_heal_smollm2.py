"""SmolLM2 end to end with recovery: drop layers, heal toward the original, export, reload."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from mi_opt.data import token_windows
from mi_opt.export import export, reference_logits, stored_parameters
from mi_opt.heal import HealConfig, heal_
from mi_opt.policy import make_plan
from mi_opt.profile.scorers import SCORERS
from mi_opt.surgery import apply_


@pytest.mark.integration
def test_a_layer_dropped_smollm2_heals_and_exports_a_plain_checkpoint(smollm2, tmp_path):
    teacher, tokenizer = smollm2
    scorer = SCORERS.get("block_influence")
    profile = scorer(teacher, token_windows(tokenizer, "handbook", 4, 64), scorer.make_config({}), progress=False,
                     model_spec="smollm2-135m")
    plan = make_plan(profile, "layer-skip", {"n_drop": 6, "protect_first": 1, "protect_last": 1}, teacher)
    student = copy.deepcopy(teacher)
    apply_(student, plan)
    # A small budget, as a check of the real model's path, not of how much it recovers
    # (benchmarks/recovery.py measures that).
    config = HealConfig(method="local+distill", steps=2, batch_size=2, seq_len=64, eval_seq_len=64, local_steps=5,
                        local_windows=4, lr=3e-4, local_lr=1e-4)
    record = heal_(student, teacher, plan, config, tokenizer, work_dir=tmp_path / "work", progress=False)
    assert record.kl_to_teacher["after"] < record.kl_to_teacher["before"]
    assert all(b["relative_mse_after"] < b["relative_mse_before"] for b in record.local)
    out = export(student, tokenizer, plan, tmp_path / "healed", heal=record)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.bfloat16  # as stored
    exact = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                 attn_implementation=student.config._attn_implementation).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    want = reference_logits(student, ids, stored_parameters(student, torch.bfloat16))
    with torch.no_grad():
        assert torch.allclose(exact(ids).logits, want, atol=1e-4)
        text = reloaded.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert text.shape[1] > ids.shape[1]
    assert (out / "heal.json").exists() and "Healed after compression" in (out / "README.md").read_text()
