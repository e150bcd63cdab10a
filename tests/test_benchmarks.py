"""The benchmark scripts run end to end in their quick modes (no timing is asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
