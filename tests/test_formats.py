"""The format contract, checked for every registered format (``hf_splitquant.methods.base.QuantFormat``).

Adding a format = one module in ``hf_splitquant/methods/`` registered with ``register_format``, plus one
row in ``FORMAT_ROWS`` below (a test fails until the row exists).
"""

from __future__ import annotations

import pytest
import torch

from hf_splitquant import PackedLinear
from hf_splitquant.methods import format_names, get_format, pack_grid_codes, tensor_shapes
from hf_splitquant.quant.grid import expand_params
from hf_splitquant.spec import LayerSpec

#: format name -> the spec fields of its test rows (in 96 features, out 40; groups of 32 and per channel)
FORMAT_ROWS: dict[str, list[dict]] = {
    "rtn": [{"bits": 3, "group_size": 32}, {"bits": 4, "group_size": None, "symmetric": True}, {"bits": 8, "group_size": 32}],
    "splitquant": [{"bits": 2, "group_size": 32}, {"bits": 3, "group_size": None, "splitquant_range": "part"},
                   {"bits": 2, "group_size": 32, "splitquant_range": "aligned"},
                   {"bits": 3, "group_size": None, "splitquant_range": "aligned"}],
    "ocs": [{"bits": 4, "group_size": 32, "ocs_expand_ratio": 0.05, "ocs_layout": "source_group"},
            {"bits": 3, "group_size": 32, "ocs_expand_ratio": 0.1, "ocs_split": "naive", "ocs_layout": "source_group"},
            {"bits": 2, "group_size": None, "ocs_expand_ratio": 0.05, "ocs_layout": "source_group"},
            {"bits": 4, "group_size": 32, "ocs_expand_ratio": 0.05},  # the format version 1 layout
            {"bits": 3, "group_size": None, "ocs_expand_ratio": 0.1, "ocs_split": "naive"}],
}
CASES = [(name, row) for name, rows in FORMAT_ROWS.items() for row in rows]


def _spec(name: str, row: dict) -> LayerSpec:
    return LayerSpec(96, 40, transform=name, **row)


def _weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 96, generator=g) * 0.05
    w[3, 7] = 0.9  # an outlier
    return w


def test_every_registered_format_has_a_test_row() -> None:
    assert set(format_names()) == set(FORMAT_ROWS)


@pytest.mark.parametrize(("name", "row"), CASES)
def test_stored_tensors_follow_the_spec(name: str, row: dict) -> None:
    spec, fmt = _spec(name, row), get_format(name)
    packed = fmt.quantize(_weight(), spec)
    shapes = tensor_shapes(spec)
    assert set(packed) == set(shapes)
    for key, (shape, dtype) in shapes.items():
        assert tuple(packed[key].shape) == shape and packed[key].dtype == dtype, key
    assert fmt.stored_bytes(spec) == sum(t.numel() * t.element_size() for t in packed.values())
    assert tuple(packed["weight"].shape) != (spec.out_features, spec.in_features)  # never the float shape


@pytest.mark.parametrize(("name", "row"), CASES)
def test_round_trip_stays_within_half_a_step_of_the_grid(name: str, row: dict) -> None:
    spec, fmt = _spec(name, row), get_format(name)
    w = _weight()
    grid = fmt.element_grid(w, spec)
    codes = grid.nearest_codes()
    # the element grid and plain quantize agree, and its values fold back to the dequantized weight
    packed = pack_grid_codes(grid, codes, spec)
    assert all(torch.equal(packed[k], v) for k, v in fmt.quantize(w, spec).items())
    restored = fmt.dequantize(packed, spec, torch.float32)
    assert torch.allclose(restored, fmt.fold_weight(grid.values(codes), grid.input_index, spec), atol=1e-6)
    inside = (grid.weight >= grid.offset) & (grid.weight <= grid.offset + grid.max_code * grid.scale)
    error = (grid.values(codes) - grid.weight).abs()
    assert bool((error[inside] <= grid.scale[inside] / 2 + 1e-6).all())
    assert fmt.columns(spec) == grid.weight.shape[1]


@pytest.mark.parametrize(("name", "row"), CASES)
def test_int4_terms_add_up_to_the_weight(name: str, row: dict) -> None:
    spec, fmt = _spec(name, row), get_format(name)
    packed = fmt.quantize(_weight(), spec)
    grid = fmt.element_grid(_weight(), spec)
    codes = grid.nearest_codes()
    terms = fmt.int4_parts(packed, spec, codes, 32)
    assert len(terms) == fmt.int4_terms(spec)
    total = torch.zeros(terms[0][0].shape)  # the columns the kernel multiplies
    for term_codes, step, zero in terms:
        assert int(term_codes.min()) >= 0 and int(term_codes.max()) <= 15
        # the kernel reads one (step, zero) per row and group of 32: check they are constant there
        for t in (step, zero):
            assert torch.equal(t, expand_params(t[:, ::32].contiguous(), t.shape[1], 32))
        total += (term_codes.float() - 8) * step + zero
    assert torch.allclose(fmt.fold_weight(total, fmt.input_index(packed, spec), spec),
                          fmt.dequantize(packed, spec, torch.float32), atol=1e-5)


@pytest.mark.parametrize(("name", "row"), CASES)
def test_expand_then_fold_is_the_identity_in_float(name: str, row: dict) -> None:
    spec, fmt = _spec(name, row), get_format(name)
    w = _weight().requires_grad_(True)
    grid = fmt.element_grid(w.detach(), spec)
    # the weight the codes describe (OCS: halves of the duplicated columns, -+ delta/4 on the grid's step)
    expanded = fmt.expand_weight(w, spec, grid.state["weight_scale"], fmt.channel_order(w.detach(), spec))
    assert expanded.shape == grid.weight.shape
    folded = fmt.fold_weight(expanded, grid.input_index, spec)
    assert torch.allclose(folded, w, atol=1e-6)
    folded.sum().backward()
    assert torch.allclose(w.grad, torch.ones_like(w))


@pytest.mark.parametrize(("name", "row"), CASES)
def test_packed_layer_round_trips_its_state_dict(name: str, row: dict) -> None:
    spec = _spec(name, row)
    layer = PackedLinear.from_float(_weight(), torch.zeros(40), spec)
    clone = PackedLinear(spec)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(clone(x), layer(x))
