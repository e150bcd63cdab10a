"""The benchmark scripts run end to end in their quick modes (no timing is asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_ocs_mixquant_benchmark_quick(tmp_path):
    out = tmp_path / "ocs_mixquant.json"
    stdout = _run("bench_ocs_mixquant.py", "--quick", "--threads", "1", "--output", str(out))
    rows = {r["label"]: r for r in json.loads(out.read_text())["results"][0]["rows"]}
    rtn, ocs, mix = rows["rtn int3 g64"], rows["ocs r=0.02 int3 g64"], rows["mixquant rtn g64 <= 3 bpw"]
    assert ocs["bits_per_weight"] > rtn["bits_per_weight"]  # the duplicated columns are counted
    assert mix["bits_per_weight"] <= 3.0 and "x2" in mix["layer_bits"]
    assert all(r["reload_max_abs_diff"] <= 1e-4 and 0 < r["quality"] <= 1 for r in rows.values())
    assert "Best configuration within each budget" in stdout


@pytest.mark.slow
def test_speed_benchmark_quick(tmp_path):
    out = tmp_path / "speed.json"
    stdout = _run("bench_speed.py", "--quick", "--threads", "1", "--output", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["fp32", "bf16", "rtn-int4-g64", "splitquant-int2-g64"]
    packed = rows[2:]
    assert all(r["throughput"] > 0 and r["resident_bytes"] < rows[0]["resident_bytes"] for r in packed)
    assert all(r["packed_bytes"] * 8 / r["bits_per_weight"] > 1e6 for r in packed)  # millions of weights
    assert "| minilm | rtn-int4-g64 |" in stdout


def _load_script(name: str):
    """A benchmark script imported as a module (its ``main`` runs in this process: no subprocess)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), BENCH / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # matplotlib and the evaluation module load in a few seconds
def test_peers_plot_merges_files_by_ratio_to_float(tmp_path, capsys):
    """The peers' plot: ratios to each file's float row, first file wins a duplicated point, files on
    other tokens are skipped, failed rows left out; a PNG is written."""
    same_eval = "perplexity on 8 x 512 Wikipedia 'eval' tokens"
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({"meta": {"eval": same_eval}, "rows": [
        {"method": "float", "bits": 32, "bits_per_weight": 32.0, "perplexity": 20.0},
        {"method": "rtn", "label": "RTN (ours)", "bits": 3, "group_size": 128, "bits_per_weight": 3.203,
         "perplexity": 100.0},
        {"method": "gptq", "label": "GPTQ (llm-compressor)", "bits": 3, "group_size": 128,
         "bits_per_weight": 3.14, "perplexity": 40.0},
        {"method": "hqq", "label": "HQQ", "bits": 2, "group_size": 64, "error": "refused"},
    ]}))
    ours = tmp_path / "calibration.json"  # bench_calibration.py's schema: group size in meta, no labels
    ours.write_text(json.dumps({"meta": {"eval": same_eval, "group_size": 128}, "rows": [
        {"method": "float", "bits": 32, "bits_per_weight": 32.0, "perplexity": 25.0},
        {"method": "rtn", "bits": 3, "bits_per_weight": 3.203, "perplexity": 999.0},  # duplicate: dropped
        {"method": "gptq", "bits": 3, "bits_per_weight": 3.203, "perplexity": 50.0},
    ]}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"meta": {"eval": "other tokens"}, "rows": [
        {"method": "float", "bits": 32, "bits_per_weight": 32.0, "perplexity": 1.0},
        {"method": "ar", "bits": 3, "bits_per_weight": 3.2, "perplexity": 2.0}]}))
    png = tmp_path / "plot.png"
    script = _load_script("plot_quality_vs_bits.py")
    assert script.main(["--inputs", str(peers), str(ours), str(other), "--output", str(png)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "| INT" in ln]
    assert len(lines) == 3 and not any("HQQ" in ln or "Attention Round" in ln for ln in lines)
    by_series = {ln.split(" | ")[0]: ln for ln in lines}
    assert "| 5x float |" in by_series["RTN (ours)"]  # 100 / 20, from the first file
    assert "| 2x float |" in by_series["GPTQ (llm-compressor)"]  # 40 / 20
    assert "| 2x float |" in by_series["gptq rounding (ours)"]  # 50 / 25: its own file's float row
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peers_bits_per_weight_accounting():
    """bench_peers.py counts codes + fp16 scale + zero point per group; whole groups per row, or
    groups of the flattened weight (HQQ)."""
    bench = _load_script("bench_peers.py")
    # a 576-input row in groups of 128: 5 groups (the last one half full)
    assert bench.grouped_bits_per_weight([(1, 576)], 3, 128, zero_bits=8) == 3 + 5 * 24 / 576
    assert bench.grouped_bits_per_weight([(2, 576)], 3, 128, zero_bits=16, groups_span_rows=True) == 3 + 9 * 32 / 1152
    assert bench.grouped_bits_per_weight([(4, 64), (2, 128)], 2, 64, zero_bits=2) == 2 + 18 / 64
    w = torch.tensor([[0.0, 1.0, 1.0, 2.0, 5.0, 5.0, 5.0, 5.0]])
    assert bench.max_levels_per_group(w, 4) == 3 and bench.max_levels_per_group(w.reshape(2, 4), 4, span_rows=True) == 3
