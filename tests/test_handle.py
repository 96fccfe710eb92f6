import torch
from tiny import tiny_model

from mi_opt.artifacts import model_fingerprint
from mi_opt.handle import LoadedModel, model_summary, parameter_count
from mi_opt.profile.ablation import AblationConfig, profile_ablation


def test_info_is_computed_once_and_refreshed_after_an_edit():
    model = tiny_model("llama")
    loaded = LoadedModel(model, spec="tiny")
    info = loaded.info
    assert loaded.info is info and info.fingerprint == model_fingerprint(model)
    assert info.family == "llama" and info.n_layers == 4 and info.dtype == "float32"
    assert loaded.input_device == torch.device("cpu")
    assert info.summary() == model_summary(model, None, "tiny")
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    assert loaded.changed().info.fingerprint != info.fingerprint


def test_a_scorer_takes_the_handle():
    model = tiny_model("llama")
    windows = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    config = AblationConfig(unit_kinds=("layer",), batch_size=2)
    bare = profile_ablation(model, windows, config, model_spec="tiny", progress=False)
    handled = profile_ablation(LoadedModel(model, spec="tiny"), windows, config, model_spec="tiny", progress=False)
    assert bare.model == handled.model and bare.scores == handled.scores


def test_parameter_count_counts_weights_not_storage():
    model = tiny_model("llama")
    assert parameter_count(model) == sum(p.numel() for p in model.parameters())


def test_parameter_count_sees_through_packed_4bit():
    from mi_opt.surgery.quantize import quantize_

    model = tiny_model("llama")
    before = parameter_count(model)
    quantize_(model, {"L0": 4, "L1": 8})
    assert parameter_count(model) == before
    assert sum(p.numel() for p in model.parameters()) < before  # what export and apply used to print


def test_perplexity_speed_and_heal_take_the_handle():
    import copy

    import pytest
    from tiny import tiny_tokenizer

    from mi_opt.errors import MiOptError
    from mi_opt.evaluate.config import SpeedConfig
    from mi_opt.evaluate.perplexity import perplexity
    from mi_opt.evaluate.speed import measure_speed
    from mi_opt.heal import HealConfig, heal_
    from mi_opt.plan import CompressionPlan
    from mi_opt.surgery import apply_

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    handle = LoadedModel(model, tokenizer, spec="tiny")
    bare = perplexity(model, tokenizer, "handbook", n_samples=2, seq_len=16, progress=False)
    assert perplexity(handle, source="handbook", n_samples=2, seq_len=16, progress=False) == bare
    with pytest.raises(MiOptError, match="perplexity needs the tokenizer"):
        perplexity(model, source="handbook", n_samples=2, seq_len=16, progress=False)
    speed = measure_speed(handle, SpeedConfig(prompt_len=8, new_tokens=3, warmup=0, repetitions=1), progress=False)
    assert speed["parameters"] == parameter_count(model)

    plan = CompressionPlan(model={"n_layers": 4}, drop_layers=[1])
    student = LoadedModel(apply_(copy.deepcopy(model), plan), tokenizer)
    config = HealConfig(method="distill", train="all", steps=2, batch_size=2, seq_len=16, lr=1e-3)
    record = heal_(student, handle, plan, config, progress=False)  # the tokenizer comes with the handles
    assert record.kl_to_teacher["after"] < record.kl_to_teacher["before"]
