"""heal_: healing moves the student toward the teacher, LoRA merges exactly, a killed heal resumes
to the same weights, and what can't heal is refused with one clear error."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny import FAMILIES, tiny_model, tiny_tokenizer
from transformers import TrainerCallback

from mi_opt.errors import MiOptError
from mi_opt.heal import HealConfig, check_compatible, heal_, kl_to_teacher, load_changed_, save_changed
from mi_opt.heal.distill import last_complete_checkpoint
from mi_opt.heal.lora import merge_lora_, wrap_lora
from mi_opt.plan import CompressionPlan
from mi_opt.surgery import apply_

SMALL = dict(steps=4, batch_size=2, seq_len=16, save_steps=2, local_steps=20, local_windows=4, lr=1e-3,
             local_lr=1e-3, source="kjv")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _pair(family="llama", drop=(1,), heads=None):
    teacher = tiny_model(family)
    student = copy.deepcopy(teacher)
    plan = CompressionPlan(model={"n_layers": 4}, drop_layers=list(drop), prune_heads=heads or {},
                           head_mode="free")
    apply_(student, plan)
    return student, teacher, plan


CASES = [(family, "local+distill", "all") for family in FAMILIES] + [
    ("llama", "local", "localized"), ("llama", "distill", "localized"), ("gpt2", "distill", "lora"),
    ("qwen2", "distill", "lora")]


@pytest.mark.parametrize("family, method, train", CASES)
def test_healing_lowers_the_kl_to_the_teacher(family, method, train, tokenizer):
    student, teacher, plan = _pair(family, heads={2: [0]})
    flags = [p.requires_grad for p in student.parameters()]
    record = heal_(student, teacher, plan, HealConfig(method=method, train=train, **SMALL), tokenizer, progress=False)
    kl = record.kl_to_teacher
    assert kl["after"] < kl["before"]
    assert kl_to_teacher(student, teacher, torch.randint(0, 512, (2, 16))) >= 0
    assert record.changed and [p.requires_grad for p in student.parameters()] == flags
    if method != "distill":
        assert all(b["relative_mse_after"] < b["relative_mse_before"] for b in record.local)


def test_localized_training_changes_only_the_layers_next_to_the_cut(tokenizer):
    student, teacher, plan = _pair(drop=(1,))
    before = {n: p.clone() for n, p in student.named_parameters()}
    record = heal_(student, teacher, plan, HealConfig(method="distill", train="localized", **SMALL), tokenizer,
                   progress=False)
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    # original layers 0 and 2 sit either side of the cut: student layers 0 and 1
    assert moved and moved <= {n for n in before if n.startswith(("model.layers.0.", "model.layers.1."))}
    assert set(record.changed) >= moved and record.trained["layers"] == [0, 1]


def test_lora_is_merged_into_plain_weights(tokenizer):
    student, teacher, plan = _pair(drop=(2,))
    before = {n: p.clone() for n, p in student.named_parameters()}
    record = heal_(student, teacher, plan, HealConfig(method="distill", train="lora", **SMALL), tokenizer,
                   progress=False)
    assert set(dict(student.named_parameters())) == set(before)  # no adapter modules left behind
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in student.modules())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert q in record.changed and not torch.equal(before[q], dict(student.named_parameters())[q])


def test_merged_lora_gives_the_adapters_logits():
    student, _, _ = _pair()
    wrapped = wrap_lora(student, ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"],
                         HealConfig(lora_rank=4))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with_adapters = wrapped(input_ids=ids).logits
        merge_lora_(wrapped, student)
        assert torch.allclose(student(input_ids=ids).logits, with_adapters, atol=1e-5)


class _KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt  # what SIGINT does mid-heal


@pytest.mark.parametrize("train", ["localized", "lora"])
def test_a_killed_heal_resumes_to_the_same_weights(train, tokenizer, tmp_path):
    config = HealConfig(method="distill", train=train, **{**SMALL, "steps": 6})
    whole, teacher, plan = _pair()
    heal_(whole, teacher, plan, config, tokenizer, work_dir=tmp_path / "a", progress=False)

    killed, teacher, plan = _pair()
    before = {n: p.clone() for n, p in killed.named_parameters()}
    with pytest.raises(KeyboardInterrupt):
        heal_(killed, teacher, plan, config, tokenizer, work_dir=tmp_path / "b", progress=False,
              callbacks=[_KillAt(3)])
    # interrupted in-process: the model is as it came (no adapters, no half-trained weights)
    assert {n: p for n, p in killed.named_parameters()}.keys() == before.keys()
    assert all(torch.equal(p, before[n]) and p.requires_grad == before[n].requires_grad
               for n, p in killed.named_parameters())
    assert last_complete_checkpoint(tmp_path / "b").name == "checkpoint-2"
    resumed, teacher, plan = _pair()
    record = heal_(resumed, teacher, plan, config, tokenizer, work_dir=tmp_path / "b", progress=False)
    assert record.distill["resumed_from_step"] == 2
    want = dict(whole.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.allclose(p, want[name], atol=1e-6, rtol=0), name


def test_a_checkpoint_half_written_by_a_kill_is_skipped(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()  # killed before trainer_state.json was written
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-2"
    assert not (tmp_path / "checkpoint-4").exists()


def test_healed_weights_round_trip(tokenizer, tmp_path):
    student, teacher, plan = _pair()
    record = heal_(student, teacher, plan, HealConfig(method="local", **SMALL), tokenizer, progress=False)
    save_changed(student, record.changed, tmp_path / "healed.safetensors", record.unhealed_fingerprint)
    fresh, _, _ = _pair()
    load_changed_(fresh, tmp_path / "healed.safetensors")
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, student(ids).logits)
    other, _, _ = _pair(drop=(1, 2))
    with pytest.raises(MiOptError, match="another plan"):
        load_changed_(other, tmp_path / "healed.safetensors")


def test_a_teacher_with_another_vocabulary_is_refused(tokenizer):
    import transformers as tf

    student, _, plan = _pair()
    config = tf.LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    other = tf.AutoModelForCausalLM.from_config(config)
    with pytest.raises(MiOptError, match="vocabulary"):
        heal_(student, other, plan, HealConfig(**SMALL), tokenizer, progress=False)
    renamed = copy.deepcopy(tokenizer)
    renamed.add_tokens(["<extra>"])
    with pytest.raises(MiOptError, match="tokenizer differs"):
        check_compatible(student, student, tokenizer, renamed)


@pytest.mark.parametrize("options, message", [
    ({"method": "retrain"}, "heal.method"), ({"train": "some"}, "heal.train"), ({"steps": 0}, "heal.steps"),
    ({"lr": 0.0}, "heal.lr"), ({"self_generated": 1.5}, "heal.self_generated"),
    ({"method": "local", "train": "lora"}, "heal.train 'lora'"), ({"schedule": "cyclic"}, "heal.schedule"),
    ({"radius": 0}, "heal.radius"), ({"warmup_steps": 5}, "heal.warmup_steps"),
    ({"adapters": "fold"}, "heal.adapters"), ({"adapters": "keep", "train": "all"}, "heal.adapters 'keep'"),
    ({"adapters": "keep", "method": "local"}, "heal.adapters 'keep'"),
])
def test_bad_heal_options_name_the_key(options, message):
    with pytest.raises(MiOptError, match=message):
        HealConfig(**options)


def test_nothing_to_heal_is_an_error(tokenizer):
    teacher = tiny_model("llama")
    plan = CompressionPlan(model={"n_layers": 4})
    with pytest.raises(MiOptError, match="nothing to heal"):
        heal_(copy.deepcopy(teacher), teacher, plan, HealConfig(**SMALL), tokenizer, progress=False)
    with pytest.raises(MiOptError, match="only quantizes"):
        heal_(copy.deepcopy(teacher), teacher, plan, HealConfig(method="local", **SMALL), tokenizer, progress=False)


def test_a_quantized_plan_heals_through_adapters_and_stays_quantized(tokenizer, tmp_path):
    from mi_opt.export import export, load_compressed
    from mi_opt.surgery.quantize import quantized_modules

    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    plan = CompressionPlan(model={"n_layers": 4}, bits={"L0": 4, "L1": 8, "L2.mlp.down_proj": 4})
    apply_(student, plan)
    widths = quantized_modules(student)
    with pytest.raises(MiOptError, match="cannot train quantized weights"):
        heal_(student, teacher, plan, HealConfig(train="all", **SMALL), tokenizer, progress=False)
    # lr 3e-3: 1e-2 overshot on one machine's kernels (KL 0.027 -> 0.079); 3e-3 gave 0.027 -> 0.022 there.
    record = heal_(student, teacher, plan, HealConfig(method="distill", train="localized", **{**SMALL, "lr": 3e-3}),
                   tokenizer, progress=False)
    assert record.trained["kind"] == "lora" and len(record.trained["modules"]) == len(widths)
    assert record.kl_to_teacher["after"] < record.kl_to_teacher["before"]
    assert quantized_modules(student) == widths  # merged, re-quantized at the same widths
    save_changed(student, record.changed, tmp_path / "healed.safetensors", record.unhealed_fingerprint)
    fresh = copy.deepcopy(teacher)
    apply_(fresh, plan)
    load_changed_(fresh, tmp_path / "healed.safetensors")
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, student(ids).logits, atol=1e-4)
    export(student, None, plan, tmp_path / "out", heal=record)  # verified by reload inside
    from mi_opt.export import reference_logits, stored_parameters

    with torch.no_grad():
        assert load_compressed(tmp_path / "out")(ids).logits.dtype == torch.bfloat16  # as stored, and it runs
        # fp32 compute and the student's attention implementation: sdpa against eager differs by 2e-3 here
        reloaded = load_compressed(tmp_path / "out", dtype="fp32", attn_implementation="eager")
        want = reference_logits(student, ids, stored_parameters(student, torch.bfloat16))
        assert torch.allclose(reloaded(ids).logits, want, atol=1e-3)


def test_a_combined_plan_heals_its_damaged_layers_through_adapters(tokenizer):
    from mi_opt.surgery.quantize import quantized_modules

    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    plan = CompressionPlan(model={"n_layers": 4}, drop_layers=[1], bits={"L0": 8, "L2": 4, "L3": 4})
    apply_(student, plan)
    widths = quantized_modules(student)
    record = heal_(student, teacher, plan, HealConfig(method="distill", **{**SMALL, "lr": 1e-2}), tokenizer,
                   progress=False)
    assert record.trained["kind"] == "lora" and record.trained["layers"] == [0, 1]
    assert all(m.startswith(("model.layers.0.", "model.layers.1.")) for m in record.trained["modules"])
    assert quantized_modules(student) == widths
    assert record.kl_to_teacher["after"] < record.kl_to_teacher["before"]
    assert "quantized again" in " ".join(record.summary())


@pytest.mark.parametrize("plan_kw, config_kw, message", [
    ({"drop_layers": [1]}, {"hidden_weight": 1.0, "method": "distill"}, None),
    ({"bits": {"L0": 8}}, {"hidden_weight": 1.0}, "hidden_weight"),
    ({"drop_layers": [1], "model": {"n_layers": 5}}, {}, "5-layer model"),
])
def test_a_heal_that_cannot_mean_anything_is_refused(plan_kw, config_kw, message, tokenizer):
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    plan = CompressionPlan(**{"model": {"n_layers": 4}, **plan_kw})
    apply_(student, CompressionPlan(**{**plan_kw, "model": {"n_layers": 4}}))
    if message is None:  # the unrefused twin: hidden-state matching at a cut is fine
        heal_(student, teacher, plan, HealConfig(**{**SMALL, **config_kw}), tokenizer, progress=False)
        return
    with pytest.raises(MiOptError, match=message):
        heal_(student, teacher, plan, HealConfig(**{**SMALL, **config_kw}), tokenizer, progress=False)


def test_a_student_the_plan_did_not_make_is_refused(tokenizer):
    teacher = tiny_model("llama")
    plan = CompressionPlan(model={"n_layers": 4}, drop_layers=[1, 2])
    with pytest.raises(MiOptError, match="plan leaves 2"):
        heal_(copy.deepcopy(teacher), teacher, plan, HealConfig(**SMALL), tokenizer, progress=False)
