"""Smoke runs of the examples and of ``optimum-cli splitquant``, each in a subprocess (as a user runs them)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import FakeHub, hub_env

from hf_splitquant import cli
from hf_splitquant.commands import copy_arguments, run_command

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "MPLBACKEND": "Agg"})
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_quantize_and_reload_example(tmp_path: Path) -> None:
    # RTN keeps the run short; the SplitQuant path of the same script is exercised by the demo tests
    result = _run([sys.executable, str(EXAMPLES / "quantize_and_reload.py"), "--sentences", "8", "--transform", "rtn",
                   "--bits", "4", "--output", str(tmp_path / "minilm")], _env(), tmp_path)
    cosine = float(result.stdout.strip().rsplit(":", 1)[1])
    assert 0.9 < cosine <= 1.0
    assert (tmp_path / "minilm" / "model.safetensors").is_file()


@pytest.mark.slow
def test_evaluate_and_plot_example_smoke(tmp_path: Path) -> None:
    _run([sys.executable, str(EXAMPLES / "evaluate_and_plot.py"), "--smoke", "--out-dir", str(tmp_path)], _env(),
         tmp_path)
    data = json.loads((tmp_path / "minilm_results.json").read_text())
    assert [r["label"] for r in data["results"]] == ["rtn-int2", "rtn-int4"]
    cosines = [r["metrics"]["embedding_cosine"] for r in data["results"]]
    assert cosines[0] < cosines[1] <= 1.0  # 4 bits stays closer to float than 2 bits
    assert [r["bits_per_weight"] for r in data["results"]] == pytest.approx([2.375, 4.375])
    png = (tmp_path / "minilm_quality_vs_bits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_push_to_hub_example_smoke(tmp_path: Path) -> None:
    with FakeHub(tmp_path / "storage") as server:
        env = hub_env(server, tmp_path / "hf")
        env.update({"HF_HUB_DISABLE_PROGRESS_BARS": "1", "MPLBACKEND": "Agg"})
        result = _run([sys.executable, str(EXAMPLES / "push_to_hub.py"), "--smoke", "--repo-id", "tester/minilm-int4"],
                      env, tmp_path)
    assert "embeddings identical" in result.stdout  # reloaded over HTTP with from_pretrained
    folder = tmp_path / "storage" / "tester" / "minilm-int4"
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    card = (folder / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card and "embedding_cosine" in card


@pytest.mark.slow
def test_optimum_cli_lists_and_runs_splitquant(tmp_path: Path, float_checkpoints: dict[str, str]) -> None:
    env = _env(PYTHONPATH=str(REPO_ROOT))  # also works without it once the package is (re)installed
    optimum_cli = str(BIN / "optimum-cli")
    root_help = _run([optimum_cli, "--help"], env, tmp_path).stdout
    assert "splitquant" in root_help and "export" in root_help and "env" in root_help
    help_text = _run([optimum_cli, "splitquant", "--help"], env, tmp_path).stdout
    for command in ("quantize", "evaluate", "inspect"):
        assert command in help_text
    packed = tmp_path / "packed"
    assert cli.main(["quantize", float_checkpoints["llama"], "-o", str(packed), "--bits", "3", "--group-size", "16"]) == 0
    inspected = _run([optimum_cli, "splitquant", "inspect", str(packed), "--json"], env, tmp_path).stdout
    assert json.loads(inspected)["num_quantized_layers"] == 14


def test_optimum_command_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = copy_arguments("evaluate", argparse.ArgumentParser())
    args = parser.parse_args([str(tmp_path), "--task", "perplexity"])
    assert run_command("evaluate", args) == 2  # what `optimum-cli splitquant evaluate` exits with
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no command"):
        run_command("demo-nope", args)


def test_optimum_arguments_are_hf_splitquant_arguments() -> None:
    argv = ["model_dir", "-o", "out", "--bits", "2", "--transform", "splitquant", "--push-to-hub", "me/repo"]
    ours = cli.build_parser().parse_args(["quantize", *argv])
    copied = copy_arguments("quantize", argparse.ArgumentParser()).parse_args(argv)
    assert {k: v for k, v in vars(ours).items() if k not in ("func", "command", "verbose")} == vars(copied)


@pytest.mark.slow
def test_wheel_ships_optimum_register_module_metrics_and_template(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("hf_splitquant", "optimum"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=ignore)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source), "-w",
          str(tmp_path / "dist")], _env(PIP_NO_INDEX="1"), source)
    (wheel,) = (tmp_path / "dist").glob("hf_splitquant-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "optimum/commands/register/splitquant.py" in names
    # PEP 420: shipping any of these would shadow optimum's own package
    assert not names & {"optimum/__init__.py", "optimum/commands/__init__.py", "optimum/commands/register/__init__.py"}
    assert "hf_splitquant/templates/model_card.md" in names
    for metric in ("perplexity_from_nll", "kl_fidelity", "embedding_cosine", "classification_accuracy"):
        assert f"hf_splitquant/metrics/{metric}/{metric}.py" in names
    # the offline test data and the demo are the separate in-repo package assets/ (splitquant_assets)
    assert not {n for n in names if n.startswith("splitquant_assets/")} | ({"hf_splitquant/assets.py",
                                                                            "hf_splitquant/demo.py"} & names)


@pytest.mark.slow
def test_qat_distill_causal_lm_example_smoke(tmp_path: Path) -> None:
    result = _run([sys.executable, str(EXAMPLES / "qat_distill_causal_lm.py"), "--smoke", "--output",
                   str(tmp_path / "packed")], _env(), tmp_path, timeout=900)
    summary = json.loads(result.stdout[result.stdout.index("{\n"):])
    assert summary["steps"] == 12 and summary["tokens_seen"] == 12 * 4 * 16
    # distillation moved the 2-bit student towards its teacher (random data: on the blocks it trained on)
    assert summary["qat_kl_on_training_blocks"] < 0.98 * summary["ptq_kl_on_training_blocks"]
    assert summary["packed_ppl"] == pytest.approx(summary["qat_ppl"], rel=1e-5)
    assert summary["max_logit_diff_packed_vs_fake_quant"] < 1e-4
    assert (tmp_path / "packed" / "model.safetensors").is_file()

    # --init-from: a second run starts from that packed model's codes and grids, exactly where the first ended
    again = _run([sys.executable, str(EXAMPLES / "qat_distill_causal_lm.py"), "--smoke", "--init-from",
                  str(tmp_path / "packed"), "--output", str(tmp_path / "packed2")], _env(), tmp_path, timeout=900)
    resumed = json.loads(again.stdout[again.stdout.index("{\n"):])
    assert resumed["ptq_ppl"] == pytest.approx(summary["packed_ppl"], rel=1e-5)
    assert resumed["ptq_kl_to_float"] == pytest.approx(summary["qat_kl_to_float"], rel=1e-4)
    assert (tmp_path / "packed2" / "model.safetensors").is_file()
