"""The command line, and atomic saves that never leave a half-written checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import model_output
from transformers import AutoModelForCausalLM

from hf_splitquant import SplitQuantConfig
from hf_splitquant.cli import main
from hf_splitquant.saving import atomic_directory_write, save_quantized


def test_cli_quantize_then_inspect(float_checkpoints, tmp_path, capsys, input_ids):
    out = tmp_path / "q"
    rc = main(["quantize", float_checkpoints["gpt2"], "-o", str(out), "--bits", "3", "--group-size", "32",
               "--transform", "splitquant", "--json", str(tmp_path / "report.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "bits per weight" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["method"] == "splitquant" and report["bits_per_weight"] > 3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.quantization_config.bits == 3
    assert torch.isfinite(model_output(model.eval(), input_ids)).all()

    assert main(["inspect", str(out), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["bits_per_weight"] == pytest.approx(report["bits_per_weight"])
    assert inspected["safetensors_bytes"] > 0
    # an existing output is never overwritten silently
    assert main(["quantize", float_checkpoints["gpt2"], "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_rejects_bad_input(float_checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["quantize", float_checkpoints["gpt2"], "-o", str(tmp_path / "x"), "--group-size", "zero"])
    assert "--group-size" in capsys.readouterr().err
    assert main(["inspect", float_checkpoints["gpt2"]]) == 2
    assert "not an hf_splitquant checkpoint" in capsys.readouterr().err


def test_cli_recipe_settings_and_overrides(capsys):
    """``--recipe`` gives the recipe's config; quantization options given beside it replace single settings; without
    it the defaults are those the command always had."""
    from hf_splitquant.commands import subcommand_parser
    from hf_splitquant.commands.quantize import quantize_config

    def config(*options: str) -> SplitQuantConfig:
        return quantize_config(subcommand_parser("quantize").parse_args(["model", "-o", "out", *options]))

    plain = config()
    assert (plain.bits, plain.group_size, plain.rounding, plain.input_rotation) == (4, 64, None, None)
    assert config("--bits", "3", "--group-size", "none").group_size is None
    assert config("--recipe", "w3-tuned") == SplitQuantConfig.recipe("w3-tuned")
    assert config("--recipe", "w4", "--bits", "3", "--group-size", "none") == \
        SplitQuantConfig.recipe("w4", bits=3, group_size=None)
    assert config("--recipe", "w3-mixed-tuned", "--transform", "rtn", "--symmetric") == \
        SplitQuantConfig.recipe("w3-mixed-tuned", symmetric=True)
    with pytest.raises(SystemExit):
        config("--recipe", "w5")
    assert "w3-tuned" in capsys.readouterr().err  # the choices are listed


@pytest.mark.slow
def test_console_script_is_installed():
    script = Path(sys.executable).parent / "hf-splitquant"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "quantize" in proc.stdout and "inspect" in proc.stdout and "demo" in proc.stdout


def test_failed_save_keeps_previous_checkpoint(float_checkpoints, tmp_path, input_ids):
    target = tmp_path / "ckpt"
    model = AutoModelForCausalLM.from_pretrained(float_checkpoints["llama"],
                                                 quantization_config=SplitQuantConfig(bits=4)).eval()
    save_quantized(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(tmp: Path) -> None:
        model.save_pretrained(tmp)
        raise OSError("disk full (injected)")

    with pytest.raises(OSError, match="injected"):
        atomic_directory_write(target, broken, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind
    with pytest.raises(FileExistsError, match="overwrite"):
        save_quantized(model, target)
    reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
    assert torch.equal(model_output(reloaded, input_ids), model_output(model, input_ids))


@pytest.mark.slow
def test_killed_save_leaves_no_checkpoint(float_checkpoints, tmp_path):
    target = tmp_path / "killed"
    code = f"""
import os, hf_splitquant
from transformers import AutoModelForCausalLM
from hf_splitquant.saving import atomic_directory_write
model = AutoModelForCausalLM.from_pretrained({float_checkpoints['llama']!r},
    quantization_config=hf_splitquant.SplitQuantConfig(bits=4))
def write(tmp):
    model.save_pretrained(tmp)
    os.kill(os.getpid(), 9)
atomic_directory_write({str(target)!r}, write)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -9
    assert not target.exists()
