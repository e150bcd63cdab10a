"""GPTQ error feedback on fixed element grids, output-aware clipping, and AR started from GPTQ's codes
(tiny random tensors; the real-layer study is ``benchmarks/study_layers.py``)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_splitquant.methods import dequantize_weight, element_grid, pack_grid_codes, tensor_shapes
from hf_splitquant.methods.attention_round import attention_round, expand_hessian, layer_objective
from hf_splitquant.methods.gptq import damp_hessian, gptq_round, hessian_objective, select_damping
from hf_splitquant.methods.ocs import fold_back
from hf_splitquant.methods.output_clip import diagonal_objective, output_clip_grid
from hf_splitquant.quant.grid import search_clip_qparams
from hf_splitquant.spec import LayerSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def make_spec(bits: int = 3, cols: int = 96, rows: int = 24, group: int | None = 32, **kw) -> LayerSpec:
    return LayerSpec(in_features=cols, out_features=rows, bits=bits, group_size=group, **kw)


def correlated_inputs(cols: int, n: int = 1200, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated features and uneven scales (like a transformer layer's)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + 0.5 * torch.eye(cols)
    scales = torch.rand(cols, generator=g) * 3 + 0.2
    return (torch.randn(n, cols, generator=g) @ mix) * scales


def weight(rows: int = 24, cols: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def folded_values(grid, codes: torch.Tensor, cols: int) -> torch.Tensor:
    values = grid.values(codes)
    return values if grid.input_index is None else fold_back(values, grid.input_index, cols)


@pytest.mark.parametrize("act_order", [False, True])
def test_identity_or_diagonal_hessian_gives_round_to_nearest(act_order: bool) -> None:
    w = weight()
    grid = element_grid(w, make_spec())
    for h in (torch.eye(96), torch.diag(torch.rand(96) + 0.1)):
        codes, info = gptq_round(grid, h, damping=0.01, block_size=16, act_order=act_order)
        assert codes.dtype == torch.uint8
        assert torch.equal(codes, grid.nearest_codes()), "uncorrelated inputs: nothing to compensate"
        assert info["objective"] == pytest.approx(info["objective_rtn"])


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits: int, act_order: bool) -> None:
    x = correlated_inputs(96)
    h = x.t() @ x
    w = weight()
    grid = element_grid(w, make_spec(bits))
    codes, info = gptq_round(grid, h, damping=0.01, block_size=32, act_order=act_order)
    assert int(codes.max()) <= grid.max_code
    objective = hessian_objective(grid.values(codes), w, h)
    assert objective == pytest.approx(info["objective"], rel=1e-6)
    rtn = hessian_objective(grid.values(grid.nearest_codes()), w, h)
    assert info["objective_rtn"] == pytest.approx(rtn, rel=1e-6)
    assert objective < 0.8 * rtn, f"GPTQ {objective:.4g} vs RTN {rtn:.4g}"


def test_lazy_blocks_do_not_change_the_result() -> None:
    x = correlated_inputs(96)
    h = x.t() @ x
    grid = element_grid(weight(), make_spec(3))
    one, info_one = gptq_round(grid, h, block_size=1)
    big, info_big = gptq_round(grid, h, block_size=1000)
    odd, _ = gptq_round(grid, h, block_size=7)
    # float rounding differs between the update orders; codes may flip only on exact ties
    assert (one != big).float().mean() < 0.01 and (one != odd).float().mean() < 0.01
    assert info_big["objective"] == pytest.approx(info_one["objective"], rel=1e-2)


def test_larger_damping_moves_toward_round_to_nearest() -> None:
    x = correlated_inputs(96)
    h = x.t() @ x
    grid = element_grid(weight(), make_spec(3))
    rtn = grid.nearest_codes()
    objectives, changed = [], []
    for damping in (0.001, 0.1, 10.0, 1e4):
        codes, info = gptq_round(grid, h, damping=damping)
        objectives.append(info["objective"])
        changed.append(int((codes != rtn).sum()))
    assert objectives == sorted(objectives), objectives
    assert objectives[0] < objectives[-1]
    assert changed == sorted(changed, reverse=True), changed
    assert changed[0] > 10 * max(changed[-1], 1)


def test_damp_hessian_handles_dead_inputs() -> None:
    x = correlated_inputs(12, n=200)
    x[:, 3] = 0.0  # an input that never fires
    h = x.t() @ x
    damped = damp_hessian(h, 0.1)
    live_mean = float(torch.cat([h.diagonal()[:3], h.diagonal()[4:]]).double().mean())
    assert damped.dtype == torch.float64
    assert float(damped[3, 3]) == pytest.approx(1.0 + 0.1 * live_mean)
    assert float(damped[0, 0]) == pytest.approx(float(h[0, 0]) + 0.1 * live_mean)
    assert torch.equal(damped - torch.diag(damped.diagonal()), (h - torch.diag(h.diagonal())).double())
    torch.linalg.cholesky(damped)  # positive definite
    assert torch.equal(damp_hessian(h, 0.0)[3, 3], torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError):
        damp_hessian(h, -1.0)
    # GPTQ with the dead input: finite, valid codes; the dead column is rounded to nearest
    w = weight(8, 12)
    grid = element_grid(w, make_spec(2, cols=12, rows=8, group=None))
    codes, info = gptq_round(grid, h, damping=0.0)
    assert torch.equal(codes[:, 3], grid.nearest_codes()[:, 3])
    assert info["objective"] < info["objective_rtn"]


def test_singular_hessian_gets_extra_damping() -> None:
    x = correlated_inputs(48, n=10)  # rank 10 < 48 inputs
    h = x.t() @ x
    grid = element_grid(weight(8, 48), make_spec(3, cols=48, rows=8, group=16))
    codes, info = gptq_round(grid, h, damping=0.0)
    assert info["damping"] >= 0.0 and int(codes.max()) <= grid.max_code
    assert info["objective"] <= info["objective_rtn"]


@pytest.mark.parametrize("transform, extra", [
    ("splitquant", {}),
    ("splitquant", {"splitquant_range": "part"}),
    ("splitquant", {"splitquant_range": "aligned"}),
    ("ocs", {"ocs_expand_ratio": 0.1}),
    ("ocs", {"ocs_expand_ratio": 0.1, "ocs_split": "naive"}),
])
def test_gptq_on_splitquant_and_ocs_grids(transform: str, extra: dict) -> None:
    cols, rows = 96, 24
    x = correlated_inputs(cols)
    h = x.t() @ x
    w = weight(rows, cols)
    spec = make_spec(3, cols, rows, transform=transform, **extra)
    grid = element_grid(w, spec)
    codes, info = gptq_round(grid, h)  # OCS: H expanded inside (grid.input_index)
    assert codes.shape == grid.weight.shape and int(codes.max()) <= grid.max_code
    if grid.input_index is not None:
        expanded = expand_hessian(h, grid.input_index)
        same, _ = gptq_round(grid, expanded)
        assert torch.equal(same, codes)
    packed = pack_grid_codes(grid, codes, spec)
    assert {k: (tuple(v.shape), v.dtype) for k, v in packed.items()} == tensor_shapes(spec)
    restored = dequantize_weight(packed, spec, torch.float32)
    torch.testing.assert_close(restored, folded_values(grid, codes, cols), rtol=0, atol=1e-6)
    # the folded layer's output error (original H) is the expanded objective, and beats RTN
    ours = hessian_objective(restored, w, h)
    rtn = hessian_objective(folded_values(grid, grid.nearest_codes(), cols), w, h)
    assert ours == pytest.approx(info["objective"], rel=1e-4)
    assert ours < 0.8 * rtn


def test_search_clip_importance_is_additive() -> None:
    w = weight(16, 80)
    base = search_clip_qparams(w, 2, 32, False)
    ones = search_clip_qparams(w, 2, 32, False, importance=torch.ones(80))
    assert torch.equal(base[0], ones[0]) and torch.equal(base[1], ones[1])
    skewed = torch.ones(80)
    skewed[::7] = 1e4
    other = search_clip_qparams(w, 2, 32, False, importance=skewed)
    assert not torch.equal(base[0], other[0]), "the importance must change some group's choice"


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("transform, extra", [("rtn", {}), ("rtn", {"symmetric": True}),
                                              ("ocs", {"ocs_expand_ratio": 0.1, "ocs_split": "naive"})])
def test_output_clip_never_worse_than_no_clip_on_the_diagonal_objective(bits: int, transform: str,
                                                                        extra: dict) -> None:
    cols, rows = 96, 24
    x = correlated_inputs(cols)
    h = x.t() @ x
    w = weight(rows, cols) * torch.linspace(0.2, 3.0, cols)  # uneven columns
    spec = make_spec(bits, cols, rows, transform=transform, **extra)
    plain = element_grid(w, spec)
    mse = element_grid(w, make_spec(bits, cols, rows, transform=transform, clip="mse", **extra))
    ours = output_clip_grid(w, spec, h)
    importance = h.diagonal()
    if ours.input_index is not None:  # naive split: the same expanded weight; compare per expanded column
        assert torch.equal(ours.weight, plain.weight)
        importance = importance[torch.cat([torch.arange(cols), ours.input_index.long()])]

    def objective(grid) -> float:
        return diagonal_objective(grid.values(grid.nearest_codes()), grid.weight, importance)

    assert objective(ours) <= objective(plain) * (1 + 1e-9)
    assert objective(ours) < objective(mse), "output-aware beats the weight-MSE clip on its own objective"
    # the format does not change: packed with the method's tensors, read back by its dequantize
    packed = pack_grid_codes(ours, ours.nearest_codes(), spec)
    assert {k: (tuple(v.shape), v.dtype) for k, v in packed.items()} == tensor_shapes(spec)
    restored = dequantize_weight(packed, spec, torch.float32)
    torch.testing.assert_close(restored, folded_values(ours, ours.nearest_codes(), cols), rtol=0, atol=1e-6)


def test_output_clip_qa_split_and_errors() -> None:
    cols, rows = 64, 16
    x = correlated_inputs(cols)
    h = x.t() @ x
    w = weight(rows, cols)
    for split, layout in itertools.product(("qa", "auto"), ("appended", "source_group")):
        spec = make_spec(2, cols, rows, transform="ocs", ocs_expand_ratio=0.1, ocs_split=split, ocs_layout=layout)
        grid = output_clip_grid(w, spec, h.diagonal())  # the diagonal alone is enough
        codes, _ = gptq_round(grid, h)
        restored = dequantize_weight(pack_grid_codes(grid, codes, spec), spec, torch.float32)
        torch.testing.assert_close(restored, folded_values(grid, codes, cols), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="'splitquant' format has no clipped grids"):
        output_clip_grid(w, make_spec(2, cols, rows, transform="splitquant"), h)
    with pytest.raises(ValueError, match="inputs"):
        output_clip_grid(w, make_spec(2, cols, rows), h[:10, :10])
    with pytest.raises(ValueError, match="start with 1.0"):
        output_clip_grid(w, make_spec(2, cols, rows), h, factors=(0.9, 1.0))


@pytest.mark.parametrize("bits", [2, 3])
def test_attention_round_from_gptq_codes_is_at_least_as_good(bits: int) -> None:
    x = correlated_inputs(96)
    h = x.t() @ x
    count = x.shape[0]
    w = weight()
    grid = element_grid(w, make_spec(bits))
    gptq_codes, _ = gptq_round(grid, h, damping=0.01)
    gptq_mse = layer_objective(grid.values(gptq_codes), w, h, count)
    codes, info = attention_round(grid, h, count, {"iterations": 30}, init_codes=gptq_codes)
    mse = layer_objective(grid.values(codes), w, h, count)
    assert info["mse_init"] == pytest.approx(gptq_mse)
    assert mse == pytest.approx(info["mse"])
    assert mse <= gptq_mse
    # with no steps the start codes come back (they beat RTN)
    same, info0 = attention_round(grid, h, count, {"iterations": 0}, init_codes=gptq_codes)
    assert torch.equal(same, gptq_codes) and info0["kept_init"]
    # keep_best also guards against bad start codes: all-zero codes are far worse than RTN
    zeros = torch.zeros_like(gptq_codes)
    codes, info = attention_round(grid, h, count, {"iterations": 0}, init_codes=zeros)
    assert torch.equal(codes, grid.nearest_codes()) and not info["kept_init"]
    with pytest.raises(ValueError, match="init_codes"):
        attention_round(grid, h, count, {"iterations": 1}, init_codes=gptq_codes.float())


def test_select_damping_by_cross_validation() -> None:
    cols = 64
    grid = element_grid(weight(16, cols), make_spec(2, cols, 16))
    candidates = (0.001, 0.1, 1.0, 10.0)
    # plenty of tokens per fold: the statistics generalise, little damping is best
    x = correlated_inputs(cols, n=8000)  # one distribution, split into two folds
    many = [x[:4000].t() @ x[:4000], x[4000:].t() @ x[4000:]]
    best, scores = select_damping(grid, many, candidates)
    assert list(scores) == list(candidates) and best == min(scores, key=scores.get)
    assert best <= 0.1 and scores[0.001] < scores[10.0] < 1.0
    # fewer tokens per fold than inputs: undamped GPTQ fits noise, more damping is chosen
    few = [x[:24].t() @ x[:24], x[24:48].t() @ x[24:48]]
    best_few, scores_few = select_damping(grid, few, candidates)
    assert best_few >= 1.0 and scores_few[0.001] > scores_few[best_few]
    with pytest.raises(ValueError, match="two folds"):
        select_damping(grid, many[:1], candidates)


@pytest.mark.slow
def test_layer_study_quick(tmp_path: Path) -> None:
    """``benchmarks/study_layers.py --quick`` runs end to end on real SmolLM2 layers."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "study_layers.py"
    out = tmp_path / "study.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), "--quick", "--output", str(out)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    methods = {r["method"] for r in rows}
    assert {"rtn", "mse_clip", "out_clip", "gptq@0.1", "out_clip+gptq@cv", "ar", "ar<-gptq@0.1"} <= methods
    assert all(r["fit_vs_rtn"] > 0 and r["held_vs_rtn"] > 0 for r in rows)
    assert all(r["fit_vs_rtn"] == 1.0 for r in rows if r["method"] == "rtn")
    # the output-aware clip + GPTQ beats RTN on the data it was fitted to, on every layer
    assert all(r["fit_vs_rtn"] < 1.0 for r in rows if r["method"] == "out_clip+gptq@0.1")
    assert out.with_suffix(".md").read_text().startswith("# Layer study")


# ----------------------------------------------------------------------------------------------------
# The float model as the target (methods/float_target.py)
# ----------------------------------------------------------------------------------------------------


def _float_and_quantized_inputs(cols: int = 48, n: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    """Float inputs X and the same tokens' inputs X~ after some upstream quantization error."""
    x = correlated_inputs(cols, n=n, seed=4)
    drift = torch.randn(cols, cols, generator=torch.Generator().manual_seed(5)) * 0.08
    return x, x + x @ drift + 0.05 * torch.randn(n, cols, generator=torch.Generator().manual_seed(6))


def test_float_target_is_the_weight_when_the_inputs_are_the_float_ones() -> None:
    from hf_splitquant.methods.float_target import float_model_target

    x = correlated_inputs(48, n=500, seed=2)
    w = weight(8, 48)
    h = x.t() @ x
    assert torch.allclose(float_model_target(w, h, h, damping=0.1), w, atol=1e-5)
    xf, xq = _float_and_quantized_inputs()
    hq, c = xq.t() @ xq, xf.t() @ xq
    assert not torch.allclose(float_model_target(w, hq, c, damping=0.1), w, atol=1e-2)
    assert torch.allclose(float_model_target(w, hq, c, damping=1e6), w, atol=1e-3)  # regularised back to W


def test_float_target_minimises_the_float_model_objective() -> None:
    """Undamped, W* is the least-squares solution of X~ W*^T = X W^T; the objective helper equals the direct
    |X~ V^T - X W^T|^2 / (N out), also for OCS-expanded values."""
    from hf_splitquant.methods.float_target import float_model_objective, float_model_target

    x, xq = _float_and_quantized_inputs()
    w = weight(8, 48)
    hq, c, hf = xq.t() @ xq, x.t() @ xq, x.t() @ x
    target = float_model_target(w, hq, c, damping=0.0)
    expected = torch.linalg.lstsq(xq.double(), (x @ w.t()).double()).solution.t().float()
    assert torch.allclose(target, expected, atol=1e-3, rtol=1e-3)
    n = x.shape[0]

    def direct(v: torch.Tensor, xin: torch.Tensor) -> float:
        return float(((xin.double() @ v.double().t() - x.double() @ w.double().t()) ** 2).sum()) / (n * v.shape[0])

    assert float_model_objective(target, w, hq, c, hf, n) == pytest.approx(direct(target, xq), rel=1e-4)
    assert float_model_objective(w, w, hq, c, hf, n) == pytest.approx(direct(w, xq), rel=1e-4)
    assert float_model_objective(target, w, hq, c, hf, n) < 0.5 * float_model_objective(w, w, hq, c, hf, n)
    index = torch.tensor([3, 7])  # OCS: inputs 3 and 7 duplicated, each half in both copies
    expanded = torch.cat([w, w[:, index] * 0.5], dim=1)
    expanded[:, index] *= 0.5
    assert float_model_objective(expanded, w, hq, c, hf, n, input_index=index) == pytest.approx(direct(w, xq), rel=1e-4)


def test_float_target_rejects_mismatched_statistics() -> None:
    from hf_splitquant.methods.float_target import float_model_target

    with pytest.raises(ValueError, match="must both be"):
        float_model_target(weight(8, 48), torch.eye(48), torch.eye(40))


def test_gptq_options_validate_the_target() -> None:
    from hf_splitquant.methods.gptq import GPTQOptions

    assert GPTQOptions.from_dict({"target": "float"}).target == "float"
    with pytest.raises(ValueError, match="target"):
        GPTQOptions.from_dict({"target": "model"})
    with pytest.raises(ValueError, match="target_damping"):
        GPTQOptions.from_dict({"target_damping": -1})
