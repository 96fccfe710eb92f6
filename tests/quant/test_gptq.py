"""GPTQ for GGUF's Q4_0 / Q5_0: the column updates equal the Optimal Brain Surgeon reference, the
outputs move less than round-to-nearest's, and what it writes is a fixed point of the writer."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from mi_opt.errors import MiOptError
from mi_opt.quant.gptq import DAMP, _round, _scales, gptq_quantize


def _problem(rows=6, cols=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen, dtype=torch.float64)
    x = torch.randn(400, cols, generator=gen, dtype=torch.float64) @ mix  # correlated inputs: where GPTQ matters
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64), x, x.T @ x


def _reference(w, h, kind):
    """Optimal Brain Surgeon, one column at a time, the inverse Hessian of the columns still free
    recomputed from scratch at every step (no Cholesky, no lazy batches)."""
    bits = {"Q4_0": 4, "Q5_0": 5}[kind]
    w = w.clone()
    h = h + DAMP * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
    out = torch.zeros_like(w)
    for j in range(w.shape[1]):
        if j % 32 == 0:
            d, pin = _scales(w[:, j:j + 32].float(), bits)
            d, pin = d.double(), pin + j
        out[:, j] = _round(w[:, j], d, bits, pin == j)
        inv = torch.linalg.inv(h[j:, j:])  # the free columns' inverse Hessian
        w[:, j:] -= ((w[:, j] - out[:, j]) / inv[0, 0])[:, None] * inv[0][None, :]
    return out


@pytest.mark.parametrize("kind", ["Q4_0", "Q5_0"])
def test_the_columns_follow_the_obs_reference(kind):
    w, _, h = _problem(cols=160)  # more than one lazy batch of 128 columns
    got, want = gptq_quantize(w, h, kind).double(), _reference(w, h, kind)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["Q4_0", "Q5_0"])
def test_outputs_move_less_than_round_to_nearest(kind):
    w, x, h = _problem(rows=16, cols=128, seed=1)
    qtype = gguf.GGMLQuantizationType[kind]
    rtn = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.float().numpy(), qtype), qtype)).double()
    err = lambda q: float(((x @ (w - q).T) ** 2).sum())  # noqa: E731
    assert err(gptq_quantize(w, h, kind).double()) < 0.7 * err(rtn)


@pytest.mark.parametrize("kind", ["Q4_0", "Q5_0"])
def test_the_writer_quantizing_it_again_gives_it_back_bit_for_bit(kind):
    w, _, h = _problem(rows=32, cols=96, seed=2)
    q = gptq_quantize(w, h, kind).numpy()
    qtype = gguf.GGMLQuantizationType[kind]
    assert np.array_equal(gguf.quants.dequantize(gguf.quants.quantize(q, qtype), qtype).reshape(q.shape), q)


def test_bad_inputs_are_clear_errors():
    w, _, h = _problem()
    with pytest.raises(MiOptError, match="Q8_0 is quantized round-to-nearest"):
        gptq_quantize(w, h, "Q8_0")
    with pytest.raises(MiOptError, match="rows of a multiple of 32"):
        gptq_quantize(w[:, :40], h[:40, :40], "Q4_0")
    from mi_opt.formats.gguf_types import GgufOptions

    with pytest.raises(MiOptError, match="gguf quantizer 'awq': use one of rtn, gptq"):
        GgufOptions(quantizer="awq")


def test_a_gptq_gguf_export_ships_what_apply_gguf_evaluates(tmp_path):
    from transformers import AutoModelForCausalLM

    from mi_opt.export import SIDECAR, export
    from mi_opt.formats.gguf import apply_gguf_, apply_structure_
    from mi_opt.formats.gguf_types import GgufOptions
    from mi_opt.plan import CompressionPlan

    tokenizer = tiny_tokenizer()
    plan = CompressionPlan(model={"spec": "tiny", "n_layers": 4}, backend="gguf", quant_type="Q4_0",
                           bits={**{f"L{i}": 4 for i in range(4)}, **{f"L{i}.self_attn.v_proj": 5 for i in range(4)}})
    from gguf_vocab import save_vocab_gguf

    options = GgufOptions(quantizer="gptq", calibration_windows=4,
                          vocab_from=save_vocab_gguf(tmp_path / "vocab.gguf", tokenizer))
    model = apply_structure_(tiny_model("llama"), plan)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = export(model, tokenizer, plan, tmp_path / "g", format="gguf", gguf=options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is left alone
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["gguf"]["quantizer"] == "gptq" and sidecar["verified_max_logit_diff"] <= 1e-4
    assert "GPTQ" in (out / "README.md").read_text() and isinstance(sidecar["gguf"]["gptq_kept"], list)
    shipped = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).state_dict()
    evaluated = tiny_model("llama")
    apply_gguf_(evaluated, plan, options, tokenizer)
    for name, p in evaluated.named_parameters():
        torch.testing.assert_close(shipped[name], p.detach(), atol=1e-6, rtol=0)
    rtn = tiny_model("llama")
    apply_gguf_(rtn, plan, GgufOptions())
    assert not torch.equal(rtn.model.layers[0].mlp.up_proj.weight, evaluated.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(MiOptError, match="gptq needs the tokenizer"):
        apply_gguf_(tiny_model("llama"), plan, options)


def test_an_export_of_applied_gguf_weights_writes_them_without_a_second_gptq_pass(tmp_path, monkeypatch):
    # A recipe evaluates apply_gguf_'s weights, then exports them: GPTQ (Hessians and a pass over
    # every linear) ran twice for one result before.
    import mi_opt.formats.gguf as gguf_format
    from gguf_vocab import save_vocab_gguf

    from mi_opt.export import SIDECAR, export
    from mi_opt.formats.gguf import apply_gguf_
    from mi_opt.formats.gguf_types import GgufOptions
    from mi_opt.plan import CompressionPlan

    tokenizer = tiny_tokenizer()
    plan = CompressionPlan(model={"spec": "tiny", "n_layers": 4}, backend="gguf", quant_type="Q4_0",
                           bits={f"L{i}": 4 for i in range(4)})
    options = GgufOptions(quantizer="gptq", calibration_windows=4,
                          vocab_from=save_vocab_gguf(tmp_path / "vocab.gguf", tokenizer))
    fresh = export(tiny_model("llama"), tokenizer, plan, tmp_path / "fresh", format="gguf", gguf=options)
    model = tiny_model("llama")
    applied = apply_gguf_(model, plan, options, tokenizer)
    assert "gptq" in applied.quantizer_choice.values()

    def no_second_pass(*args, **kwargs):
        raise AssertionError("GPTQ ran again")

    monkeypatch.setattr(gguf_format, "gptq_for_gguf_", no_second_pass)
    out = export(model, tokenizer, plan, tmp_path / "applied", format="gguf", gguf=options, gguf_applied=applied)
    assert (out / "model.gguf").read_bytes() == (fresh / "model.gguf").read_bytes()
    sidecar, first = (json.loads((d / SIDECAR).read_text())["gguf"] for d in (out, fresh))
    assert sidecar["gptq_kept"] == first["gptq_kept"] and sidecar["gptq_kept"]
    kept = sidecar["gptq_kept"][0]
    with torch.no_grad():
        model.get_parameter(kept).add_(1e-3)  # edited after apply_gguf_: no longer GPTQ's output
    with pytest.raises(MiOptError, match="not on their GGML grid"):
        export(model, tokenizer, plan, tmp_path / "edited", format="gguf", gguf=options, gguf_applied=applied)
    assert not (tmp_path / "edited").exists()


def test_hessians_are_the_inputs_gram_matrices_shared_inputs_included():
    from mi_opt.hooks import Hook, attached
    from mi_opt.quant.gptq import collect_hessians

    model = tiny_model("llama")
    windows = torch.randint(0, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    got = collect_hessians(model, names, windows, batch_size=2, progress=False)
    inputs = {n: [] for n in names}
    hooks = [Hook(model.get_submodule(n), lambda m, a, o, n=n: inputs[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n in names]
    with attached(hooks), torch.inference_mode():
        model(input_ids=windows)
    for name in names:
        x = torch.cat(inputs[name]).double()
        torch.testing.assert_close(got[name], x.T @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[names[0]], got[names[1]])  # q and k read the same normed input


def test_each_linear_keeps_gptq_only_where_it_beats_round_to_nearest_on_held_out_windows():
    from mi_opt.quant.gptq import _rtn, gptq_

    model = tiny_model("llama")
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    types = {f"model.layers.{i}.{m}.weight": "Q4_0" for i in range(4)
             for m in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")}
    windows = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    chosen = gptq_(model, types, windows, progress=False)
    assert set(chosen) == set(types) and set(chosen.values()) <= {"gptq", "rtn"}
    for name, how in chosen.items():
        weight = dict(model.named_parameters())[name].detach()
        if how == "rtn":
            assert torch.equal(weight, _rtn(original[name], "Q4_0"))
        else:
            assert not torch.equal(weight, _rtn(original[name], "Q4_0"))
    untouched = [n for n in original if n not in types]
    assert all(torch.equal(original[n], dict(model.named_parameters())[n]) for n in untouched)
    with pytest.raises(MiOptError, match="at least 2 calibration windows"):
        gptq_(model, types, windows[:1], progress=False)
