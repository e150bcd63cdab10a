"""Fast matmul paths give the reference path's outputs (within bf16 rounding); the dispatcher
falls back cleanly."""

from __future__ import annotations

import pytest
import torch
from helpers import model_output
from transformers import AutoModelForCausalLM

from hf_splitquant import PackedLinear, SplitQuantConfig, kernels
from hf_splitquant.kernels import kernel_mode
from hf_splitquant.methods import get_format
from hf_splitquant.quant.int4 import affine_codes, affine_terms
from hf_splitquant.spec import LayerSpec


def _layer(spec: LayerSpec, seed: int = 0) -> PackedLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(spec.out_features, spec.in_features, generator=g) * 0.05
    w += (torch.rand(w.shape, generator=g) < 0.01) * 0.5
    return PackedLinear.from_float(w, torch.randn(spec.out_features, generator=g) * 0.1, spec).eval()


def _reference(layer: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    layer.kernel_mode = "reference"
    try:
        return layer(x.float())
    finally:
        layer.kernel_mode = None


FAST_CASES = [(t, b) for t in ("rtn", "ocs") for b in (2, 3, 4, 5, 8)] + [("splitquant", b) for b in (2, 3, 4)]
SHAPES = {"rtn": [(96, 128), (100, 200)], "ocs": [(80, 160)], "splitquant": [(100, 200)]}


@pytest.mark.skipif(not kernels.int4_available(), reason="this torch build has no int4 CPU kernel")
@pytest.mark.parametrize("group_size", [None, 32, 64, 128])
@pytest.mark.parametrize(("transform", "bits", "shape"), [(t, b, s) for t, b in FAST_CASES for s in SHAPES[t]])
def test_int4_path_matches_reference(transform, bits, shape, group_size):
    out_f, in_f = shape
    spec = LayerSpec(in_f, out_f, bits, group_size, symmetric=bits == 3, transform=transform, ocs_expand_ratio=0.05,
                     splitquant_range="part" if bits == 4 else "cluster")
    layer = _layer(spec)
    tokens = min(5, kernels.int4_max_tokens(spec))
    x = torch.randn(1, tokens, in_f, generator=torch.Generator().manual_seed(bits * 1000 + in_f)).to(torch.bfloat16)
    assert layer.kernel_for(x) == "int4"
    with torch.no_grad():
        fast = layer(x[:, :tokens])  # int4 terms
        ref = _reference(layer, x[:, :tokens])
    assert layer._int4.terms == kernels.int4_terms(spec)
    assert fast.dtype == torch.bfloat16 and fast.shape == (1, tokens, out_f)
    # bf16 activations, grid parameters and output: about 3 significant digits
    assert torch.allclose(fast.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("bits", [5, 8])
def test_two_term_layers_keep_each_term_the_size_of_the_weights(bits):
    """A group whose zero point sits far from the middle needs a per-group code offset. Carried by the
    low term it made both terms large and opposite, and their bf16 outputs lost the result to
    cancellation (a CI failure: 2.9% of the output range on an 8-bit layer). Each term must stay about
    the size of the weights it adds up to."""
    levels = 2 ** bits
    codes = torch.cat([torch.zeros(4, 60), torch.full((4, 4), levels - 1.0)], dim=1)  # lopsided: zero at code 1
    codes[:, :30] += 2
    scale = torch.full((4, 64), 0.01)
    origin = torch.ones(4, 64)
    terms = affine_terms(codes, scale, origin, bits, 64)
    weights = [((q.float() - 8) * s + z) for q, s, z in terms]
    assert torch.allclose(sum(weights), (codes - origin) * scale, atol=1e-6)
    assert weights[0].abs().max() <= ((codes - origin) * scale).abs().max() + 8 * 0.01 + 1e-6
    assert weights[1].abs().max() <= 8 * 0.01 + 1e-6
    assert torch.equal(affine_codes(terms, origin, 64, bits), codes.to(torch.int32))


@pytest.mark.skipif(not kernels.int4_available(), reason="this torch build has no int4 CPU kernel")
@pytest.mark.parametrize(("splitquant_range", "bits", "symmetric", "terms"), [
    ("cluster", 2, False, 6), ("cluster", 3, True, 3), ("aligned", 2, False, 3), ("aligned", 3, False, 3),
    ("part", 3, False, 3), ("part", 4, False, 6)])
def test_splitquant_integer_origins_take_one_term_per_cluster(splitquant_range, bits, symmetric, terms):
    """Grids ``(q - zero) * scale`` whose zeros the kernel's codes reach need no mask term per cluster."""
    spec = LayerSpec(200, 100, bits, 64, symmetric=symmetric, transform="splitquant",
                     splitquant_range=splitquant_range)
    layer = _layer(spec, seed=3)
    x = torch.randn(1, 3, 200).to(torch.bfloat16)
    with torch.no_grad():
        fast = layer(x)
        ref = _reference(layer, x)
    assert layer.kernel_for(x) == "int4" and layer._int4.terms == terms == kernels.int4_terms(spec)
    assert torch.allclose(fast.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_splitquant_zero_points_outside_the_kernel_range_are_refused():
    spec = LayerSpec(64, 32, 2, 32, transform="splitquant", splitquant_range="aligned")
    layer = _layer(spec)
    tensors = layer.packed_tensors()
    tensors["weight_zero"] = torch.full_like(tensors["weight_zero"], 100)  # a corrupt checkpoint
    codes = torch.zeros(32, 64, dtype=torch.uint8)
    fmt = get_format(spec)
    assert fmt.invalid_values(tensors, spec)[0] == "weight_zero"  # loading refuses such a checkpoint
    with pytest.raises(ValueError, match="corrupt"):  # and a layer patched in memory is not computed wrongly
        fmt.int4_parts(tensors, spec, codes, 32)


def test_dispatcher_paths_and_fallbacks():
    rtn4 = _layer(LayerSpec(64, 32, 4, 32))
    split = _layer(LayerSpec(64, 32, 2, 32, transform="splitquant"))
    split5 = _layer(LayerSpec(64, 32, 5, 32, transform="splitquant"))
    odd_group = _layer(LayerSpec(64, 32, 4, 16))
    eight = _layer(LayerSpec(64, 32, 8, 32))
    one = torch.randn(1, 64)
    assert rtn4.kernel_for(one) == rtn4.kernel_for(one.bfloat16()) == "int4"  # few tokens: any dtype
    assert rtn4.kernel_for(torch.randn(kernels.INT4_MAX_TOKENS + 1, 64).bfloat16()) == "dequant-bf16"  # many tokens
    assert rtn4.kernel_for(torch.randn(kernels.INT4_MAX_TOKENS + 1, 64)) == "reference"  # many float32 tokens: exact
    # multi-term layouts hand over to dequantize + bf16 matmul at fewer tokens
    assert split.kernel_for(one.bfloat16()) == eight.kernel_for(one.bfloat16()) == "int4"
    tokens = kernels.int4_max_tokens(split.spec) + 1
    assert tokens <= kernels.INT4_MAX_TOKENS
    assert split.kernel_for(torch.randn(tokens, 64).bfloat16()) == "dequant-bf16"
    for layer in (split5, odd_group):
        assert layer.kernel_for(one.bfloat16()) == "dequant-bf16"
        assert kernels.int4_reason(layer.spec, one.device) is not None
        assert layer.kernel_for(one) == "reference"  # float32 without a kernel: exact
    with torch.no_grad():
        assert rtn4(one).dtype == torch.float32
    kernels.set_kernel_mode("fast")
    try:
        assert rtn4.kernel_for(torch.randn(kernels.INT4_MAX_TOKENS + 1, 64)) == "dequant-bf16"
    finally:
        kernels.set_kernel_mode("auto")
    kernels.set_kernel_mode("reference")
    try:
        assert rtn4.kernel_for(one.bfloat16()) == "reference"
    finally:
        kernels.set_kernel_mode("auto")
    with pytest.raises(ValueError, match="kernel mode"):
        kernels.set_kernel_mode("turbo")
    # training keeps the exact differentiable path
    x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
    assert rtn4.kernel_for(x) == "reference"


def test_layout_cache_is_built_once_and_invalidated():
    layer = _layer(LayerSpec(64, 32, 4, 32))
    x = torch.randn(1, 64).bfloat16()
    with torch.no_grad():
        layer(x)
        cached = layer._int4
        layer(x)
    assert cached is not None and layer._int4 is cached
    layer.load_state_dict(layer.state_dict())
    assert layer._int4 is None


def test_bf16_model_uses_fast_paths_and_stays_close(float_checkpoints, tmp_path, input_ids):
    config = SplitQuantConfig(bits=4, group_size=32)
    packed = AutoModelForCausalLM.from_pretrained(float_checkpoints["llama"], quantization_config=config)
    packed.save_pretrained(tmp_path)
    fp32 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    layer = bf16.model.layers[0].mlp.down_proj
    assert layer.kernel_for(torch.zeros(1, 1, 96, dtype=torch.bfloat16)) == "int4"
    ref = model_output(fp32, input_ids[:, :1])
    fast = model_output(bf16, input_ids[:, :1]).float()
    assert torch.allclose(fast, ref, atol=0.05 * ref.abs().max().item())
    with torch.no_grad():
        generated = bf16.generate(input_ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


def test_casting_a_packed_model_keeps_its_stored_grid():
    layer = _layer(LayerSpec(64, 32, 4, 32))
    before = {k: v.clone() for k, v in layer.packed_tensors().items()}
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    for name, tensor in layer.packed_tensors().items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name])


@pytest.mark.slow
def test_torch_compile_runs_packed_model_without_graph_breaks(float_checkpoints, input_ids):
    config = SplitQuantConfig(bits=4, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(float_checkpoints["llama"], quantization_config=config,
                                                 dtype=torch.bfloat16).eval()
    ids = input_ids[:1, :3]
    with torch.no_grad():
        eager = model(input_ids=ids).logits.float()
        explained = torch._dynamo.explain(model)(input_ids=ids)
        compiled = torch.compile(model)(input_ids=ids).logits.float()
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert torch.allclose(compiled, eager, atol=0.02 * eager.abs().max().item())


@pytest.mark.parametrize("spec", [
    LayerSpec(64, 32, 2, 32, transform="splitquant", splitquant_range="aligned"),
    LayerSpec(64, 32, 3, 32, transform="splitquant"),
    LayerSpec(64, 32, 4, 32, transform="ocs", ocs_expand_ratio=0.05),
    LayerSpec(64, 32, 3, 32),
], ids=["splitquant-aligned", "splitquant-cluster", "ocs", "rtn-int3"])
def test_many_token_dequantize_compiles_without_graph_breaks_and_matches_eager(spec):
    # SplitQuant runs its eager dequantize as one opaque operator inside torch.compile (a per-call check broke the
    # graph, and its compiled table gathers were slower than eager); OCS (its check skipped when compiling) and RTN
    # are traced
    layer = _layer(spec).to(torch.bfloat16)
    x = torch.randn(2, 100, 64, dtype=torch.bfloat16)
    assert layer.kernel_for(x) in ("dequant-bf16", "int4")
    with kernel_mode("auto"), torch.no_grad():
        eager = layer(x)
        explained = torch._dynamo.explain(layer)(x)
        compiled = torch.compile(layer, backend="eager", fullgraph=True)(x)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert torch.equal(compiled, eager)
    key = kernels.dequantize_key(spec)
    assert (key is not None) == (spec.transform == "splitquant")
    if key is not None:
        torch.library.opcheck(kernels._dequantize_op, ([layer.packed_tensors()[n] for n in key[1]], key[0],
                                                       torch.bfloat16))


@pytest.mark.skipif(not kernels.int4_available(), reason="this torch build has no int4 CPU kernel")
def test_stacked_layouts_give_each_members_output_bit_for_bit_without_a_second_copy():
    specs = [LayerSpec(in_features=128, out_features=rows, bits=4, group_size=64, has_bias=True)
             for rows in (128, 64, 64)]
    layers = [_layer(spec, seed) for seed, spec in enumerate(specs)]
    layouts = [layer._built_layout() for layer in layers]
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    alone = [kernels.int4_linear(x, lay, None) for lay in layouts]
    stacked, members = kernels.stack_int4_layouts(layouts)
    assert stacked.out_features == 256 and stacked.plain
    assert torch.equal(kernels.int4_linear(x, stacked, None), torch.cat(alone, dim=-1))
    for member, y in zip(members, alone):
        # views into the stacked tensors: no second copy of the weights or scales
        assert member.weight.untyped_storage().data_ptr() == stacked.weight.untyped_storage().data_ptr()
        assert member.scales_and_zeros.untyped_storage().data_ptr() == stacked.scales_and_zeros.untyped_storage().data_ptr()
        assert not member.plain  # strided scales: never handed to the kernel as they are (it would misread them)
        assert torch.equal(kernels.int4_linear(x, member, None), y)
    # what cannot be stacked is refused: other kernel groups, rows that are not whole packing blocks, one layout
    other_group = _layer(LayerSpec(in_features=128, out_features=64, bits=4, group_size=32, has_bias=True))
    odd_rows = _layer(LayerSpec(in_features=128, out_features=48, bits=4, group_size=64, has_bias=True))
    assert kernels.stack_int4_layouts([layouts[0], other_group._built_layout()]) is None
    assert kernels.stack_int4_layouts([layouts[0], odd_rows._built_layout()]) is None
    assert kernels.stack_int4_layouts(layouts[:1]) is None
