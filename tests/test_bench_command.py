"""``hf-splitquant bench``: the packed model against its float source, with the conditions reported.

Only the structure of the output is asserted (never speed: the tests share the machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_splitquant.cli import main
from hf_splitquant.speed import _cpuinfo, machine_conditions

FAST = ["--repeats", "1", "--threads", "1"]


def _bench(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    assert main(["bench", *args, *FAST, "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_bench_causal_lm_finds_its_float_source_in_the_card(float_checkpoints, tmp_path, capsys):
    packed = tmp_path / "q"
    assert main(["quantize", float_checkpoints["llama"], "-o", str(packed), "--bits", "4", "--model-card",
                 "--base-model", float_checkpoints["llama"]]) == 0
    capsys.readouterr()
    result, printed = _bench([str(packed), "--new-tokens", "3", "--prompt-tokens", "5"], tmp_path, capsys)
    assert result["base"] == float_checkpoints["llama"] and "README.md" in result["base_from"]
    assert result["task"] == "text-generation" and result["workload"]["unit"] == "tokens/s"
    assert [(r["model"], r["dtype"]) for r in result["rows"]] == [
        ("packed", "float32"), ("float", "float32"), ("packed", "bfloat16"), ("float", "bfloat16")]
    for row in result["rows"]:
        assert row["throughput"] > 0 and row["throughput_per_cpu_s"] > 0 and len(row["wall_s"]) == 1
        assert row["resident_bytes"] > 0
    packed_rows = [r for r in result["rows"] if r["model"] == "packed"]
    assert all(r["layer_paths"].startswith("int4/1 x") and 4 < r["bits_per_weight"] < 5 for r in packed_rows)
    assert all(r["vs_float"] == 1.0 for r in result["rows"] if r["model"] == "float")
    conditions = result["conditions"]
    assert conditions["threads"] == 1 and conditions["cpus_available"] >= 1
    assert set(conditions) >= {"cpu", "cpu_flags", "load_average", "torch", "transformers", "hf_splitquant"}
    # the printed table carries the conditions next to the figures
    assert "tokens/s" in printed and "1 torch threads" in printed and "load average" in printed
    assert f"CPU {conditions['cpu']}" in printed


def test_bench_encoder_with_an_explicit_base(float_checkpoints, tmp_path, capsys):
    packed = tmp_path / "q"
    assert main(["quantize", float_checkpoints["bert"], "-o", str(packed), "--bits", "2",
                 "--transform", "splitquant"]) == 0
    capsys.readouterr()
    result, printed = _bench([str(packed), "--base", float_checkpoints["bert"], "--dtype", "bfloat16",
                              "--batch", "3", "--seq-len", "7"], tmp_path, capsys)
    assert result["task"] == "feature-extraction" and result["workload"]["unit"] == "sentences/s"
    assert result["base_from"] == "--base"
    assert [(r["model"], r["dtype"]) for r in result["rows"]] == [("packed", "bfloat16"), ("float", "bfloat16")]
    assert "sentences/s" in printed


def test_bench_without_a_float_source_says_what_to_pass(float_checkpoints, tmp_path, capsys):
    packed = tmp_path / "q"
    assert main(["quantize", float_checkpoints["gpt2"], "-o", str(packed), "--bits", "4"]) == 0
    capsys.readouterr()
    assert main(["bench", str(packed)]) == 2
    assert "--base" in capsys.readouterr().err
    assert main(["bench", float_checkpoints["gpt2"], "--base", float_checkpoints["gpt2"]]) == 2
    assert "not an hf_splitquant checkpoint" in capsys.readouterr().err


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse2 avx avx2 fma avx512f "
                    "avx512_bf16 amx_tile\n\nprocessor\t: 1\nmodel name\t: Example CPU 9000\nflags\t\t: fpu\n")
    name, flags = _cpuinfo(info)
    assert name == "Example CPU 9000"
    assert flags == ["avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"]
    assert _cpuinfo(tmp_path / "missing") == (None, [])
    assert machine_conditions(threads=3)["threads"] == 3


@pytest.mark.slow
def test_bench_compiled_decoding_times_both_models_compiled(float_checkpoints, tmp_path, capsys):
    packed = tmp_path / "q"
    assert main(["quantize", float_checkpoints["llama"], "-o", str(packed), "--bits", "4"]) == 0
    capsys.readouterr()
    result, printed = _bench([str(packed), "--base", float_checkpoints["llama"], "--dtype", "bfloat16", "--compiled",
                              "--new-tokens", "3", "--prompt-tokens", "5"], tmp_path, capsys)
    assert result["workload"]["compiled"] is True and "compiled (compile_for_decoding)" in printed
    assert [(r["model"], r["dtype"]) for r in result["rows"]] == [("packed", "bfloat16"), ("float", "bfloat16")]
    assert all(r["throughput"] > 0 for r in result["rows"])


def test_bench_compiled_refuses_an_encoder(float_checkpoints, tmp_path, capsys):
    packed = tmp_path / "q"
    assert main(["quantize", float_checkpoints["bert"], "-o", str(packed), "--bits", "4"]) == 0
    capsys.readouterr()
    assert main(["bench", str(packed), "--base", float_checkpoints["bert"], "--compiled", *FAST]) == 2
    assert "only a causal LM" in capsys.readouterr().err
