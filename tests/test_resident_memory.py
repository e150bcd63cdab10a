"""Resident memory of packed models: the stored codes are not kept twice once the int4 layout exists,
and saving after a forward pass stays bit-exact (issue 16, item 1)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import load_causal_lm, tiny_llama
from safetensors.torch import load_file

import hf_splitquant
from hf_splitquant import kernels
from hf_splitquant.methods import get_format
from hf_splitquant.modeling import iter_packed_modules
from hf_splitquant.nn.packed_linear import PackedLinear
from hf_splitquant.spec import LayerSpec
from hf_splitquant.speed import resident_bytes

CASES = [
    dict(bits=4, group_size=32),
    dict(bits=4, group_size=None, symmetric=True),
    dict(bits=3, group_size=64),
    dict(bits=2, group_size=32, symmetric=True),
    dict(bits=8, group_size=32),
    dict(bits=4, group_size=32, transform="ocs", ocs_layout="appended"),
    dict(bits=4, group_size=32, transform="ocs"),
    dict(bits=3, group_size=32, transform="splitquant"),
]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _forward(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(3, 11).unsqueeze(0)).logits


@pytest.mark.parametrize("settings", CASES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_state_after_forward_is_bit_exact(settings: dict) -> None:
    torch.manual_seed(0)
    model = hf_splitquant.quantize(tiny_llama().eval(), hf_splitquant.SplitQuantConfig(**settings), progress=False)
    before = _state(model)
    first = _forward(model)
    after = model.state_dict()
    assert list(after) == list(before)  # same keys in the same order
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert torch.equal(_forward(model), first)
    dropped = [m.codes_dropped for _, m in iter_packed_modules(model)]
    if settings.get("transform") == "splitquant" or (settings.get("transform") == "ocs"
                                                      and settings.get("ocs_layout") != "appended"):
        assert not any(dropped)  # formats that cannot read their codes back keep them
    else:
        assert all(dropped)


def test_codes_are_not_kept_twice_and_save_after_forward_reloads_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = hf_splitquant.quantize(tiny_llama().eval(), hf_splitquant.SplitQuantConfig(bits=4, group_size=32),
                                   progress=False)
    model.save_pretrained(tmp_path / "before")
    packed = dict(iter_packed_modules(model))
    logits = _forward(model)
    for module in packed.values():
        layout = module._int4
        # the layer holds only its int4 layout: codes and grid live there, with half a byte per group for the
        # fp16 scales (min-max rounding uses code 0 in every group, so the codes give the zero points back)
        assert module.weight is None and module.weight_scale is None and module.weight_zero is None
        assert sum(t.numel() for t in module.buffers()) == 0
        assert layout.residual.dtype == torch.uint8 and layout.residual.shape == (
            module.out_features, math.ceil(module.in_features // 32 / 2))
    model.save_pretrained(tmp_path / "after")
    a = load_file(tmp_path / "before" / "model.safetensors")
    b = load_file(tmp_path / "after" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reloaded = load_causal_lm(tmp_path / "after")
    assert torch.equal(_forward(reloaded), logits)


def test_resident_bytes_drop_after_forward() -> None:
    torch.manual_seed(0)
    model = hf_splitquant.quantize(tiny_llama().eval(), hf_splitquant.SplitQuantConfig(bits=4, group_size=32),
                                   progress=False)
    PackedLinear.keep_stored_codes = True
    try:
        _forward(model)
        both = resident_bytes(model)
    finally:
        PackedLinear.keep_stored_codes = False
    model = hf_splitquant.quantize(tiny_llama().eval(), hf_splitquant.SplitQuantConfig(bits=4, group_size=32),
                                   progress=False)
    _forward(model)
    stored = sum(get_format(m.spec).stored_bytes(m.spec) for _, m in iter_packed_modules(model))
    residual = sum(m._int4.residual.numel() for _, m in iter_packed_modules(model))
    assert resident_bytes(model) == both - stored + residual

def test_dropped_codes_come_back_for_other_paths_and_moves() -> None:
    torch.manual_seed(0)
    spec = LayerSpec(in_features=96, out_features=40, bits=4, group_size=32)
    layer = PackedLinear.from_float(torch.randn(40, 96), torch.randn(40), spec)
    stored = layer.weight.clone()
    x = torch.randn(2, 96)
    with torch.no_grad():
        with kernels.kernel_mode("reference"):
            reference = layer(x)
        layer(x)  # builds the layout and drops the codes
        assert layer.codes_dropped
        with kernels.kernel_mode("reference"):
            assert torch.equal(layer(x), reference)  # the exact path reads the codes back
    assert torch.equal(layer.packed_tensors()["weight"], stored)
    layer.to(torch.bfloat16)
    assert not layer.codes_dropped and torch.equal(layer.weight, stored)
    layer.to(torch.float32)
    with torch.no_grad():
        layer(x)
    assert layer.codes_dropped
    fresh = PackedLinear(spec)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.weight, stored)
    layer.load_state_dict(fresh.state_dict())  # loading into a layer whose codes were dropped
    assert not layer.codes_dropped and torch.equal(layer.weight, stored)


_TRANSIENT = """
import json, sys, torch
import hf_splitquant.methods as methods
from hf_splitquant.spec import LayerSpec
if sys.argv[1] == "whole":
    methods.QUANTIZE_BLOCK_ELEMENTS = 1 << 40  # the layer in one piece, as before blocks of rows

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

torch.manual_seed(0)
w = torch.randn(16384, 512).to(torch.bfloat16)  # 32 MiB in float32, like a large embedding table
spec = LayerSpec(in_features=512, out_features=16384, bits=4, group_size=64)
methods.quantize_weight(w[:64], LayerSpec(in_features=512, out_features=64, bits=4, group_size=64))  # lazy inits
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the resident high-water mark (VmHWM) to the current resident size
before = status("VmHWM")
out = methods.quantize_weight(w, spec)
peak = status("VmHWM")
packed = sum(t.numel() * t.element_size() for t in out.values())
print(json.dumps({"before": before, "rss": status("VmRSS"), "peak": peak, "packed": packed, "layer": w.numel() * 4}))
"""


@pytest.mark.parametrize("mode", ["blocks", pytest.param("whole", marks=pytest.mark.slow)])
def test_quantize_transient_is_bounded_by_row_blocks(mode: str, tmp_path) -> None:  # noqa: ANN001
    """Peak resident memory while quantizing a 32 MiB (float32) layer, in a fresh process: above the
    packed result it stays under a quarter of the float layer with blocks of rows; in one piece it is
    more than the whole float layer (which shows the measurement sees the temporaries)."""
    import json
    import subprocess
    import sys

    script = tmp_path / "transient.py"
    script.write_text(_TRANSIENT)
    result = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    m = json.loads(result.stdout.strip().splitlines()[-1])
    transient = m["peak"] - m["before"] - m["packed"]
    if mode == "blocks":
        assert transient < m["layer"] / 4
    else:
        assert transient > m["layer"]


def test_grids_whose_codes_skip_zero_keep_a_byte_per_group(tmp_path: Path) -> None:
    # The half-byte residual reads each zero point back as -min(code - zero point), which needs code 0 in every
    # group; calibrated rounding (GPTQ, block tuning) need not use it. Such a layer keeps a byte per group, and
    # state_dict / save after a forward pass stay bit-exact either way.
    from hf_splitquant.methods import rtn

    torch.manual_seed(0)
    model = hf_splitquant.quantize(tiny_llama().eval(), hf_splitquant.SplitQuantConfig(bits=3, group_size=32),
                                   progress=False)
    name, layer = next(iter_packed_modules(model))
    codes = rtn.unpack(layer.weight, layer.spec)
    codes[0, :32] = codes[0, :32].clamp(min=1)  # row 0's first group no longer uses code 0
    layer.load_packed(layer.packed_tensors() | {"weight": rtn.pack(codes, layer.spec)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _forward(model)
    groups = math.ceil(layer.in_features / 32)
    for other_name, module in iter_packed_modules(model):
        assert module.weight is None and module.weight_zero is None  # dropped either way
        width = groups if other_name == name else math.ceil(math.ceil(module.in_features / 32) / 2)
        assert module._int4.residual.shape == (module.out_features, width), other_name
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model.save_pretrained(tmp_path / "saved")
    assert torch.equal(_forward(load_causal_lm(tmp_path / "saved")), _forward(model))
