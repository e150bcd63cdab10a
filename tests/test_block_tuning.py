"""Block-wise tuning after calibrated rounding (``SplitQuantConfig(block_tuning=...)``): it starts exactly at the
rounding's result, lowers each block's error against the float model, keeps the rounding where the held-out
error would rise, and its result saves and reloads like any packed model. (Two processes give the one-process
result: ``tests/test_calibration.py::test_two_process_calibration_is_identical_to_one_process``.)"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, model_output, tiny_gpt2, tiny_llama
from transformers import AutoModelForCausalLM

import hf_splitquant
from hf_splitquant import PackedLinear, SplitQuantConfig
from hf_splitquant.calibration.block_tuning import _fake_quant_copy
from hf_splitquant.kernels import kernel_mode
from hf_splitquant.methods.block_tuning import (
    BlockTuningOptions,
    cosine_factor,
    masked_mse,
    masked_token_error,
)
from hf_splitquant.speed import native_bf16

pytestmark = pytest.mark.usefixtures("one_thread")


def samples(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def calibrated(model: torch.nn.Module, block_tuning: dict | None, bits: int = 2) -> torch.nn.Module:
    config = SplitQuantConfig(bits=bits, group_size=32, rounding="gptq", block_tuning=block_tuning)
    return hf_splitquant.quantize(model, config, calibration_data=samples(32, 16, seed=1), batch_size=8,
                                  progress=False)


def packed_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v for n, m in model.named_modules() if isinstance(m, PackedLinear)
            for k, v in m.packed_tensors().items()}


def test_the_fake_quant_copy_starts_exactly_at_the_packed_layer() -> None:
    torch.manual_seed(0)
    for build in (tiny_llama, tiny_gpt2):  # Linear and Conv1D layers
        model = calibrated(build().eval(), None)
        for packed in [m for m in model.modules() if isinstance(m, PackedLinear)]:
            x = torch.randn(3, packed.in_features)
            copy_ = _fake_quant_copy(packed, seed=0)
            expected = packed.packed_tensors()
            assert all(torch.equal(v, expected[k]) for k, v in copy_.packed_tensors().items())
            with torch.no_grad(), kernel_mode("reference"):  # the exact format, not the int4 kernel's bf16
                torch.testing.assert_close(copy_(x), packed(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["mse", "relative"])
def test_tuning_lowers_each_blocks_error_and_tracks_the_float_model_better(loss: str) -> None:
    torch.manual_seed(0)
    base = tiny_llama().eval()
    held_out = samples(16, 16, seed=2)
    with torch.no_grad():
        reference = base(input_ids=held_out).logits
    errors, models = {}, {}
    for name, tuning in (("gptq", None), ("tuned", {"epochs": 20, "keep_best": False, "loss": loss})):
        models[name] = calibrated(copy.deepcopy(base), tuning)
        with torch.no_grad():
            errors[name] = float((models[name](input_ids=held_out).logits - reference).pow(2).mean())
    blocks = models["tuned"].calibration_report["blocks"]
    assert [b["block"] for b in blocks] == [0, 1] and all(b["layers"] == 7 for b in blocks)
    assert all(b["fitted_after"] < b["fitted_before"] and b["steps"] == 20 * 3 and b["loss"] == loss for b in blocks)
    assert models["tuned"].calibration_report["block_tuning"]["epochs"] == 20
    assert models["gptq"].calibration_report["blocks"] == []
    # one block's activations: its inputs and outputs, plus the float model's block inputs (= the targets)
    one = 32 * 16 * 64 * 4  # samples x tokens x hidden x float32
    assert models["gptq"].calibration_report["activations_mb"] * 2**20 == 2 * one
    assert models["tuned"].calibration_report["activations_mb"] * 2**20 == 3 * one
    assert errors["tuned"] < errors["gptq"]


def test_a_block_whose_heldout_error_rises_keeps_the_rounding() -> None:
    torch.manual_seed(0)
    base = tiny_llama().eval()
    plain = calibrated(copy.deepcopy(base), None)
    wrecked = calibrated(copy.deepcopy(base), {"epochs": 3, "weight_lr": 50.0, "scale_lr": 5.0})
    assert all(b["kept_rounding"] and b["heldout_after"] > b["heldout_before"]
               for b in wrecked.calibration_report["blocks"])
    a, b = packed_state(plain), packed_state(wrecked)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def norm_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "layers." in n and "norm" in n}


def test_norm_lr_trains_the_blocks_norms_and_a_block_that_keeps_its_rounding_gets_them_back() -> None:
    torch.manual_seed(0)
    base = tiny_llama().eval()
    for p in norm_weights(base):  # not all ones, so a restore to the start is told from a reset
        base.get_parameter(p).data.uniform_(0.5, 1.5)
    before = norm_weights(base)
    frozen = calibrated(copy.deepcopy(base), {"epochs": 4, "keep_best": False})
    assert all(torch.equal(v, before[k]) for k, v in norm_weights(frozen).items())
    tuned = calibrated(copy.deepcopy(base), {"epochs": 4, "keep_best": False, "norm_lr": 0.01})
    after = norm_weights(tuned)
    assert len(after) == 4 and all(not torch.equal(v, before[k]) for k, v in after.items())
    assert all(b["fitted_after"] < b["fitted_before"] for b in tuned.calibration_report["blocks"])
    wrecked = calibrated(copy.deepcopy(base), {"epochs": 3, "norm_lr": 5.0})
    assert all(b["kept_rounding"] for b in wrecked.calibration_report["blocks"])
    assert all(torch.equal(v, before[k]) for k, v in norm_weights(wrecked).items())


def test_a_tuned_model_saves_and_reloads_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = calibrated(tiny_llama().eval(), {"epochs": 2, "keep_best": False}, bits=3)
    ids = samples(2, 12, seed=3)
    expected = model_output(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(model_output(reloaded, ids), expected)
    assert reloaded.config.quantization_config.block_tuning == {"epochs": 2, "keep_best": False}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"block_tuning": {}}, "set `rounding`"),
    ({"rounding": "gptq", "transform": "splitquant", "block_tuning": {}}, "RTN format only"),
    ({"rounding": "gptq", "block_tuning": {"epoch": 2}}, "unknown block_tuning ['epoch']"),
    ({"rounding": "gptq", "block_tuning": {"scale_lr": 0}}, "scale_lr"),
    ({"rounding": "gptq", "block_tuning": {"norm_lr": -1e-3}}, "norm_lr"),
    ({"rounding": "gptq", "block_tuning": {"target": "model"}}, "target"),
    ({"rounding": "gptq", "block_tuning": {"loss": "l1"}}, "loss"),
    ({"rounding": "gptq", "block_tuning": [1]}, "must be a dict"),
])
def test_bad_block_tuning_options_are_refused_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SplitQuantConfig(bits=2, **kwargs)


def test_objective_pieces() -> None:
    out, target = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert masked_mse(out, target, mask) == (pytest.approx(12.0), 3)
    assert masked_mse(out, target, None)[1] == 6
    assert cosine_factor(0, 10) == 1.0 and cosine_factor(5, 10) == pytest.approx(0.5) and 0 < cosine_factor(9, 10) < 0.03
    assert BlockTuningOptions.from_dict(None) == BlockTuningOptions()
    # "relative": each token's squared error over its target's squared norm, so a token 1000x larger than the
    # others with the same relative error counts the same
    target = torch.tensor([[[1.0, 0.0], [1000.0, 0.0], [0.0, 2.0]]])
    out = target * 1.1
    total, n = masked_token_error(out, target, None, "relative")
    assert n == 3 and float(total) == pytest.approx(3 * 0.01)
    assert float(masked_token_error(out, target, None, "mse")[0]) == pytest.approx(0.01 + 1e4 + 0.04)
    assert float(masked_token_error(out, target, torch.tensor([[True, False, True]]), "relative")[0]) == \
        pytest.approx(0.02)


def test_best_epoch_ends_each_block_at_its_lowest_heldout_loss() -> None:
    torch.manual_seed(0)
    base = tiny_llama().eval()
    options = {"epochs": 12, "keep_best": False}  # on this model the held-out loss wanders: blocks end early
    last = calibrated(copy.deepcopy(base), options)
    best = calibrated(copy.deepcopy(base), {**options, "best_epoch": True})
    restored = 0
    first, tracked = last.calibration_report["blocks"][0], best.calibration_report["blocks"][0]
    # the first block trains on the same inputs in both runs (later ones see what the earlier ones became)
    assert tracked["heldout_curve"][-1] == pytest.approx(first["heldout_after"], rel=1e-5)
    assert "heldout_curve" not in first
    for chosen in best.calibration_report["blocks"]:
        curve = chosen["heldout_curve"]
        assert len(curve) == 12
        losses = [chosen["heldout_before"], *curve]
        assert chosen["best_epoch"] == losses.index(min(losses))
        assert chosen["kept_rounding"] == (chosen["best_epoch"] == 0)  # epoch 0 is the rounding's codes
        if chosen["best_epoch"]:
            assert chosen["heldout_after"] == pytest.approx(min(losses), rel=1e-5)
        restored += 0 < chosen["best_epoch"] < 12
    assert restored >= 1  # the test exercises going back to an earlier epoch


def test_best_epoch_is_refused_when_not_a_bool() -> None:
    with pytest.raises(ValueError, match="best_epoch"):
        SplitQuantConfig(bits=2, group_size=32, rounding="gptq", block_tuning={"best_epoch": "yes"})


def test_bfloat16_training_steps_still_lower_the_error_and_measure_in_float32() -> None:
    torch.manual_seed(0)
    base = tiny_llama().eval()
    options = {"epochs": 20, "keep_best": False}
    full = calibrated(copy.deepcopy(base), options).calibration_report["blocks"]
    half = calibrated(copy.deepcopy(base), {**options, "compute_dtype": "bfloat16"}).calibration_report["blocks"]
    assert all(b["fitted_after"] < b["fitted_before"] for b in half)
    # the first block starts from the same codes: its "before" is measured in float32 in both runs
    assert half[0]["fitted_before"] == full[0]["fitted_before"]
    assert half[0]["fitted_after"] != full[0]["fitted_after"]  # the steps did run in bf16
    assert {b["compute_dtype"] for b in half} == {"bfloat16"} and {b["compute_dtype"] for b in full} == {"float32"}
    # "auto": bf16 exactly where this machine computes it natively, the same numbers as asking for it
    auto = calibrated(copy.deepcopy(base), {**options, "compute_dtype": "auto"}).calibration_report["blocks"]
    same_as = half if native_bf16("cpu") else full
    assert [b["fitted_after"] for b in auto] == [b["fitted_after"] for b in same_as]
    assert {b["compute_dtype"] for b in auto} == {same_as[0]["compute_dtype"]}
    with pytest.raises(ValueError, match="compute_dtype"):
        SplitQuantConfig(bits=2, group_size=32, rounding="gptq", block_tuning={"compute_dtype": "float16"})
