"""Atomic checkpoint writing: a save either lands whole or leaves the previous folder untouched."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["atomic_directory_write", "save_quantized", "canonicalize_safetensors"]


def atomic_directory_write(output_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp_dir)`` on a fresh folder beside ``output_dir``, then move it into place.

    An exception (or a kill) inside ``write`` leaves ``output_dir`` as it was and removes the
    temporary folder (a kill leaves only a hidden ``.tmp-*`` folder, never a partial checkpoint).

    Raises:
        FileExistsError: ``output_dir`` exists, is not empty and ``overwrite`` is False.
    """
    target = Path(output_dir).resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; choose another output path")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} already exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
            backup.rmdir()
            os.replace(target, backup)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(backup, target)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def canonicalize_safetensors(folder: str | os.PathLike) -> None:
    """Rewrite each safetensors header of ``folder`` with its metadata entries in sorted order.

    safetensors keeps header metadata in a hash map, so two saves of the same model can order the
    entries differently; tensor entries and data are already deterministic. After this, the same
    model, config and seed give byte-identical files.
    """
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "r+b") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
            if "__metadata__" not in header:
                continue
            ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))}
            ordered.update(header)
            text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            if len(text) > length:  # never expected: same entries, same compact formatting
                raise RuntimeError(f"cannot canonicalize {path.name}: the rewritten header is longer")
            handle.seek(8)
            handle.write(text + b" " * (length - len(text)))


def save_quantized(model, output_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,  # noqa: ANN001
                   **save_kwargs) -> Path:  # noqa: ANN003
    """``model.save_pretrained`` (and the tokenizer's) into ``output_dir``, atomically."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, **save_kwargs)
        canonicalize_safetensors(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    path = atomic_directory_write(output_dir, write, overwrite=overwrite)
    logger.info(f"Saved quantized model to {path}")
    return path
