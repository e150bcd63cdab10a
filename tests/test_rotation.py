"""Hadamard input rotation (``SplitQuantConfig(input_rotation=b)``, ``hf_splitquant/quant/rotation.py``): the math,
the packed layer (codes of ``W R``, input rotated in the forward pass), calibrated rounding on the rotated
problem, block tuning, QAT, and the checkpoint (format version 5, reloaded bit for bit)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, assert_freeze_round_trip, model_output, tiny_gpt2, tiny_llama
from transformers import AutoModelForCausalLM

import hf_splitquant
from hf_splitquant import PackedLinear, SplitQuantConfig
from hf_splitquant.calibration.block_tuning import _fake_quant_copy
from hf_splitquant.kernels import kernel_mode
from hf_splitquant.methods import (
    dequantize_weight,
    element_grid,
    quantize_weight,
    stored_hessian,
    to_input_basis,
)
from hf_splitquant.methods.gptq import gptq_round, hessian_objective
from hf_splitquant.methods.output_clip import output_clip_grid
from hf_splitquant.nn.fake_quant import FakeQuantLinear
from hf_splitquant.quant.rotation import hadamard, rotate_hessian, rotate_inputs
from hf_splitquant.spec import LayerSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def samples(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def dense_rotation(n: int, block: int) -> torch.Tensor:
    return torch.block_diag(*[hadamard(block, torch.float64)] * (n // block))


def correlated_hessian(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    x[:, 3] *= 20  # an outlier channel, as real activations have
    return x.t() @ x


# ------------------------------------------------------------------------------------------ math


@pytest.mark.parametrize("block", [2, 8, 64])
def test_hadamard_is_symmetric_orthogonal_and_rotation_is_its_own_inverse(block: int) -> None:
    h = hadamard(block, torch.float64)
    assert torch.equal(h, h.t())
    torch.testing.assert_close(h @ h, torch.eye(block, dtype=torch.float64))
    x = torch.randn(3, 5, 4 * block, dtype=torch.float64)
    rotated = rotate_inputs(x, block)
    torch.testing.assert_close(rotated, x @ dense_rotation(4 * block, block))
    torch.testing.assert_close(rotate_inputs(rotated, block), x)
    hess = correlated_hessian(2 * block, seed=block)
    r = dense_rotation(2 * block, block)
    torch.testing.assert_close(rotate_hessian(hess, block), r.t() @ hess @ r)


def test_a_layers_rotation_is_reused_only_for_the_same_unmodified_input_in_the_same_grad_mode() -> None:
    from hf_splitquant.quant.rotation import rotate_layer_input

    h = hadamard(32)
    x = torch.randn(2, 3, 64)
    first = rotate_layer_input(x, 32, h)
    torch.testing.assert_close(first, rotate_inputs(x, 32))
    assert rotate_layer_input(x, 32, h) is first  # q/k/v read the same tensor: one product
    x.mul_(2)  # modified in place: computed again
    torch.testing.assert_close(rotate_layer_input(x, 32, h), 2 * first)
    w = torch.randn(2, 3, 64, requires_grad=True)
    with torch.no_grad():
        assert rotate_layer_input(w, 32, h).grad_fn is None
    assert rotate_layer_input(w, 32, h).grad_fn is not None  # not the no-grad result
    bf16 = x.to(torch.bfloat16)  # bf16 inputs: the product in float32, the result in bf16
    out = rotate_layer_input(bf16, 32, h)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, rotate_inputs(bf16.float(), 32).to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, 1, 3, 48, True, 64.0])
def test_bad_blocks_are_refused_by_name(bad: object) -> None:
    with pytest.raises(ValueError, match="power of two"):
        hadamard(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_rotation"):
        SplitQuantConfig(input_rotation=bad)
    with pytest.raises(ValueError, match="input_rotation"):
        LayerSpec(in_features=64, out_features=8, bits=4, input_rotation=bad)


def test_rotation_needs_the_rtn_format_and_blocks_that_tile_the_inputs() -> None:
    with pytest.raises(ValueError, match="RTN format"):
        SplitQuantConfig(transform="splitquant", input_rotation=64)
    with pytest.raises(ValueError, match="divide in_features"):
        LayerSpec(in_features=96, out_features=8, bits=4, input_rotation=64)
    with pytest.raises(ValueError, match="round-to-nearest"):
        LayerSpec(in_features=64, out_features=8, bits=4, transform="ocs", input_rotation=64)
    config = SplitQuantConfig(bits=4, group_size=32, input_rotation=64)
    assert config.spec_for(128, 8, False).input_rotation == 64
    assert config.spec_for(96, 8, False).input_rotation is None  # 64 does not tile 96 inputs: plain basis


# ------------------------------------------------------------------------------------------ the format


def test_codes_describe_the_rotated_weight_and_the_layer_computes_the_original_one() -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(24, 128), torch.randn(24)
    plain = LayerSpec(in_features=128, out_features=24, bits=3, group_size=32)
    spec = replace(plain, input_rotation=32)
    stored = quantize_weight(weight, spec)
    # the codes are exactly the plain format's codes of W R
    expected = quantize_weight(rotate_inputs(weight, 32), plain)
    assert all(torch.equal(stored[k], expected[k]) for k in expected)
    w_eff = dequantize_weight(stored, spec, torch.float32)
    torch.testing.assert_close(w_eff, rotate_inputs(dequantize_weight(expected, plain, torch.float32), 32))
    layer = PackedLinear.from_float(weight, bias, spec)
    assert "input_rotation=32" in repr(layer)
    x = torch.randn(5, 128)
    with torch.no_grad(), kernel_mode("reference"):
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w_eff, bias), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the int4 kernel path (bf16 activations) computes the same layer
        fast = layer(x[:1])
    torch.testing.assert_close(fast, torch.nn.functional.linear(x[:1], w_eff, bias), rtol=0.05, atol=0.05)
    # the rotation is what makes it a different quantizer: the plain layer's weight differs
    assert not torch.allclose(w_eff, dequantize_weight(quantize_weight(weight, plain), plain, torch.float32))


def test_gptq_on_the_rotated_grid_minimises_the_layers_true_output_error() -> None:
    torch.manual_seed(0)
    weight = torch.randn(16, 128)
    hess = correlated_hessian(128, seed=1)
    spec = LayerSpec(in_features=128, out_features=16, bits=3, group_size=32, has_bias=False, input_rotation=64)
    for grid in (element_grid(weight, spec), output_clip_grid(weight, spec, hess)):
        assert grid.input_rotation == 64
        torch.testing.assert_close(grid.weight, rotate_inputs(weight, 64))
        h_stored = stored_hessian(hess, grid)
        codes, _ = gptq_round(grid, h_stored.float(), damping=0.1)
        values, rtn = grid.values(codes), grid.values(grid.nearest_codes())
        # the objective on the rotated problem is the layer's own output error (the identity the calibration uses)
        true_gptq = hessian_objective(to_input_basis(values, grid), weight, hess)
        assert true_gptq == pytest.approx(hessian_objective(values, grid.weight, h_stored), rel=1e-6)
        assert true_gptq < 0.9 * hessian_objective(to_input_basis(rtn, grid), weight, hess)
    with pytest.raises(ValueError, match="whole H"):
        output_clip_grid(weight, spec, hess.diagonal())


# ------------------------------------------------------------------------------------------ models


def calibrated(model: torch.nn.Module, rotation: int | None, block_tuning: dict | None = None,
               bits: int = 3) -> torch.nn.Module:
    config = SplitQuantConfig(bits=bits, group_size=32, rounding="gptq", input_rotation=rotation,
                              block_tuning=block_tuning)
    return hf_splitquant.quantize(model, config, calibration_data=samples(32, 16, seed=1), batch_size=8,
                                  progress=False)


def test_calibrated_rotated_model_saves_as_format_5_and_reloads_bit_for_bit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny_llama().eval()
    ids = samples(2, 12, seed=3)
    model = calibrated(copy.deepcopy(base), 32)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 14 and all(m.spec.input_rotation == 32 for m in layers)
    float_out, out = model_output(base, ids), model_output(model, ids)
    assert float((out - float_out).pow(2).mean()) < 0.5 * float(float_out.pow(2).mean())
    model.save_pretrained(tmp_path / "rot")
    saved = json.loads((tmp_path / "rot" / "config.json").read_text())["quantization_config"]
    assert saved["format_version"] == 5 and saved["input_rotation"] == 32
    assert all(spec["input_rotation"] == 32 for spec in saved["layers"].values())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "rot").eval()
    assert all(m.spec.input_rotation == 32 for m in reloaded.modules() if isinstance(m, PackedLinear))
    assert torch.equal(model_output(reloaded, ids), out)
    # dequantizing (for LoRA merges, or to leave the format) gives the weights the rotated layers compute with
    from hf_splitquant.modeling import dequantize_model

    with kernel_mode("reference"):
        packed_out = model_output(reloaded, ids)
    dequantize_model(reloaded, torch.float32)
    assert not any(isinstance(m, PackedLinear) for m in reloaded.modules())
    torch.testing.assert_close(model_output(reloaded, ids), packed_out, rtol=1e-4, atol=1e-5)
    card = str(hf_splitquant.build_model_card(tmp_path / "rot"))
    assert "14 of 14 layers store W R and rotate their inputs (Hadamard blocks of 32)" in card
    # a checkpoint without rotation is written as before (no field, an older format version)
    plain = calibrated(copy.deepcopy(base), None)
    plain.save_pretrained(tmp_path / "plain")
    saved = json.loads((tmp_path / "plain" / "config.json").read_text())["quantization_config"]
    assert saved["format_version"] < 5 and all("input_rotation" not in s for s in saved["layers"].values())


def test_quantize_on_load_rotates_linear_and_conv1d_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    for build in (tiny_llama, tiny_gpt2):
        base = build().eval()
        base.save_pretrained(tmp_path / build.__name__)
        config = SplitQuantConfig(bits=4, group_size=32, input_rotation=32)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / build.__name__, quantization_config=config).eval()
        layers = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
        assert layers and all(m.spec.input_rotation == 32 for m in layers.values())
        floats = dict(base.named_modules())
        for name, layer in layers.items():
            weight = floats[name].weight.detach()
            weight = weight.t() if layer.spec.source == "Conv1D" else weight
            plain = replace(layer.spec, input_rotation=None)
            expected = quantize_weight(rotate_inputs(weight.float(), 32), plain)
            assert torch.equal(layer.packed_tensors()["weight"], expected["weight"]), name


def test_block_tuning_starts_at_the_rotated_layers_and_lowers_their_error() -> None:
    torch.manual_seed(0)
    model = calibrated(tiny_llama().eval(), 32, block_tuning={"epochs": 10, "keep_best": False})
    for packed in [m for m in model.modules() if isinstance(m, PackedLinear)]:
        copy_ = _fake_quant_copy(packed, seed=0)
        expected = packed.packed_tensors()
        assert all(torch.equal(v, expected[k]) for k, v in copy_.packed_tensors().items())
        x = torch.randn(3, packed.in_features)
        with torch.no_grad(), kernel_mode("reference"):
            torch.testing.assert_close(copy_(x), packed(x), rtol=1e-4, atol=1e-5)
    blocks = model.calibration_report["blocks"]
    assert len(blocks) == 2 and all(b["fitted_after"] < b["fitted_before"] for b in blocks)


def test_qat_with_rotation_trains_and_freezes_to_the_fake_quant_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny_llama()
    base.save_pretrained(tmp_path / "float")
    for learn_scales in (False, True):
        config = SplitQuantConfig(bits=3, group_size=32, qat=True, qat_learn_scales=learn_scales, input_rotation=32)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config)
        layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
        assert len(layers) == 14 and all(m.spec.input_rotation == 32 for m in layers)
        ids = samples(4, 12, seed=5)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        losses = []
        for _ in range(8):
            loss = model(input_ids=ids, labels=ids).loss
            losses.append(float(loss))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert losses[-1] < losses[0]
        with kernel_mode("reference"):  # float32 numerics on both sides (the int4 kernel computes in bf16)
            assert_freeze_round_trip(model, ids, tmp_path / f"qat_{learn_scales}", 14, AutoModelForCausalLM)
    with pytest.raises(ValueError, match="ste='clipped'"):
        FakeQuantLinear(LayerSpec(in_features=64, out_features=8, bits=3, has_bias=False, input_rotation=32),
                        torch.randn(8, 64), ste="clipped")


def test_qat_from_a_rotated_packed_model_starts_at_its_outputs_and_refuses_another_basis() -> None:
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = samples(2, 12, seed=7)
    packed = calibrated(copy.deepcopy(model), 32)
    with kernel_mode("reference"):
        expected = model_output(packed, ids)
    # the bench/example path: a float model whose learned scales start from the rotated packed model's grids
    config = SplitQuantConfig(bits=3, group_size=32, qat_learn_scales=True, input_rotation=32)
    student = hf_splitquant.prepare_qat(copy.deepcopy(packed), config)
    assert student.config.quantization_config.format_version == 5
    torch.testing.assert_close(model_output(student.eval(), ids), expected, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="input_rotation=32"):
        hf_splitquant.prepare_qat(copy.deepcopy(model), SplitQuantConfig(bits=3, group_size=32, qat_learn_scales=True),
                                  init_from=packed)


def test_cli_quantizes_with_rotation_and_names_a_bad_block(float_checkpoints, tmp_path, capsys) -> None:  # noqa: ANN001
    from hf_splitquant.cli import main

    out = tmp_path / "q"
    assert main(["quantize", float_checkpoints["gpt2"], "-o", str(out), "--bits", "4", "--group-size", "32",
                 "--input-rotation", "32"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.quantization_config.format_version == 5
    assert all(m.spec.input_rotation == 32 for m in model.modules() if isinstance(m, PackedLinear))
    capsys.readouterr()
    assert main(["quantize", float_checkpoints["gpt2"], "-o", str(tmp_path / "bad"), "--input-rotation", "48"]) == 2
    assert "`input_rotation` must be None or a power of two" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
