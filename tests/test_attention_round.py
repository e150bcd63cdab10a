"""Attention Round: the soft assignment over levels, hardening, and the gain over round-to-nearest
on a real layer (all-MiniLM-L6-v2 with real sentences as inputs)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import splitquant_assets as assets
from hf_splitquant import SplitQuantConfig
from hf_splitquant.methods import dequantize_weight, element_grid, pack_grid_codes, quantize_weight
from hf_splitquant.methods.attention_round import (
    AttentionRoundOptions,
    attention_round,
    expand_hessian,
    hessian_from_inputs,
    layer_objective,
    level_probabilities,
    sigma_schedule,
    soft_codes,
    window_half_width,
)
from hf_splitquant.methods.ocs import gather_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def spec(bits: int, cols: int = 48, rows: int = 16, transform: str | None = None, group: int | None = 16):
    return SplitQuantConfig(bits=bits, group_size=group, transform=transform).spec_for(cols, rows, True)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_level_reachable_with_a_wide_sigma(bits: int) -> None:
    max_code = 2**bits - 1
    t = torch.tensor([-0.5, 0.0, 0.3, max_code / 2, max_code - 0.2, max_code + 0.5])
    sigma = max_code / 4 + 1  # wide: every level within ~4 sigma of every code
    probs = level_probabilities(t, max_code, sigma, window=max_code)
    assert probs.shape == (6, max_code + 1)
    assert (probs > 0).all(), "every level must keep a positive probability"
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))
    # the fast windowed expectation agrees with the reference over all levels
    mean, _ = soft_codes(t.clone(), max_code, sigma, window_half_width(sigma, max_code, window=max_code))
    levels = torch.arange(max_code + 1, dtype=torch.float32)
    torch.testing.assert_close(mean, (probs * levels).sum(-1), rtol=1e-4, atol=1e-4)


def test_adaptive_window_is_exact_up_to_its_tolerance() -> None:
    max_code = 255
    t = torch.linspace(-0.5, max_code + 0.5, 5001)
    for sigma in (1.0, 0.5, 0.2, 0.05):
        half = window_half_width(sigma, max_code, tol=1e-6)
        assert half < 8  # far fewer than 256 levels
        full = level_probabilities(t, max_code, sigma)
        outside = full.masked_fill(
            (torch.arange(max_code + 1) - t.round().clamp(0, max_code).unsqueeze(-1)).abs() <= half, 0.0
        ).sum(-1)
        assert float(outside.max()) < 2e-5
        mean, dmean = soft_codes(t.clone(), max_code, sigma, half)
        levels = torch.arange(max_code + 1, dtype=torch.float32)
        exact_mean = (full * levels).sum(-1)
        assert float((mean - exact_mean).abs().max()) < 1e-3
        # derivative of the expectation = Var_p(k) / sigma^2 (checked by finite differences)
        h = 1e-3
        lo, _ = soft_codes(t - h, max_code, sigma, half)
        hi, _ = soft_codes(t + h, max_code, sigma, half)
        fd = (hi - lo) / (2 * h)
        smooth = (t - t.round()).abs() < 0.5 - 10 * h  # away from the window's jump points
        assert torch.allclose(dmean[smooth], fd[smooth], rtol=0.05, atol=0.05 + 1e-3 / sigma**2)


def test_sampled_levels_follow_the_probabilities() -> None:
    max_code, sigma = 7, 0.6
    t = torch.full((20000,), 3.3)
    draw, _ = soft_codes(t, max_code, sigma, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw, draw.round())
    freq = torch.bincount(draw.long(), minlength=max_code + 1).float() / t.numel()
    expected = level_probabilities(t[:1], max_code, sigma, window=3)[0]
    assert float((freq - expected).abs().max()) < 0.02


def test_hardening_gives_integer_codes_on_the_grid() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 48) * 0.05
    x = torch.randn(256, 48) @ torch.randn(48, 48) * 0.3  # correlated inputs
    for transform in (None, "splitquant", "ocs"):
        s = spec(3, transform=transform)
        grid = element_grid(w, s)
        h = expand_hessian(hessian_from_inputs(x), grid.input_index)
        codes, info = attention_round(grid, h, x.shape[0], {"iterations": 60}, seed=0)
        assert codes.dtype == torch.uint8 and codes.shape == grid.weight.shape
        assert int(codes.max()) <= grid.max_code
        # the last sigma is small: the soft codes have hardened onto the returned integer codes
        t = (grid.weight - grid.offset) / grid.scale
        soft, _ = soft_codes(t.clamp(-0.5, grid.max_code + 0.5), grid.max_code, 0.02, 1)
        assert float((soft - soft.round()).abs().max()) < 0.5
        # packed and dequantized: exactly the grid values of the codes (OCS: folded back)
        packed = pack_grid_codes(grid, codes, s)
        restored = dequantize_weight(packed, s, torch.float32)
        values = grid.values(codes)
        if grid.input_index is not None:
            folded = values[:, : s.in_features].clone()
            folded.index_add_(1, grid.input_index.long(), values[:, s.in_features :])
            values = folded
        torch.testing.assert_close(restored, values, rtol=0, atol=1e-6)
        assert info["mse"] <= info["mse_rtn"]


def test_zero_iterations_is_round_to_nearest_bit_for_bit() -> None:
    torch.manual_seed(1)
    w = torch.randn(16, 48)
    x = torch.randn(64, 48)
    for transform in (None, "splitquant", "ocs"):
        s = spec(2, transform=transform)
        grid = element_grid(w, s)
        codes, info = attention_round(grid, expand_hessian(hessian_from_inputs(x), grid.input_index), 64,
                                      {"iterations": 0})
        packed = pack_grid_codes(grid, codes, s)
        reference = quantize_weight(w, s)
        assert packed.keys() == reference.keys()
        for key in packed:
            assert torch.equal(packed[key], reference[key]), (transform, key)
        assert info["mse"] == info["mse_rtn"]


def test_options_are_validated() -> None:
    assert AttentionRoundOptions.from_dict(None) == AttentionRoundOptions()
    with pytest.raises(ValueError, match="unknown rounding_options.*'iters'"):
        AttentionRoundOptions.from_dict({"iters": 10})
    for bad in ({"iterations": -1}, {"lr": 0}, {"sigma_start": 0.1, "sigma_end": 0.5}, {"mode": "argmax"},
                {"window": 0}, {"objective": "block"}, {"schedule": "cosine"}, {"window_tol": 1.0},
                {"keep_best": "yes"}):
        with pytest.raises(ValueError, match="rounding_options"):
            AttentionRoundOptions.from_dict(bad)
    sigmas = sigma_schedule(AttentionRoundOptions(iterations=5, sigma_start=1.0, sigma_end=0.01))
    assert sigmas[0] == 1.0 and math.isclose(sigmas[-1], 0.01) and sigmas == sorted(sigmas, reverse=True)
    assert math.isclose(sigmas[1] / sigmas[0], sigmas[2] / sigmas[1])  # geometric


@pytest.fixture(scope="module")
def minilm_layer():
    """``encoder.layer.1.intermediate.dense`` of all-MiniLM-L6-v2 and its real inputs on 96 sentences
    (64 for calibration, 32 held out)."""
    folder = assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    layer = model.encoder.layer[1].intermediate.dense
    captured = []

    def hook(module, args, output):  # noqa: ANN001, ANN202
        captured.append(args[0][mask.bool()])

    handle = layer.register_forward_hook(hook)
    sentences = assets.embedding_sentences(96)
    with torch.no_grad():
        for start in range(0, 96, 32):
            batch = tokenizer(sentences[start : start + 32], padding=True, return_tensors="pt")
            mask = batch["attention_mask"]
            model(**batch)
    handle.remove()
    calib, held = torch.cat(captured[:2]), torch.cat(captured[2:])
    return layer.weight.detach().clone(), calib, held


@pytest.mark.slow
@pytest.mark.parametrize("transform", [None, "splitquant", "ocs"])
def test_attention_round_beats_round_to_nearest_on_a_real_layer(minilm_layer, transform: str | None) -> None:
    weight, calib, held = minilm_layer
    s = SplitQuantConfig(bits=3, group_size=64, transform=transform).spec_for(weight.shape[1], weight.shape[0], True)
    grid = element_grid(weight, s)
    h = expand_hessian(hessian_from_inputs(calib), grid.input_index)
    codes, info = attention_round(grid, h, calib.shape[0], {"iterations": 60})
    assert not info["kept_rtn"]
    assert info["mse"] < 0.75 * info["mse_rtn"], info
    # the gain holds on held-out sentences, measured on the real output of the packed layer
    ar = dequantize_weight(pack_grid_codes(grid, codes, s), s, torch.float32)
    rtn = dequantize_weight(quantize_weight(weight, s), s, torch.float32)
    reference = held @ weight.t()
    err_ar = float((held @ ar.t() - reference).pow(2).mean())
    err_rtn = float((held @ rtn.t() - reference).pow(2).mean())
    assert err_ar < 0.85 * err_rtn, (err_ar, err_rtn)
    # the objective computed from H equals the MSE computed on the inputs themselves
    x = calib if grid.input_index is None else gather_inputs(calib, grid.input_index)
    direct = float((x @ (grid.values(codes) - grid.weight).t()).pow(2).mean())
    assert math.isclose(layer_objective(grid.values(codes), grid.weight, h, calib.shape[0]), direct, rel_tol=1e-3)


@pytest.mark.slow
def test_sample_mode_is_seeded_and_improves(minilm_layer) -> None:
    weight, calib, _ = minilm_layer
    w, x = weight[:256], calib[:512]
    s = SplitQuantConfig(bits=2, group_size=64).spec_for(w.shape[1], w.shape[0], True)
    grid = element_grid(w, s)
    h = hessian_from_inputs(x)
    options = {"iterations": 40, "mode": "sample"}
    a, info = attention_round(grid, h, x.shape[0], options, seed=3)
    b, _ = attention_round(grid, h, x.shape[0], options, seed=3)
    assert torch.equal(a, b)
    assert info["mse"] < info["mse_rtn"]
