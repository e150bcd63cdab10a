"""Reliability round 2 (issue 17): what a red-team of the loader and the saver found.

Each test names the item of the issue it covers. Real models, real saves and loads, real processes.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import model_output
from transformers import AutoModelForCausalLM

from hf_splitquant import SplitQuantConfig
from hf_splitquant.cli import main
from hf_splitquant.saving import atomic_directory_write, clean_stale_temporaries, save_quantized


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


def test_swap_leaves_a_checkpoint_at_the_path_at_every_instant(packed_llama, tmp_path):
    """While one thread saves over and over, another polls the path: config.json is always there."""
    import threading

    target = tmp_path / "swap"
    save_quantized(packed_llama, target)
    stop = threading.Event()
    missing: list[float] = []

    def poll() -> None:
        while not stop.is_set():
            if not (target / "config.json").is_file() or not (target / "model.safetensors").is_file():
                missing.append(time.perf_counter())

    watcher = threading.Thread(target=poll)
    watcher.start()
    try:
        for _ in range(5):
            atomic_directory_write(target, lambda tmp: packed_llama.save_pretrained(tmp), overwrite=True)
    finally:
        stop.set()
        watcher.join()
    assert not missing
