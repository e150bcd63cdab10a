"""Calibration API (sequential block-by-block Attention Round), coding-length bit allocation, and the
2-process torchrun calibration that must give the same packed model as one process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from helpers import VOCAB, model_output, tiny_bert, tiny_llama
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

import hf_splitquant
import splitquant_assets as assets
from hf_splitquant import SplitQuantConfig, quantization_report
from hf_splitquant.calibration import ExactSum, calibrate_and_quantize
from hf_splitquant.methods.coding_length import (
    allocate_by_coding_length,
    coding_length,
    coding_length_per_parameter,
)
from hf_splitquant.methods.mixquant import spec_bits

ROOT = Path(__file__).resolve().parents[1]
AR_FAST = {"iterations": 20}


pytestmark = pytest.mark.usefixtures("one_thread")


def token_samples(n: int, length: int | None = None, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        size = length or int(torch.randint(4, 24, (1,), generator=g))
        out.append(torch.randint(3, VOCAB, (size,), generator=g).tolist())
    return out


def ar_config(**kwargs) -> SplitQuantConfig:  # noqa: ANN003
    base = {"bits": 2, "group_size": 32, "rounding": "attention_round", "rounding_options": AR_FAST}
    return SplitQuantConfig(**{**base, **kwargs})


# --------------------------------------------------------------------------------------------
# Coding length
# --------------------------------------------------------------------------------------------


def test_coding_length_is_the_log_det_formula_with_m_rows() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 10, dtype=torch.float64) * 0.3
    m, n, eps = 6, 10, 0.5
    direct = (m + n) / 2 * torch.logdet(torch.eye(m, dtype=torch.float64) + m / (n * eps**2) * w @ w.T) / torch.log(
        torch.tensor(2.0, dtype=torch.float64))
    assert coding_length(w, eps) == pytest.approx(float(direct), rel=1e-10)
    assert coding_length(w.T, eps) != pytest.approx(float(direct), rel=1e-3)  # m = out rows, not symmetric
    assert coding_length(torch.zeros(4, 5), eps) == 0.0
    assert coding_length(w, 0.1) > coding_length(w, 0.5)  # finer distortion costs more bits


def _layers(count: int, seed: int) -> tuple[dict, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    weights, costs, sizes = {}, {}, {}
    cfg = SplitQuantConfig(group_size=32)
    for i in range(count):
        out_f, in_f = [(64, 64), (96, 64), (64, 128)][i % 3]
        scale = float(torch.rand(1, generator=g)) * 2 + 0.05
        weights[f"l{i}"] = torch.randn(out_f, in_f, generator=g) * scale
        costs[f"l{i}"] = {b: spec_bits(cfg.spec_for(in_f, out_f, False, bits=b)) for b in (2, 3, 4, 5, 6, 8)}
        sizes[f"l{i}"] = out_f * in_f
    return weights, costs, sizes


@pytest.mark.parametrize("target", [2.9, 3.6, 5.0, 7.0])
def test_coding_length_allocation_meets_the_budget(target: float) -> None:
    weights, costs, sizes = _layers(12, seed=1)
    chosen = allocate_by_coding_length(weights, costs, sizes, target, eps=0.5)
    budget = target * sum(sizes.values())
    spent = sum(costs[n][b] for n, b in chosen.items())
    assert spent <= budget
    for name, bits in chosen.items():  # no single further upgrade fits
        higher = [b for b in sorted(costs[name]) if b > bits]
        if higher:
            assert spent - costs[name][bits] + costs[name][higher[0]] > budget, name
    assert len(set(chosen.values())) > 1  # a real mix, not one width
    assert spent / sum(sizes.values()) > target - 0.5


def test_coding_length_allocation_rejects_an_infeasible_target() -> None:
    weights, costs, sizes = _layers(4, seed=2)
    with pytest.raises(ValueError, match="target_bits=2.1 is below 2.750"):
        allocate_by_coding_length(weights, costs, sizes, 2.1, eps=0.5)


def test_coding_length_allocation_is_monotone_in_length_per_parameter() -> None:
    g = torch.Generator().manual_seed(3)
    cfg = SplitQuantConfig(group_size=32)
    for trial in range(6):
        weights, costs, sizes = {}, {}, {}
        for i in range(10):  # same shape, different spectra
            weights[f"t{trial}.{i}"] = torch.randn(64, 96, generator=g) * float(torch.rand(1, generator=g) * 3 + 0.01)
            costs[f"t{trial}.{i}"] = {b: spec_bits(cfg.spec_for(96, 64, False, bits=b)) for b in (2, 3, 4, 6, 8)}
            sizes[f"t{trial}.{i}"] = 64 * 96
        rho = {n: coding_length_per_parameter(w, 0.5) for n, w in weights.items()}
        for target in (3.0, 3.7, 5.2):
            chosen = allocate_by_coding_length(weights, costs, sizes, target, eps=0.5)
            for a in chosen:
                for b in chosen:
                    if rho[a] > rho[b]:
                        assert chosen[a] >= chosen[b], (trial, target, a, b)
            assert len(set(chosen.values())) > 1


# --------------------------------------------------------------------------------------------
# Exact sums
# --------------------------------------------------------------------------------------------


def test_exact_sum_does_not_depend_on_the_order_of_additions() -> None:
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(50, generator=g) * 10 ** float(torch.randint(-6, 7, (1,), generator=g)) for _ in range(40)]
    forward, backward = ExactSum((50,)), ExactSum((50,))
    for p in parts:
        forward.add(p)
    for p in reversed(parts):
        backward.add(p)
    assert torch.equal(forward.limbs, backward.limbs)
    assert torch.equal(forward.value(), backward.value())
    float_sum = torch.stack([p.double() for p in parts]).sum(0)
    torch.testing.assert_close(forward.value(), float_sum, rtol=1e-12, atol=1e-15)
    # float summation order does change float results (what ExactSum avoids)
    f32a = sum(parts, torch.zeros(50))
    f32b = sum(reversed(parts), torch.zeros(50))
    assert not torch.equal(f32a, f32b)
    with pytest.raises(ValueError, match="NaN or Inf"):
        forward.add(torch.tensor([float("nan")] * 50))


# --------------------------------------------------------------------------------------------
# The calibration API on tiny models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build,auto", [(tiny_llama, AutoModelForCausalLM), (tiny_bert, AutoModelForSequenceClassification)])
def test_attention_round_model_saves_and_reloads_exactly(tmp_path: Path, build, auto, input_ids: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = build().eval()
    quantized = hf_splitquant.quantize(model, ar_config(transform="ocs"), calibration_data=token_samples(20),
                                       batch_size=6, progress=False)
    report = quantized.calibration_report
    assert report["num_samples"] == 20 and report["mean_mse_ratio"] < 0.95
    assert all(info["mse"] <= info["mse_rtn"] for info in report["layers"].values())
    expected = model_output(quantized, input_ids)
    quantized.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["rounding"] == "attention_round" and config["layers"]
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert reloaded.state_dict().keys() == quantized.state_dict().keys()
    for key, tensor in quantized.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    assert torch.equal(model_output(reloaded, input_ids), expected)


def _mean_square_input(model: torch.nn.Module, name: str, input_ids: torch.Tensor) -> float:
    """Mean over tokens of |x|^2 of the inputs of module ``name`` on ``input_ids`` (no padding)."""
    captured = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda module, args, output: captured.append(args[0].detach().reshape(-1, args[0].shape[-1]).float()))
    with torch.no_grad():
        model(input_ids=input_ids)
    handle.remove()
    x = torch.cat(captured)
    return float(x.pow(2).sum() / x.shape[0])


def test_each_layer_is_fitted_on_inputs_from_the_quantized_layers_before_it() -> None:
    """o_proj of the first block must see the outputs of the already quantized q/k/v, not the float block's."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    float_model = copy.deepcopy(model)
    samples = token_samples(8, length=12, seed=3)
    hf_splitquant.quantize(model, ar_config(), calibration_data=samples, batch_size=8, progress=False)
    ids = torch.tensor(samples)
    layers = model.calibration_report["layers"]
    for name in ("layers.0.self_attn.o_proj", "layers.0.mlp.down_proj"):
        fitted = layers[name]["input_power"]
        quantized_inputs = _mean_square_input(model, f"model.{name}", ids)
        float_inputs = _mean_square_input(float_model, f"model.{name}", ids)
        assert fitted == pytest.approx(quantized_inputs, rel=1e-3), name
        assert abs(quantized_inputs - float_inputs) > 0.02 * float_inputs, name  # the test can tell them apart
    # the first stage reads the block's input, which no quantized layer has touched yet
    first = _mean_square_input(float_model, "model.layers.0.self_attn.q_proj", ids)
    assert layers["layers.0.self_attn.q_proj"]["input_power"] == pytest.approx(first, rel=1e-4)


def test_heldout_batches_decide_which_layers_keep_their_optimised_codes() -> None:
    """On 24 calibration tokens Attention Round overfits: most layers get worse than round-to-nearest on the
    held-out batches. keep_best then keeps round-to-nearest exactly there, and never elsewhere."""
    results = {}
    for keep in (False, True):
        torch.manual_seed(0)
        model = tiny_llama().eval()
        config = ar_config(rounding_options={"iterations": 100, "keep_best": keep})
        hf_splitquant.quantize(model, config, calibration_data=token_samples(8, length=6, seed=1), batch_size=2,
                               progress=False, heldout_fraction=0.5)
        results[keep] = model.calibration_report
    assert results[True]["heldout_batches"] == 2 and results[True]["num_batches"] == 4
    free, kept = results[False]["layers"], results[True]["layers"]
    overfit = {n for n, i in free.items() if i["mse_heldout"] > i["mse_rtn_heldout"]}
    assert len(overfit) >= len(free) // 2  # the situation the held-out slice exists for
    assert all(i["mse_heldout"] <= i["mse_rtn_heldout"] and i["mse"] <= i["mse_rtn"] for i in kept.values())
    assert any(i["kept_rtn"] for i in kept.values()) and not all(i["kept_rtn"] for i in kept.values())
    assert all(i["heldout_tokens"] == 24 and i["tokens"] == 24 for i in kept.values())  # 2 x 2 samples x 6 each


def _gptq_ratios(damping: float, keep_best: bool = False) -> tuple[float, float, dict]:
    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = SplitQuantConfig(bits=2, group_size=32, rounding="gptq",
                              rounding_options={"damping": damping, "keep_best": keep_best})
    hf_splitquant.quantize(model, config, calibration_data=token_samples(16, length=6, seed=1), batch_size=4,
                           progress=False, heldout_fraction=0.5)
    layers = model.calibration_report["layers"].values()
    fit = sum(i["mse"] / i["mse_rtn"] for i in layers) / len(layers)
    held = sum(i["mse_heldout"] / i["mse_rtn_heldout"] for i in layers) / len(layers)
    return fit, held, model.calibration_report


def test_gptq_damping_trades_fit_for_generalisation() -> None:
    """Little damping fits the 48 calibration tokens best and generalises worst; much damping is
    round to nearest; the default sits between and beats round to nearest on held-out inputs."""
    low, mid, high = (_gptq_ratios(d) for d in (0.01, 1.0, 100.0))
    assert low[0] < mid[0] < high[0] <= 1.0 + 1e-6
    assert low[1] > 1.0 > mid[1]  # overfits / generalises
    assert high[0] > 0.95 and abs(high[1] - 1.0) < 0.05
    assert {i["damping"] for i in mid[2]["layers"].values()} == {1.0}


def test_gptq_with_the_float_model_as_target_tracks_the_float_model_better() -> None:
    """target="float" fits each layer to the float model's output at that layer (correcting the error of the
    quantized layers before it): the packed model's logits stay closer to the float model's on other tokens.
    The first stage of the first block reads the float inputs, so there the target is the weight itself."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    held_out = torch.tensor(token_samples(16, length=16, seed=2))
    with torch.no_grad():
        reference = base(input_ids=held_out).logits
    errors, reports = {}, {}
    for target in ("layer", "float"):
        model = copy.deepcopy(base)
        config = SplitQuantConfig(bits=2, group_size=32, rounding="gptq", rounding_options={"target": target})
        hf_splitquant.quantize(model, config, calibration_data=token_samples(32, length=16, seed=1), batch_size=8,
                               progress=False)
        with torch.no_grad():
            errors[target] = float((model(input_ids=held_out).logits - reference).pow(2).mean())
        reports[target] = model.calibration_report["layers"]
    assert errors["float"] < 0.85 * errors["layer"]
    assert {i["target"] for i in reports["float"].values()} == {"float"}
    for name in ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj"):
        assert reports["float"][name]["mse"] == pytest.approx(reports["layer"][name]["mse"], rel=1e-4)
    later = "layers.1.mlp.down_proj"
    assert reports["float"][later]["mse"] != pytest.approx(reports["layer"][later]["mse"], rel=1e-3)


def test_gptq_calibrated_model_reloads_exactly(tmp_path: Path, input_ids: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = SplitQuantConfig(bits=3, group_size=32, transform="ocs", rounding="gptq")
    hf_splitquant.quantize(model, config, calibration_data=token_samples(20), batch_size=5, progress=False)
    report = model.calibration_report
    assert report["options"]["clip"] == "output" and report["heldout_batches"] == 1
    assert all(i["mse"] <= i["mse_rtn"] and i["mse_heldout"] <= i["mse_rtn_heldout"] for i in report["layers"].values())
    assert report["mean_mse_ratio"] < 0.9
    expected = model_output(model, input_ids)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(model_output(reloaded, input_ids), expected)


def test_heldout_batch_count() -> None:
    from hf_splitquant.calibration.loop import heldout_batches

    assert [heldout_batches(n, 0.25) for n in (0, 1, 2, 4, 10)] == [0, 0, 1, 1, 2]
    assert heldout_batches(3, 0.9) == 2 and heldout_batches(10, 0.0) == 0


@pytest.mark.slow
def test_every_data_form_gives_the_same_model() -> None:
    samples = token_samples(12, length=10, seed=5)
    forms = {
        "list": samples,
        "tensor": torch.tensor(samples),
        "dataset": datasets.Dataset.from_dict({"input_ids": samples}),
        "dataloader": torch.utils.data.DataLoader(
            datasets.Dataset.from_dict({"input_ids": samples}).with_format("torch"), batch_size=4),
    }
    states = {}
    for name, data in forms.items():
        torch.manual_seed(0)
        model = tiny_llama().eval()
        hf_splitquant.quantize(model, ar_config(), calibration_data=data, batch_size=4, progress=False)
        states[name] = model.state_dict()
    for name, state in states.items():
        for key, tensor in state.items():
            assert torch.equal(tensor, states["list"][key]), (name, key)


@pytest.mark.slow
def test_text_dataset_is_sampled_with_the_seed_and_padding_is_not_counted() -> None:
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_path())
    texts = [p for a in assets.wikipedia_split("calibration")[:6] for p in a.split("\n") if len(p) > 80]
    data = datasets.Dataset.from_dict({"text": texts})
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    reports = []
    for seed in (0, 0, 1):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        calibrate_and_quantize(model, ar_config(rounding_options={"iterations": 3}), data, tokenizer=tokenizer,
                               num_samples=7, batch_size=3, max_length=48, seed=seed, progress=False)
        reports.append(model.calibration_report)
    picked = data.select(sorted(torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))[:7].tolist()))
    tokens = sum(min(48, len(ids)) for ids in tokenizer(list(picked["text"]))["input_ids"])
    assert reports[0]["num_samples"] == 7 and reports[0]["num_batches"] == 3
    # padding excluded; the last of the 3 batches is held out (fitted + held-out tokens = all tokens)
    assert {info["tokens"] + info["heldout_tokens"] for info in reports[0]["layers"].values()} == {tokens}
    assert reports[0]["heldout_batches"] == 1
    assert reports[0]["layers"] == reports[1]["layers"]
    assert reports[0]["layers"] != reports[2]["layers"]  # another seed, other samples


def test_coding_length_allocation_with_attention_round() -> None:
    torch.manual_seed(0)
    model = tiny_llama().eval()
    for layer in model.model.layers:  # give the layers different spectra
        layer.mlp.down_proj.weight.data *= 4.0
    config = ar_config(bits=3, bit_allocation="coding_length", target_bits=3.9, coding_length_eps=0.5,
                       mixquant_candidates=[2, 3, 4, 5, 6])
    hf_splitquant.quantize(model, config, calibration_data=token_samples(10), progress=False)
    report = quantization_report(model)
    bits = {info["bits"] for info in model.calibration_report["layers"].values()}
    assert len(bits) > 1
    assert report.bits_per_weight <= 3.9 + 1e-9


def test_calibration_errors_and_round_to_nearest_fallback(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = tiny_llama().eval()
    with pytest.raises(ValueError, match="needs calibration_data"):
        hf_splitquant.quantize(model, ar_config())
    with pytest.raises(ValueError, match="unknown rounding_options"):
        hf_splitquant.quantize(model, ar_config(rounding_options={"iteration": 3}), calibration_data=token_samples(2))
    with pytest.raises(ValueError, match="batch_size"):
        hf_splitquant.quantize(model, ar_config(), calibration_data=token_samples(2), batch_size=0)
    with pytest.raises(ValueError, match="tokenizer"):
        hf_splitquant.quantize(model, ar_config(), calibration_data=["some text"])
    plain = SplitQuantConfig(bits=2, group_size=32)
    rtn = hf_splitquant.quantize(model, plain, calibration_data=token_samples(2), progress=False)
    torch.manual_seed(0)
    reference = hf_splitquant.quantize(tiny_llama().eval(), plain, progress=False)
    for key, tensor in reference.state_dict().items():
        assert torch.equal(rtn.state_dict()[key], tensor)
    with pytest.raises(ValueError, match="already quantized"):
        hf_splitquant.quantize(rtn, ar_config(), calibration_data=token_samples(2))


# --------------------------------------------------------------------------------------------
# Two processes == one process
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block Llama (random weights, seed 0) with SmolLM2's real tokenizer, saved to a folder."""
    folder = tmp_path_factory.mktemp("tiny-llama-smollm2-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("rounding", ["attention_round", "gptq"])
def test_command_line_calibration_from_a_text_file(tmp_path: Path, tiny_llama_folder: Path, rounding: str) -> None:
    from hf_splitquant.cli import main

    lines = [p for a in assets.wikipedia_split("calibration")[:2] for p in a.split("\n")]
    (tmp_path / "cal.txt").write_text("\n".join(lines))
    args = ["quantize", str(tiny_llama_folder), "-o", str(tmp_path / "out"), "--bits", "3", "--rounding",
            rounding, "--calibration-data", str(tmp_path / "cal.txt"), "--num-samples", "6"]
    assert main(args) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["rounding"] == rounding and len(config["layers"]) == 14
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert main(["quantize", str(tiny_llama_folder), "-o", str(tmp_path / "x"), "--rounding", rounding]) == 2
    (tmp_path / "cal.xml").write_text("<a/>")
    assert main(["quantize", str(tiny_llama_folder), "-o", str(tmp_path / "y"), "--rounding", rounding,
                 "--calibration-data", str(tmp_path / "cal.xml")]) == 2


@pytest.mark.slow
def test_command_line_recipe_calibrates_with_its_settings(tmp_path: Path, tiny_llama_folder: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """``--recipe w3-tuned`` (rotation, GPTQ, block tuning) from a text file, with an override and the calibration
    shape options; a calibrated recipe without data is refused naming the option."""
    from hf_splitquant.cli import main

    lines = [p for a in assets.wikipedia_split("calibration")[:2] for p in a.split("\n")]
    (tmp_path / "cal.txt").write_text("\n".join(lines))
    args = ["quantize", str(tiny_llama_folder), "-o", str(tmp_path / "out"), "--recipe", "w3-tuned", "--group-size",
            "32", "--calibration-data", str(tmp_path / "cal.txt"), "--num-samples", "4", "--max-length", "48",
            "--batch-size", "2"]
    assert main(args) == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    expected = SplitQuantConfig.recipe("w3-tuned", group_size=32)
    assert (saved["bits"], saved["group_size"], saved["rounding"]) == (3, 32, "gptq")
    assert saved["block_tuning"] == expected.block_tuning and saved["input_rotation"] == 64
    rotated = {name for name, spec in saved["layers"].items() if spec.get("input_rotation") == 64}
    assert rotated and all("down_proj" not in name for name in rotated)  # 96 inputs: not divisible by 64
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(reloaded(torch.tensor([[5, 6, 7]])).logits).all()
    capsys.readouterr()
    assert main(["quantize", str(tiny_llama_folder), "-o", str(tmp_path / "x"), "--recipe", "w3"]) == 2
    assert "--calibration-data" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("rounding", [
    ["--rounding", "attention_round"],
    # the float model as the target: cross products of float and quantized inputs summed over both processes
    pytest.param(["--rounding", "gptq", "--rounding-options", '{"target": "float"}'], marks=pytest.mark.slow),
    # widths from the Fisher-weighted errors: per-sample gradients on each process, scalars summed exactly
    pytest.param(["--rounding", "gptq", "--bit-allocation", "sensitivity"], marks=pytest.mark.slow),
    # widths from the input-weighted coding length: per-channel input sums reduced exactly
    pytest.param(["--rounding", "gptq", "--bit-allocation", "coding_length_inputs"], marks=pytest.mark.slow),
    # block-wise tuning (RTN only): each step's gradients come from the process holding that global batch
    pytest.param(["--rounding", "gptq", "--transform", "rtn", "--block-tuning", '{"epochs": 2}'],
                 marks=pytest.mark.slow),
    # input scales searched on the exactly reduced statistics, then folded into the norms on every process
    pytest.param(["--rounding", "gptq", "--transform", "rtn", "--activation-scaling"], marks=pytest.mark.slow),
], ids=["attention_round", "gptq_float_target", "gptq_sensitivity", "gptq_coding_length_inputs", "gptq_block_tuning",
        "gptq_activation_scaling"])
def test_two_process_calibration_is_identical_to_one_process(tmp_path: Path, tiny_llama_folder: Path,
                                                             rounding: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # 19 samples in batches of 3: 7 batches, 4 on process 0 and 3 on process 1 (uneven shards)
    script = [str(ROOT / "examples" / "calibrate_multiprocess.py"), "--model", str(tiny_llama_folder), "--smoke",
              "--num-samples", "19", "--batch-size", "3", "--bit-allocation", "coding_length", "--target-bits", "3.6",
              "--transform", "ocs", *rounding]
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            *script, "--output", str(tmp_path / "two"), "--report-json", str(tmp_path / "two.json")],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    one = subprocess.run([sys.executable, *script, "--output", str(tmp_path / "one"), "--report-json",
                          str(tmp_path / "one.json")], env=env, capture_output=True, text=True, timeout=300)
    two_out, _ = two.communicate(timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    assert two.returncode == 0, two_out
    assert "processes: 1;" in one.stdout
    assert "processes: 2;" in two_out and "identical packed weights: True" in two_out
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    qa = json.loads((tmp_path / "one" / "config.json").read_text())["quantization_config"]
    qb = json.loads((tmp_path / "two" / "config.json").read_text())["quantization_config"]
    assert qa == qb and len({spec["bits"] for spec in qa["layers"].values()}) > 1
    # The packed codes are robust to last-bit noise in the statistics; the per-layer objectives (floats
    # computed from the summed X^T X) are not: equal objectives show the sums themselves are bit-identical
    # (with plain float sums over the shards they differ).
    report_one = json.loads((tmp_path / "one.json").read_text())
    report_two = json.loads((tmp_path / "two.json").read_text())
    assert report_one["processes"] == 1 and report_two["processes"] == 2
    assert report_one["num_samples"] == report_two["num_samples"] == 19
    def objectives(report: dict) -> dict:  # everything but the timings
        return {n: {k: v for k, v in i.items() if not k.endswith("seconds")} for n, i in report["layers"].items()}

    assert objectives(report_one) == objectives(report_two)
    untimed = [[{k: v for k, v in b.items() if k != "seconds"} for b in r["blocks"]] for r in (report_one, report_two)]
    assert untimed[0] == untimed[1]  # block-wise tuning: the same errors before and after, on both runs
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    assert quantization_report(model).bits_per_weight <= 3.6 + 1e-9
