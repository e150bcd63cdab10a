"""Reliability round 2 (issue 17): what a red-team of the loader and the saver found.

Each test names the item of the issue it covers. Real models, real saves and loads, real processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from helpers import edit_quantization_config as _config
from helpers import load_causal_lm as _load
from helpers import model_output
from helpers import rewrite_safetensors as _rewrite
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM

import hf_splitquant
from hf_splitquant import SplitQuantConfig
from hf_splitquant.checkpoint import (
    DIGEST_METADATA_PREFIX,
    FORMAT_METADATA_KEY,
    LAYER_MAP_METADATA_KEY,
    CheckpointError,
    tensor_digest,
    verify_digests,
)
from hf_splitquant.cli import main
from hf_splitquant.modeling import is_skipped
from hf_splitquant.patterns import compile_module_patterns, matches_any
from hf_splitquant.saving import atomic_directory_write, clean_stale_temporaries, save_quantized
from hf_splitquant.spec import LayerSpec


@pytest.fixture(scope="module")
def packed_llama(float_checkpoints):  # noqa: ANN201
    return AutoModelForCausalLM.from_pretrained(
        float_checkpoints["llama"], quantization_config=SplitQuantConfig(bits=4, group_size=16)).eval()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- 1. overwrite replaces only what a checkpoint save writes ---------------------------------


def _foreign_files(folder: Path) -> None:
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "train.py").write_text("print('mine')\n")
    (folder / "README.md").write_text("# my project\n")
    (folder / "notes.txt").write_text("do not lose me\n")


def test_overwrite_keeps_unrelated_files(packed_llama, tmp_path, input_ids):
    target = tmp_path / "project"
    _foreign_files(target)
    # a stale shard of an older, sharded checkpoint is part of the checkpoint: it goes
    (target / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_quantized(packed_llama, target)
    save_quantized(packed_llama, target, overwrite=True)
    assert (target / "src" / "train.py").read_text() == "print('mine')\n"
    assert (target / "README.md").read_text() == "# my project\n"
    assert (target / "notes.txt").read_text() == "do not lose me\n"
    assert not (target / "model-00001-of-00002.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
    assert torch.equal(model_output(reloaded, input_ids), model_output(packed_llama, input_ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no temporaries left


def test_cli_overwrite_into_current_folder_keeps_unrelated_files(float_checkpoints, tmp_path, monkeypatch):
    target = tmp_path / "work"
    _foreign_files(target)
    monkeypatch.chdir(target)
    assert main(["quantize", float_checkpoints["gpt2"], "-o", ".", "--bits", "4"]) == 2  # not without --overwrite
    assert main(["quantize", float_checkpoints["gpt2"], "-o", ".", "--bits", "4", "--overwrite"]) == 0
    assert (target / "src" / "train.py").is_file() and (target / "notes.txt").is_file()
    assert (target / "README.md").read_text() == "# my project\n"
    assert (target / "model.safetensors").is_file()
    assert Path(os.getcwd()) == target and Path("notes.txt").is_file()  # still in a live folder
    assert AutoModelForCausalLM.from_pretrained(target) is not None


# ---- 5. atomic save gaps -------------------------------------------------------------------------


def test_saved_files_get_umask_permissions(packed_llama, tmp_path):
    mask = _umask()
    target = tmp_path / "perm"
    save_quantized(packed_llama, target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask
    for file in target.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file.name
    # a replaced folder keeps its own mode
    os.chmod(target, 0o750)
    save_quantized(packed_llama, target, overwrite=True)
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


def test_cli_output_folder_permissions(float_checkpoints, tmp_path):
    out = tmp_path / "cli"
    assert main(["quantize", float_checkpoints["gpt2"], "-o", str(out), "--bits", "4"]) == 0
    mask = _umask()
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~mask


_KILLED_SAVE = """
import os, sys, hf_splitquant
from transformers import AutoModelForCausalLM
from hf_splitquant.saving import atomic_directory_write
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=hf_splitquant.SplitQuantConfig(bits=4))
def write(tmp):
    model.save_pretrained(tmp)
    os.kill(os.getpid(), 9)
atomic_directory_write(sys.argv[2], write, overwrite=True)
"""


@pytest.mark.slow
def test_killed_save_temporaries_are_cleaned_by_the_next_save(float_checkpoints, packed_llama, tmp_path, input_ids):
    target = tmp_path / "ckpt"
    save_quantized(packed_llama, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, float_checkpoints["llama"], str(target)],
                          capture_output=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the old checkpoint is intact
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-ckpt-")
    # a live writer's temporary is never touched
    live = tmp_path / f".tmp-ckpt-{os.getpid()}-live"
    live.mkdir()
    assert clean_stale_temporaries(target) == [tmp_path / leftovers[0]]
    assert live.is_dir()
    live.rmdir()
    dead_pid = leftovers[0].split("-")[2]
    (tmp_path / f".tmp-ckpt-{dead_pid}-again").mkdir()  # the dead writer's id again: stale
    save_quantized(packed_llama, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
    assert torch.equal(model_output(reloaded, input_ids), model_output(packed_llama, input_ids))


_POLLER = """
import os, sys
config, stop = sys.argv[1], sys.argv[2]
misses = polls = 0
while True:
    polls += 1
    if not os.path.exists(config):
        if os.path.exists(stop):
            break
        misses += 1
print(misses, polls)
"""


def test_swap_leaves_a_checkpoint_at_the_path_at_every_instant(tmp_path):
    """Another process polls the path in a tight loop while 300 saves replace the folder: the
    config is always there (the two-rename swap left it missing a few dozen times here)."""
    target, stop = tmp_path / "swap", tmp_path / "stop"

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")

    atomic_directory_write(target, write)
    poller = subprocess.Popen([sys.executable, "-c", _POLLER, str(target / "config.json"), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        for _ in range(300):
            atomic_directory_write(target, write, overwrite=True)
    finally:
        stop.touch()
        (target / "config.json").unlink()
        out, _ = poller.communicate(timeout=60)
    misses, polls = map(int, out.split())
    assert polls > 1000 and misses == 0


# ---- helpers for hostile checkpoints ----------------------------------------------------------

LAYER = "model.layers.0.mlp.down_proj"
MAP_KEY = "layers.0.mlp.down_proj"  # 96 inputs, groups of 16: 6 groups


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory, packed_llama) -> Path:
    path = tmp_path_factory.mktemp("packed") / "ckpt"
    packed_llama.save_pretrained(path)
    return path


@pytest.fixture
def copy(packed_dir, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(packed_dir, target)
    return target


@pytest.fixture(scope="module")
def packed_gpt2_dir(tmp_path_factory, float_checkpoints) -> Path:
    path = tmp_path_factory.mktemp("packed_gpt2") / "ckpt"
    model = AutoModelForCausalLM.from_pretrained(float_checkpoints["gpt2"],
                                                 quantization_config=SplitQuantConfig(bits=4, group_size=16))
    model.save_pretrained(path)
    return path


# ---- 2. config edits the layout check cannot see -----------------------------------------------


def test_group_size_with_the_same_number_of_groups_is_refused(copy):
    _config(copy, lambda q: q["layers"][MAP_KEY].__setitem__("group_size", 17))  # ceil(96/17) == ceil(96/16)
    with pytest.raises(CheckpointError, match="layers_sha256"):
        _load(copy)


def test_checkpoint_without_map_digest_still_loads(copy, packed_llama, input_ids):
    """A checkpoint written before the map digest existed: the header has no such key."""
    _rewrite(copy / "model.safetensors", lambda t, m: m.pop(LAYER_MAP_METADATA_KEY))
    reloaded = _load(copy).eval()
    assert torch.equal(model_output(reloaded, input_ids), model_output(packed_llama, input_ids))


def test_map_saying_no_bias_while_the_file_has_one_is_refused(packed_gpt2_dir, tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(packed_gpt2_dir, folder)
    _config(folder, lambda q: q["layers"]["h.0.mlp.c_fc"].__setitem__("has_bias", False))
    with pytest.raises(CheckpointError, match="has_bias"):
        _load(folder)
    # even with the map digest stripped too (an older checkpoint), the file's bias gives it away
    _rewrite(folder / "model.safetensors", lambda t, m: m.pop(LAYER_MAP_METADATA_KEY))
    with pytest.raises(CheckpointError, match="has no bias"):
        _load(folder)


def test_missing_float_tensor_is_refused(copy):
    _rewrite(copy / "model.safetensors", lambda t, m: t.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(CheckpointError, match=r"post_attention_layernorm.weight.*in none of the checkpoint's files"):
        _load(copy)


def test_tensor_without_digest_is_refused(copy):
    _rewrite(copy / "model.safetensors", lambda t, m: t.__setitem__("model.extra", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="model.extra.*no checksum"):
        _load(copy)


def test_sharded_index_omitting_a_shard_is_refused(packed_llama, tmp_path, input_ids):
    folder = tmp_path / "sharded"
    packed_llama.save_pretrained(folder, max_shard_size="20KB")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded = _load(folder).eval()  # intact: loads
    assert torch.equal(model_output(reloaded, input_ids), model_output(packed_llama, input_ids))
    shard = index["weight_map"]["model.embed_tokens.weight"]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"embed_tokens.*in none of the checkpoint's files"):
        _load(folder)


def test_shards_of_two_different_saves_are_refused(packed_llama, float_checkpoints, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    packed_llama.save_pretrained(first, max_shard_size="20KB")
    other = AutoModelForCausalLM.from_pretrained(float_checkpoints["llama"])
    with torch.no_grad():
        for param in other.parameters():
            param.mul_(1.5)
    other = hf_splitquant.quantize(other, SplitQuantConfig(bits=4, group_size=16), progress=False)
    other.save_pretrained(second, max_shard_size="20KB")  # same map and layout, other data
    shard = sorted(p.name for p in first.glob("model-*.safetensors"))[0]
    assert (second / shard).exists()
    shutil.copy(second / shard, first / shard)
    with pytest.raises(CheckpointError, match="disagree"):
        _load(first)


# ---- 3. digests are verified in flat memory ----------------------------------------------------


def test_verify_digests_memory_stays_flat(tmp_path):
    tensor = torch.arange(16 * 2**20, dtype=torch.float32)  # 64 MiB
    file = tmp_path / "big.safetensors"
    metadata = {DIGEST_METADATA_PREFIX + "big": tensor_digest(tensor)}
    save_file({"big": tensor}, file, metadata=metadata)
    del tensor
    tracemalloc.start()
    try:
        verify_digests([file], metadata)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB while hashing a 64 MiB tensor"
    data = bytearray(file.read_bytes())  # and a corrupt byte is still caught
    data[-5] ^= 1
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        verify_digests([file], metadata)


# ---- 4. the per-layer map is bounded by the model ----------------------------------------------


@pytest.mark.slow
def test_padded_map_is_refused_quickly(copy):
    def pad(q: dict) -> None:
        for i in range(50_000):
            q["layers"][f"layers.{i + 2}.mlp.down_proj"] = q["layers"][MAP_KEY]

    _config(copy, pad)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="more than 8 modules"):
        _load(copy)
    assert time.perf_counter() - start < 60


def test_base_model_tolerates_a_few_head_entries(packed_dir, tmp_path):
    """Loading the base model from a head checkpoint: a missing head entry is fine, a padded map is not."""
    folder = tmp_path / "base"
    shutil.copytree(packed_dir, folder)
    _config(folder, lambda q: q["layers"].__setitem__("lm_head", q["layers"][MAP_KEY]))
    _rewrite(folder / "model.safetensors", lambda t, m: m.pop(LAYER_MAP_METADATA_KEY))
    assert AutoModel.from_pretrained(folder) is not None

    def pad(q: dict) -> None:
        for i in range(20):
            q["layers"][f"head{i}"] = q["layers"][MAP_KEY]

    _config(folder, pad)
    with pytest.raises(CheckpointError, match="more than 8 modules"):
        AutoModel.from_pretrained(folder)


# ---- 6. user regexes -----------------------------------------------------------------------------


def _reference_is_skipped(name: str, patterns: list[str]) -> bool:
    """The matching rules as they were implemented before (transformers' helper plus component runs)."""
    import re

    from transformers.quantizers.quantizers_utils import should_convert_module

    if not should_convert_module(name, patterns):
        return True
    return any(re.search(rf"(?:^|\.)(?:{p})(?:\.|$)", name) for p in patterns)


def test_bounded_matching_keeps_the_matching_rules():
    names = ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.11.attention.self.query",
             "bert.encoder.layer.1.output.dense", "model.layers.1.mlp.gate_proj", "lm_head", "classifier",
             "transformer.h.0.mlp.c_fc", "model.decoder.layers.23.fc1", "mlp.gate"]
    patterns = ["intermediate", "layer.1", "layer.*", "fc1", "lm_head", "mlp.gate", "classifier", "query",
                r"h\.\d+\.mlp", "attention.self", "dense", "encoder", "^bert", "layers.1.mlp", "c_fc", "ate"]
    for name in names:
        for pattern in patterns:
            assert matches_any(name, compile_module_patterns([pattern])) == _reference_is_skipped(name, [pattern]), (
                name, pattern)
    assert is_skipped("bert.encoder.layer.0.intermediate.dense", ["intermediate"])
    assert not is_skipped("bert.encoder.layer.11.output.dense", ["layer.1"])


@pytest.mark.parametrize("pattern", ["(", "[a-", "*x", "(?P<x"])
def test_invalid_pattern_fails_when_the_config_is_built(pattern):
    with pytest.raises(ValueError, match="modules_to_not_convert"):
        SplitQuantConfig(modules_to_not_convert=["lm_head", pattern])


def test_pathological_pattern_is_bounded():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"modules_to_not_convert.*took over"):
        matches_any("a" * 40 + ".b", compile_module_patterns(["(a|a)+!"]))
    assert time.perf_counter() - start < 10


_QUANTIZE_WITH_PATTERN = """
import sys, hf_splitquant
from transformers import AutoModelForSequenceClassification
config = hf_splitquant.SplitQuantConfig(bits=4, modules_to_not_convert=["([a-z0-9.]+)+!", "classifier"])
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], quantization_config=config)
print(len(list(hf_splitquant.modeling.iter_packed_modules(model))))
"""


@pytest.mark.slow
def test_backtracking_pattern_does_not_hang_quantize_on_load(float_checkpoints):
    """BERT's module paths (``bert.encoder.layer.0.attention.self.query``) are long runs of the
    pattern's character class: plain ``re`` backtracks exponentially on them and never returns."""
    try:
        proc = subprocess.run([sys.executable, "-c", _QUANTIZE_WITH_PATTERN, float_checkpoints["bert"]],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail("quantize-on-load with a backtracking pattern did not finish in 120 s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) == 13  # 6 Linear per layer, 2 layers, and the pooler


# ---- 7. paths outside the checkpoint -------------------------------------------------------------


@pytest.mark.parametrize("absolute", [False, True])
def test_index_pointing_outside_the_folder_is_refused(packed_llama, tmp_path, absolute):
    folder = tmp_path / "ckpt"
    packed_llama.save_pretrained(folder, max_shard_size="20KB")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "outside").mkdir()
    shutil.move(folder / shard, tmp_path / "outside" / shard)
    entry = str(tmp_path / "outside" / shard) if absolute else f"../outside/{shard}"
    index["weight_map"] = {k: entry if v == shard else v for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside"):
        _load(folder)


def test_checkpoint_in_a_subfolder_still_loads(packed_llama, tmp_path, input_ids):
    packed_llama.save_pretrained(tmp_path / "repo" / "packed", max_shard_size="20KB")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "repo", subfolder="packed").eval()
    assert torch.equal(model_output(reloaded, input_ids), model_output(packed_llama, input_ids))


def test_save_pretrained_into_a_file_path_raises(packed_llama, packed_dir, tmp_path):
    file = tmp_path / "not_a_folder"
    file.write_text("mine")
    with pytest.raises(FileExistsError, match="is a file"):
        packed_llama.save_pretrained(file)
    with pytest.raises(FileExistsError, match="is a file"):
        _load(packed_dir).save_pretrained(file)  # a reloaded packed model too
    assert file.read_text() == "mine"
    packed_llama.save_pretrained(tmp_path / "folder")  # a folder still saves
    assert (tmp_path / "folder" / "model.safetensors").is_file()


# ---- 8. validation gaps --------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("has_bias", "yes"), ("symmetric", "false"), ("has_bias", 1),
                                              ("symmetric", None)])
def test_layer_spec_booleans_are_booleans(copy, field, value):
    spec = {"in_features": 8, "out_features": 8, "bits": 4, field: value}
    with pytest.raises(ValueError, match=field):
        LayerSpec.from_dict(spec)
    _config(copy, lambda q: q["layers"][MAP_KEY].__setitem__(field, value))
    with pytest.raises(ValueError, match=field):
        _load(copy)


@pytest.mark.parametrize("version", ["-5", "0", "\uff11", "+1", " 1", "1.0", "01"])
def test_header_format_version_must_be_a_positive_ascii_integer(copy, version):
    _rewrite(copy / "model.safetensors", lambda t, m: m.__setitem__(FORMAT_METADATA_KEY, version))
    with pytest.raises(CheckpointError, match="invalid hf_splitquant format version"):
        _load(copy)


# ---- concurrency: a reader loading while a writer saves ----------------------------------------

_WRITER = """
import sys, time, hf_splitquant
from pathlib import Path
from transformers import AutoModelForCausalLM
from hf_splitquant.saving import save_quantized
source, target, stop = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
models = [AutoModelForCausalLM.from_pretrained(source, quantization_config=hf_splitquant.SplitQuantConfig(bits=b,
          group_size=16)) for b in (4, 3)]
saves = 0
while not stop.exists():
    save_quantized(models[saves % 2], target, overwrite=True)
    saves += 1
print(saves)
"""


@pytest.mark.slow
def test_reader_never_sees_a_mix_of_two_saves(float_checkpoints, tmp_path, input_ids):
    """A writer process saves two different checkpoints (4 and 3 bits) alternately into one folder
    while this process loads it in a loop: every load is one of the two models, or an error that
    says the checkpoint is being written."""
    source = float_checkpoints["llama"]
    expected = []
    for bits in (4, 3):
        model = AutoModelForCausalLM.from_pretrained(source, quantization_config=SplitQuantConfig(bits=bits,
                                                                                                  group_size=16))
        expected.append(model_output(model.eval(), input_ids))
    target, stop = tmp_path / "shared", tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, source, str(target), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    seen = {0: 0, 1: 0}
    errors: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not (target / "model.safetensors").exists():
            assert writer.poll() is None and time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.05)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                out = model_output(AutoModelForCausalLM.from_pretrained(target).eval(), input_ids)
            except (ValueError, OSError, RuntimeError) as err:
                errors.append(str(err))
                continue
            matches = [i for i, want in enumerate(expected) if torch.equal(out, want)]
            assert matches, "a load returned a model that is neither the old nor the new checkpoint"
            seen[matches[0]] += 1
    finally:
        stop.touch()
        out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err[-2000:]
    assert int(out.split()[-1]) >= 5  # the writer really saved over and over
    assert seen[0] + seen[1] >= 5, (seen, errors)
    print(f"loads: {seen}, errors: {len(errors)}")
    for message in errors:
        assert "being written" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared", "stop"]
