"""Properties of the pure quantization math: packing, grids, k-means."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_splitquant.quant.grid import (
    compute_offset_qparams,
    compute_qparams,
    dequantize_codes,
    num_groups,
    quantize_codes,
)
from hf_splitquant.quant.kmeans import assign_clusters, kmeans_1d, split_boundaries
from hf_splitquant.quant.packing import (
    pack_codes,
    pack_trits,
    packed_row_bytes,
    trit_row_bytes,
    unpack_codes,
    unpack_trits,
)

shapes = st.tuples(st.integers(1, 9), st.integers(1, 77))


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits: int, shape: tuple[int, int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], packed_row_bytes(shape[1], bits))
    assert torch.equal(unpack_codes(packed, bits, shape[1]), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_unpack_traced_by_torch_compile_equals_eager(bits: int) -> None:
    # the branch dynamo traces (written for inductor's fused kernel) must decode the same codes
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (5, 45), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    torch._dynamo.reset()
    traced = torch.compile(unpack_codes, backend="eager", fullgraph=True)(packed, bits, 45)
    assert traced.dtype == torch.uint8 and torch.equal(traced, codes)


def test_bit_order_is_documented_little_endian() -> None:
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    # 2-bit: element k of byte j at bits 2k..2k+1
    assert pack_codes(codes, 2).tolist() == [[1 | (2 << 2) | (3 << 4), 3]]
    # 4-bit: even element in the low nibble
    assert pack_codes(torch.tensor([[0x3, 0xA]], dtype=torch.uint8), 4).tolist() == [[0xA3]]
    # 3-bit: a little-endian bit stream across bytes: 0b111 then 0b101 -> bits 0..5 = 1,1,1,1,0,1
    assert pack_codes(torch.tensor([[7, 5]], dtype=torch.uint8), 3).tolist() == [[0b101111]]


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_trit_round_trip(shape: tuple[int, int], seed: int) -> None:
    ids = torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    packed = pack_trits(ids)
    assert packed.shape == (shape[0], trit_row_bytes(shape[1]))
    assert torch.equal(unpack_trits(packed, shape[1]), ids)


def test_unpack_rejects_wrong_row_size() -> None:
    with pytest.raises(ValueError, match="need"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.uint8), 4, 9)


weights = st.tuples(st.integers(1, 6), st.integers(1, 70), st.floats(1e-3, 1e2), st.integers(0, 2**31 - 1))


def _random_weight(out_f: int, in_f: int, magnitude: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * magnitude
    # heavy tails: a few outliers
    w += (torch.rand(out_f, in_f, generator=g) < 0.05) * torch.randn(out_f, in_f, generator=g) * magnitude * 8
    return w


def _expanded(params: torch.Tensor, in_f: int, group_size: int | None) -> torch.Tensor:
    g = in_f if group_size is None or group_size >= in_f else group_size
    return params.float().repeat_interleave(g, dim=1)[:, :in_f]


@settings(max_examples=80, deadline=None)
@given(w=weights, bits=st.sampled_from([2, 3, 4, 5, 8]), group=st.sampled_from([None, 1, 4, 7, 16, 64]),
       symmetric=st.booleans(), scale_dtype=st.sampled_from([torch.float16, torch.float32]))
def test_rounding_error_within_half_a_step(w, bits, group, symmetric, scale_dtype) -> None:
    weight = _random_weight(*w)
    scale, zero = compute_qparams(weight, bits, group, symmetric, scale_dtype)
    assert scale.shape == (weight.shape[0], num_groups(weight.shape[1], group))
    assert (scale.float() > 0).all()
    codes = quantize_codes(weight, scale, zero, bits, group)
    assert int(codes.max()) <= 2**bits - 1
    restored = dequantize_codes(codes, scale, zero, bits, group)
    step = _expanded(scale, weight.shape[1], group)
    # Every weight lies inside its group's range, so it is at most half a step from a level.
    tolerance = step / 2 * (1 + 1e-5) + 4 * torch.finfo(torch.float32).eps * weight.abs()
    assert ((weight - restored).abs() <= tolerance).all()
    if not symmetric:
        # 0.0 is exactly representable: the zero point decodes to 0.
        zeros = torch.zeros_like(weight)
        assert torch.equal(dequantize_codes(quantize_codes(zeros, scale, zero, bits, group), scale, zero, bits, group),
                           zeros)


@settings(max_examples=60, deadline=None)
@given(w=weights, bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([None, 5, 32]),
       scale_dtype=st.sampled_from([torch.float16, torch.float32]))
def test_offset_grid_error_within_half_a_step(w, bits, group, scale_dtype) -> None:
    weight = _random_weight(*w)
    mask = weight > weight.median()
    scale, minimum = compute_offset_qparams(weight, bits, group, scale_dtype, mask=mask)
    codes = quantize_codes(weight, scale, None, bits, group, minimum=minimum)
    restored = dequantize_codes(codes, scale, None, bits, group, minimum=minimum)
    step = _expanded(scale, weight.shape[1], group)
    err = (weight - restored).abs()
    # plus float32 rounding of code * scale + minimum, relative to the weight's magnitude
    tolerance = step / 2 * (1 + 1e-5) + 4 * torch.finfo(torch.float32).eps * weight.abs()
    assert (err[mask] <= tolerance[mask]).all()


def test_all_zero_and_constant_groups() -> None:
    w = torch.zeros(3, 8)
    w[1] = 0.25
    for symmetric in (False, True):
        scale, zero = compute_qparams(w, 2, 4, symmetric)
        restored = dequantize_codes(quantize_codes(w, scale, zero, 2, 4), scale, zero, 2, 4)
        assert torch.isfinite(scale.float()).all()
        assert torch.equal(restored[[0, 2]], w[[0, 2]])  # all-zero rows stay exactly zero
        assert torch.allclose(restored[1], w[1], rtol=1e-3)  # a constant row is its own range end


def test_nan_weight_is_an_error() -> None:
    w = torch.randn(2, 8)
    w[1, 3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        compute_qparams(w, 4, None, False)


def test_kmeans_is_deterministic_and_sorted() -> None:
    x = torch.cat([torch.randn(500) - 4, torch.randn(2000) * 0.3, torch.randn(500) + 4])
    a = kmeans_1d(x, 3, seed=3)
    b = kmeans_1d(x, 3, seed=3)
    assert torch.equal(a, b)
    assert (a[1:] > a[:-1]).all()
    assert torch.allclose(a, torch.tensor([-4.0, 0.0, 4.0], dtype=torch.float64), atol=0.3)


def test_kmeans_fixed_point() -> None:
    # Lloyd's fixed point: each centre is the mean of the values nearest to it.
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0)) ** 3
    centers = kmeans_1d(x, 3, seed=0)
    ids = assign_clusters(x, split_boundaries(centers))
    for c in range(3):
        assert torch.isclose(x.double()[ids == c].mean(), centers[c], rtol=1e-9, atol=1e-12)


def test_kmeans_few_distinct_values() -> None:
    centers = kmeans_1d(torch.tensor([1.0, 1.0, 1.0, 2.0]), 3, seed=0)
    assert torch.isfinite(centers).all()
    assert kmeans_1d(torch.zeros(10), 3).eq(0).all()


@pytest.mark.parametrize("transform", ["rtn", "splitquant", "ocs"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_element_grid_nearest_codes_reproduce_quantize(transform: str, symmetric: bool) -> None:
    from hf_splitquant.methods import dequantize_weight, element_grid, pack_grid_codes, quantize_weight
    from hf_splitquant.spec import LayerSpec

    w = _random_weight(12, 40, 0.05, 5)
    spec = LayerSpec(40, 12, 3, 16, symmetric=symmetric, transform=transform, ocs_expand_ratio=0.1)
    grid = element_grid(w, spec)
    codes = grid.nearest_codes()
    packed = pack_grid_codes(grid, codes, spec)
    direct = quantize_weight(w, spec)
    restored = dequantize_weight(packed, spec, torch.float32)
    # the grid describes the stored format: its values are what dequantize gives back
    assert torch.allclose(restored, dequantize_weight(direct, spec, torch.float32), atol=1e-6)
    if transform != "ocs":
        assert torch.allclose(grid.values(codes), restored, atol=1e-6)
    else:
        from hf_splitquant.methods.ocs import fold_back

        assert torch.allclose(fold_back(grid.values(codes), grid.input_index, 40), restored, atol=1e-6)
    with pytest.raises(ValueError, match="codes"):
        pack_grid_codes(grid, codes.float(), spec)


def test_dequantize_codes_leaves_its_inputs_alone_and_follows_the_formula() -> None:
    """It computes in place on its own copy: float codes passed in stay unchanged (whole and ragged groups)."""
    from hf_splitquant.quant.grid import dequantize_codes

    for columns in (48, 40):  # groups of 16: a plain view of the codes, and a ragged last group
        codes = torch.randint(0, 8, (4, columns)).float()
        before = codes.clone()
        scale, zero, minimum = torch.rand(4, 3) + 0.1, torch.randint(0, 8, (4, 3)).float(), torch.randn(4, 3)
        expand = lambda t, n=columns: t.repeat_interleave(16, dim=1)[:, :n]  # noqa: E731
        assert torch.equal(dequantize_codes(codes, scale, zero, 3, 16), (codes - expand(zero)) * expand(scale))
        assert torch.equal(dequantize_codes(codes, scale, None, 3, 16, minimum=minimum),
                           codes * expand(scale) + expand(minimum))
        assert torch.equal(dequantize_codes(codes, scale, None, 3, 16), (codes - 4.0) * expand(scale))
        assert torch.equal(codes, before)
