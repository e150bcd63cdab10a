"""OCS (outlier channel splitting) and MixQuant (per-layer bit widths)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import model_output, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_splitquant
from hf_splitquant import SplitQuantConfig, quantization_report
from hf_splitquant.cli import main
from hf_splitquant.methods import dequantize_weight, get_format, mixquant, ocs, quantize_weight
from hf_splitquant.modeling import iter_packed_modules
from hf_splitquant.spec import LayerSpec


def _outlier_weight(out_f: int = 96, in_f: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    return w + (torch.rand(out_f, in_f, generator=g) < 0.01) * torch.randn(out_f, in_f, generator=g) * 0.4


@pytest.mark.parametrize("split", ["naive", "qa"])
def test_ocs_split_is_float_equivalent(split: str) -> None:
    w = _outlier_weight()
    x = torch.randn(32, 64)
    delta = torch.full((96, 1), 0.01)
    expanded, index, chosen = ocs.split_channels(w, 5, split, delta=delta)
    assert expanded.shape == (96, 69) and index.shape == (5,)
    assert int(index.max()) < 64
    # gathering the duplicated inputs and folding the columns back both give the original layer
    assert (ocs.gather_inputs(x, index) @ expanded.T - x @ w.T).abs().max() <= 1e-5
    assert (ocs.fold_back(expanded, index, 64) - w).abs().max() <= 1e-6
    # the split shrinks the largest magnitude
    assert expanded.abs().max() < w.abs().max()


def test_ocs_chooses_largest_channel_repeatedly() -> None:
    w = torch.zeros(4, 6)
    w[0, 2] = 8.0
    w[1, 4] = 5.0
    _, index, chosen = ocs.split_channels(w, 4)
    # 8 in column 2 -> 4 + 4 (new column 6); then 5 in column 4; then column 2's 4 again; then its copy
    assert chosen == [2, 4, 2, 6]
    assert index.tolist() == [2, 4, 2, 2]  # a copy of a copy maps back to the original channel


@pytest.mark.parametrize("bits", [3, 4, 5, 6])
def test_qa_split_not_worse_than_naive(bits: int) -> None:
    """Per output channel (the grid the QA halves are made for), summed over several layers."""
    totals = {}
    for split in ("naive", "qa"):
        total = 0.0
        for seed in range(6):
            w = _outlier_weight(seed=seed)
            spec = LayerSpec(64, 96, bits, None, transform="ocs", ocs_expand_ratio=0.05, ocs_split=split)
            total += float((dequantize_weight(quantize_weight(w, spec), spec, torch.float32) - w).pow(2).sum())
        totals[split] = total
    assert totals["qa"] <= totals["naive"]


def test_ocs_reduces_error_as_ratio_grows() -> None:
    w = _outlier_weight(out_f=128, in_f=128, seed=3)
    errors = []
    for ratio in (0.0, 0.02, 0.1):
        spec = LayerSpec(128, 128, 4, None, symmetric=True, transform="ocs", ocs_expand_ratio=ratio)
        errors.append(float((dequantize_weight(quantize_weight(w, spec), spec, torch.float32) - w).pow(2).mean()))
    assert errors[2] < errors[1] < errors[0]


def test_ocs_duplicated_columns_count_in_bits_per_weight() -> None:
    plain = LayerSpec(100, 10, 4, None, transform="ocs", ocs_expand_ratio=0.0)
    split = LayerSpec(100, 10, 4, None, transform="ocs", ocs_expand_ratio=0.05)
    assert ocs.num_duplicated(split) == 5 and get_format(split).columns(split) == 105
    assert mixquant.spec_bits(split) > mixquant.spec_bits(plain) + 5 * 10 * 4


@settings(max_examples=25, deadline=None)
@given(qems=st.lists(st.floats(1.0, 1e5), min_size=2, max_size=2, unique=True),
       seed=st.integers(0, 1000))
def test_larger_qem_never_gives_more_bits(qems: list[float], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    errors, reference = {}, {}
    for layer in range(5):
        base = float(torch.rand(1, generator=g)) + 1e-3
        decay = 2 + 3 * float(torch.rand(1, generator=g))
        errors[f"l{layer}"] = {b: base * decay ** (8 - b) for b in (2, 3, 4, 5, 6, 8)}
        reference[f"l{layer}"] = errors[f"l{layer}"][8]
    small, large = sorted(qems)
    a = mixquant.allocate_by_qem(errors, reference, small)
    b = mixquant.allocate_by_qem(errors, reference, large)
    assert all(b[n] <= a[n] for n in a)


@pytest.mark.parametrize("spec_kwargs", [
    {"bits": 3, "group_size": 32}, {"bits": 2, "group_size": None}, {"bits": 4, "group_size": 48, "symmetric": True},
    {"bits": 8, "group_size": 64, "clip": "mse"}, {"bits": 3, "group_size": 32, "input_rotation": 16},
    {"bits": 2, "group_size": 50, "scale_dtype": "float32"}])
def test_roundoff_residual_is_the_stored_round_trip(spec_kwargs: dict) -> None:
    """The plain-grid shortcut (element grid, no packing) gives exactly the stored round trip's residual, also over
    several row blocks (a layer larger than one quantization block)."""
    from hf_splitquant import methods

    torch.manual_seed(0)
    in_features = 96 if spec_kwargs.get("group_size") != 50 else 100
    out_features = methods.QUANTIZE_BLOCK_ELEMENTS // in_features + 7  # two row blocks
    weight = torch.randn(out_features, in_features) * torch.rand(1, in_features) * 3
    spec = LayerSpec(in_features, out_features, has_bias=False, **spec_kwargs)
    stored = dequantize_weight(quantize_weight(weight, spec), spec, torch.float32) - weight
    assert torch.equal(mixquant.roundoff_residual(weight, spec), stored)
    weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mixquant.roundoff_residual(weight, spec)


def test_budget_allocation_meets_target_and_prefers_sensitive_layers() -> None:
    errors = {"flat": {2: 1.0, 4: 0.9, 8: 0.8}, "steep": {2: 10.0, 4: 1.0, 8: 0.1}}
    costs = {n: {b: b * 100 for b in (2, 4, 8)} for n in errors}
    sizes = {"flat": 100, "steep": 100}
    chosen = mixquant.allocate_by_budget(errors, costs, sizes, target_bits=3.0)
    assert chosen == {"flat": 2, "steep": 4}
    with pytest.raises(ValueError, match="target_bits"):
        mixquant.allocate_by_budget(errors, costs, sizes, target_bits=1.5)


@pytest.mark.slow
@pytest.mark.parametrize("transform", [None, "splitquant", "ocs"])
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_mixed_precision_save_reload_bit_exact(float_checkpoints, tmp_path, input_ids, transform, arch):
    auto = AutoModelForSequenceClassification if arch == "bert" else AutoModelForCausalLM
    target = 7.5 if transform == "splitquant" else 3.3  # group 32 costs 0.75 bits (3 bits for SplitQuant's 3 grids)
    cfg = SplitQuantConfig(group_size=32, transform=transform, bit_allocation="mixquant", target_bits=target,
                           mixquant_candidates=[2, 3, 4, 8], ocs_expand_ratio=0.05)
    model = auto.from_pretrained(float_checkpoints[arch], quantization_config=cfg).eval()
    report = quantization_report(model)
    assert report.bits_per_weight <= target + 1e-9
    assert len({layer.bits for layer in report.layers}) >= 1
    out = model_output(model, input_ids)
    model.save_pretrained(tmp_path)
    layers = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["layers"]
    assert {spec["bits"] for spec in layers.values()} == {layer.bits for layer in report.layers}
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert torch.equal(model_output(reloaded, input_ids), out)
    # the explicit API gives the same packed model
    explicit = hf_splitquant.quantize(auto.from_pretrained(float_checkpoints[arch]), cfg, progress=False)
    a, b = model.state_dict(), explicit.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ocs_save_reload_and_float_ratio_zero(float_checkpoints, tmp_path, input_ids):
    cfg = SplitQuantConfig(bits=4, group_size=None, transform="ocs", ocs_expand_ratio=0.05, clip="mse")
    model = AutoModelForCausalLM.from_pretrained(float_checkpoints["llama"], quantization_config=cfg).eval()
    layer = dict(iter_packed_modules(model))["model.layers.0.mlp.down_proj"]
    assert layer.weight_dup_index.numel() == 5  # ceil(0.05 * 96)
    out = model_output(model, input_ids)
    model.save_pretrained(tmp_path)
    assert torch.equal(model_output(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), input_ids), out)


@pytest.mark.slow
def test_cli_flags_for_ocs_and_mixquant(float_checkpoints, tmp_path, capsys):
    out = tmp_path / "mixed"
    assert main(["quantize", float_checkpoints["gpt2"], "-o", str(out), "--transform", "ocs", "--ocs-expand-ratio",
                 "0.02", "--bit-allocation", "mixquant", "--target-bits", "3.4", "--group-size", "32"]) == 0
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["transform"] == "ocs" and saved["target_bits"] == 3.4
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["method"] == "ocs" and inspected["bits_per_weight"] <= 3.4


def test_ocs_split_auto_keeps_the_better_split_per_layer():
    from hf_splitquant.methods import dequantize_weight, quantize_weight
    from hf_splitquant.spec import LayerSpec

    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 256, generator=g) * 0.05
    w[:, 7] *= 20  # an outlier channel
    for group in (None, 64):
        errors = {}
        for split in ("qa", "naive", "auto"):
            spec = LayerSpec(256, 48, 3, group, transform="ocs", ocs_expand_ratio=0.05, ocs_split=split)
            restored = dequantize_weight(quantize_weight(w, spec), spec, torch.float32)
            errors[split] = float((restored - w).pow(2).sum())
        assert errors["auto"] == min(errors["qa"], errors["naive"])


DATA = Path(__file__).resolve().parent / "data"


def test_format_version_1_ocs_checkpoint_still_loads_exactly(tmp_path: Path) -> None:
    """A checkpoint written by the format version 1 code (copies in the last groups) reloads with the
    same logits; saving it again keeps its layout."""
    from safetensors.torch import load_file

    folder = DATA / "ocs_format_v1"
    raw = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert raw["format_version"] == 1 and all("ocs_layout" not in spec for spec in raw["layers"].values())
    expected = load_file(folder / "expected_logits.safetensors")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert {m.spec.ocs_layout for _, m in iter_packed_modules(model)} == {"appended"}
    with torch.no_grad(), hf_splitquant.kernel_mode("reference"):
        # the fixture's logits come from another CPU: the same weights, but float sums in another order (the
        # vector width differs), so ~1e-7 apart; a misread layout would be off by whole grid steps
        torch.testing.assert_close(model(input_ids=expected["input_ids"]).logits, expected["logits"],
                                   rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the int4 terms of the old layout (inputs gathered) agree too
        fast = model(input_ids=expected["input_ids"]).logits
    assert torch.allclose(fast, expected["logits"], atol=0.05)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for key, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


def test_source_group_layout_round_trips_and_keeps_the_qa_split_exact_with_groups(tmp_path: Path) -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.02
    w[:, 5] *= 12  # outlier channels
    w[:, 70] *= 9
    worst = {}
    for layout in ("appended", "source_group"):
        spec = LayerSpec(128, 48, 3, 32, transform="ocs", ocs_expand_ratio=0.05, ocs_split="qa", ocs_layout=layout)
        grid = ocs.element_grid(w, spec)
        restored = dequantize_weight(quantize_weight(w, spec), spec, torch.float32)
        # the step of each original column's own grid
        step = grid.scale[:, :128]
        worst[layout] = float(((restored - w).abs() / step).max())
    # each pair of halves shares its source's grid, so the QA offsets cancel exactly: every weight, split
    # or not, is within half a step of its original value, like round to nearest; not so with copies
    # rounded on the appended groups' grids
    assert worst["source_group"] <= 0.5 + 1e-4 < worst["appended"], worst

    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = SplitQuantConfig(bits=3, group_size=32, transform="ocs", ocs_expand_ratio=0.05)
    hf_splitquant.quantize(model, config, progress=False)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["format_version"] == 2
    assert {spec["ocs_layout"] for spec in saved["layers"].values()} == {"source_group"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.arange(3, 27).reshape(2, 12)
    with hf_splitquant.kernel_mode("reference"):
        exact = model_output(reloaded, ids)
        assert torch.equal(exact, model_output(model, ids))
    assert torch.allclose(model_output(reloaded, ids), exact, atol=0.05)  # int4 terms: copies folded in
