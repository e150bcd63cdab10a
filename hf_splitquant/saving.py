"""Atomic checkpoint writing: a save either lands whole or leaves the previous folder untouched.

The new checkpoint is written into a hidden temporary folder beside the target
(``.tmp-<name>-<pid>-<random>``), then swapped into place. On Linux the swap is one
``renameat2(RENAME_EXCHANGE)`` call, so the target path holds the old or the new checkpoint at every
instant; elsewhere it is two renames, with a window of a few microseconds in which the path does not
exist (readers then get "not found" and the next attempt succeeds). With ``overwrite=True`` only what a
checkpoint save owns is replaced (the files the new save writes, and stale weight files of the old
one); every other file or folder in the target (a README the save does not write, ``src/``, notes)
is carried into the new folder by hard links (copies where links are impossible), so nothing
unrelated is lost. Temporaries left by a killed save are removed by the next save into the same
parent folder once their process is gone.

``config.json`` of a packed checkpoint also carries a guard for readers without hf_splitquant
(:func:`mark_packed_config`, written after every ``save_pretrained`` of a packed model): transformers
alone would load the float architecture, meet the packed tensors and, told to
``ignore_mismatched_sizes``, fill the quantized layers with random weights. The guard makes that load
fail on transformers' own terms with a message naming the fix; the quantizer removes it before
transformers uses it (:func:`clear_packed_marker`).
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import inspect
import json
import os
import shutil
import struct
import tempfile
import time
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "atomic_directory_write",
    "save_quantized",
    "canonicalize_safetensors",
    "CHECKPOINT_FILE_PATTERNS",
    "is_checkpoint_file",
    "clean_stale_temporaries",
    "writer_in_progress",
    "guard_save_pretrained",
    "PACKED_MARKER_KEY",
    "PACKED_MARKER",
    "mark_packed_config",
    "clear_packed_marker",
]

#: Files of a previous checkpoint that a new save removes even when it does not write them itself
#: (weights and their index under transformers' names); everything else it does not write is kept.
CHECKPOINT_FILE_PATTERNS = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
)
#: A temporary of an older hf_splitquant (no process id in its name) is stale after this long.
LEGACY_STALE_SECONDS = 3600.0
#: ``config.json`` field that guards a packed checkpoint against readers without hf_splitquant. transformers
#: 5.x reads it (``config.transformers_weights``) as the name of the weights file before it reads any
#: weight, and refuses a name that is not a ``.safetensors`` file, quoting the value: that quote is the
#: message. Checked with transformers 5.23 (``modeling_utils._get_resolved_checkpoint_files``).
PACKED_MARKER_KEY = "transformers_weights"
PACKED_MARKER = (
    "hf_splitquant packed low-bit checkpoint: transformers alone cannot read it (its quantized layers would "
    "load as random weights). Install hf_splitquant (pip install -U hf-splitquant) and import hf_splitquant "
    "before from_pretrained"
)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def is_checkpoint_file(name: str) -> bool:
    """Whether a file name is a weights file or index that a checkpoint save owns."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CHECKPOINT_FILE_PATTERNS)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_default_permissions(folder: Path, top_mode: int | None) -> None:
    """Give what a save wrote the permissions a plain ``save_pretrained`` gives (the umask's).

    ``tempfile`` creates the folder 0700 (and some writers create files 0600); a checkpoint is meant
    to be shared like any other saved model. ``top_mode`` keeps the mode of the folder being replaced.
    """
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(Path(root) / name, 0o777 & ~mask)
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                os.chmod(path, (0o666 | (path.stat().st_mode & 0o111)) & ~mask)
    os.chmod(folder, top_mode if top_mode is not None else 0o777 & ~mask)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _temporaries(target: Path) -> list[tuple[Path, int | None]]:
    """Our temporaries beside ``target``, with the id of the process that made them (if named)."""
    found = []
    for kind in (".tmp-", ".old-"):
        prefix = f"{kind}{target.name}-"
        try:
            entries = list(target.parent.glob(f"{kind}{glob_escape(target.name)}-*"))
        except OSError:
            continue
        for entry in entries:
            head = entry.name[len(prefix):].split("-", 1)[0]
            found.append((entry, int(head) if head.isdigit() else None))
    return found


def glob_escape(name: str) -> str:
    """``name`` with glob wildcards escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def writer_in_progress(target: str | os.PathLike) -> int | None:
    """The id of a live process saving into ``target`` through :func:`atomic_directory_write`, if any."""
    path = Path(target).absolute()
    for _, pid in _temporaries(path):
        if pid is not None and _pid_alive(pid):
            return pid
    return None


def clean_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the ``.tmp-<name>-*`` / ``.old-<name>-*`` folders that killed saves into ``target`` left.

    A temporary is stale when the process named in it no longer runs on this machine (older,
    unnamed ones: when untouched for :data:`LEGACY_STALE_SECONDS`). A stale ``.old-*`` folder is a
    previous checkpoint caught between the two renames of the non-Linux swap: it is moved back to
    ``target`` when ``target`` is missing, and removed otherwise. Returns what was removed.
    """
    path = Path(target).absolute()
    removed = []
    for entry, pid in _temporaries(path):
        try:
            if pid is not None:
                stale = pid != os.getpid() and not _pid_alive(pid)
            else:
                stale = time.time() - entry.stat().st_mtime > LEGACY_STALE_SECONDS
        except OSError:
            continue
        if not stale or not entry.is_dir() or entry.is_symlink():
            continue
        if entry.name.startswith(".old-") and not path.exists():
            os.replace(entry, path)
            logger.warning(f"Restored {path} from {entry.name}, left by a save that was killed mid-swap")
            continue
        shutil.rmtree(entry, ignore_errors=True)
        logger.info(f"Removed {entry}, left by a save that was killed")
        removed.append(entry)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"cannot swap {b} into place: {os.strerror(err)}")


def _carry(source: Path, dest: Path) -> None:
    """Recreate ``source`` (a file, link or folder) at ``dest`` sharing file data (hard links)."""
    if source.is_symlink():
        os.symlink(os.readlink(source), dest)
    elif source.is_dir():
        dest.mkdir()
        shutil.copystat(source, dest)
        for child in source.iterdir():
            _carry(child, dest / child.name)
    else:
        try:
            os.link(source, dest)
        except OSError:
            shutil.copy2(source, dest)


def atomic_directory_write(output_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp_dir)`` on a fresh folder beside ``output_dir``, then swap it into place.

    An exception (or a kill) inside ``write`` leaves ``output_dir`` as it was and removes the
    temporary folder (a kill leaves a hidden ``.tmp-<name>-<pid>-*`` folder, removed by the next
    save). With ``overwrite=True`` an existing ``output_dir`` keeps every entry the new save does not
    write, except stale weight files of the old checkpoint (:data:`CHECKPOINT_FILE_PATTERNS`). New
    folders and files get the umask's permissions, like a plain ``save_pretrained``; a replaced folder
    keeps its own mode.

    Raises:
        FileExistsError: ``output_dir`` is a file, or exists, is not empty and ``overwrite`` is False.
    """
    target = Path(output_dir).resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; choose another output path")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} already exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-{os.getpid()}-", dir=target.parent))
    try:
        write(tmp)
        existed = target.is_dir()
        _apply_default_permissions(tmp, target.stat().st_mode & 0o7777 if existed else None)
        if existed:
            written = {entry.name for entry in tmp.iterdir()}
            for entry in target.iterdir():
                if entry.name not in written and not (is_checkpoint_file(entry.name) and not entry.is_dir()):
                    _carry(entry, tmp / entry.name)
            cwd = _cwd()
            if _exchange(tmp, target):  # tmp now holds the previous checkpoint
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                # No atomic exchange here: two renames, a window of microseconds without `target`.
                backup = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-{os.getpid()}-", dir=target.parent))
                backup.rmdir()
                os.replace(target, backup)
                try:
                    os.replace(tmp, target)
                except BaseException:
                    os.replace(backup, target)
                    raise
                shutil.rmtree(backup, ignore_errors=True)
            if cwd is not None and (cwd == target or target in cwd.parents):
                os.chdir(cwd)  # this process was inside the replaced folder: move into the new one
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cwd() -> Path | None:
    try:
        return Path(os.getcwd())
    except OSError:
        return None


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


#: ``save_pretrained(push_to_hub=True, ...)`` keywords that belong to the upload, not to the save
_HUB_KWARGS = ("repo_id", "commit_message", "commit_description", "create_pr", "private", "revision")


def _guarded_save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    if os.path.isfile(save_directory):
        raise FileExistsError(
            f"cannot save the packed model to {save_directory}: it is a file, not a folder (transformers would "
            "only log an error and save nothing); choose a folder path"
        )
    save = type(self).save_pretrained
    bound = inspect.signature(save).bind(self, save_directory, *args, **kwargs)
    push = bound.arguments.pop("push_to_hub", False)
    extra = bound.arguments.get("kwargs", {})
    hub = {k: extra.pop(k) for k in _HUB_KWARGS if k in extra} if push else {}
    result = save(*bound.args, **bound.kwargs)
    if bound.arguments.get("is_main_process", True):
        mark_packed_config(save_directory)  # transformers drops the guard field when it writes config.json
    if push:
        # transformers would upload from inside save_pretrained, before the guard is written and with its
        # generic card: upload through the model's push_to_hub instead (it saves again, into a temporary folder)
        token = bound.arguments.get("token")
        self.push_to_hub(hub.pop("repo_id", Path(save_directory).name), token=token,
                         max_shard_size=bound.arguments.get("max_shard_size", "50GB"), **hub)
    return result


def guard_save_pretrained(model) -> None:  # noqa: ANN001
    """Make ``model.save_pretrained(path)`` raise when ``path`` is a file, and write the guard against
    readers without hf_splitquant into the saved ``config.json`` (:func:`~hf_splitquant.checkpoint.mark_packed_config`).

    transformers logs an error and returns without saving when ``path`` is a file, so a script believes the
    packed model was saved. With ``push_to_hub=True`` the folder is saved, then uploaded by
    ``model.push_to_hub``. The guard is bound to this instance only (its class is untouched).
    """
    current = model.__dict__.get("save_pretrained")
    if getattr(current, "__func__", None) is _guarded_save_pretrained:
        return
    model.__dict__["save_pretrained"] = types.MethodType(_guarded_save_pretrained, model)


def _is_packed_quantization_config(qconfig: Any) -> bool:
    """Whether a ``quantization_config`` (dict) describes packed layers (not a QAT float checkpoint)."""
    return (isinstance(qconfig, Mapping) and qconfig.get("quant_method") == "splitquant"
            and not qconfig.get("qat") and bool(qconfig.get("layers")))


def mark_packed_config(folder: str | Path) -> bool:
    """Add the :data:`PACKED_MARKER` guard to ``folder/config.json`` when it describes a packed checkpoint.

    Written after ``save_pretrained`` (transformers drops the field when it writes a config), in
    transformers' own JSON layout (2-space indent, sorted keys), so saves stay byte-identical. QAT
    checkpoints (float weights) are left alone. Returns whether the file was changed.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    if not _is_packed_quantization_config(data.get("quantization_config")) or data.get(PACKED_MARKER_KEY) == PACKED_MARKER:
        return False
    data[PACKED_MARKER_KEY] = PACKED_MARKER
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


def clear_packed_marker(config: Any) -> bool:
    """Remove the :data:`PACKED_MARKER` guard from a loaded transformers config (a user's own
    ``transformers_weights`` is kept). Returns whether it was there."""
    value = getattr(config, PACKED_MARKER_KEY, None)
    if isinstance(value, str) and value.startswith("hf_splitquant packed"):
        delattr(config, PACKED_MARKER_KEY)
        return True
    return False
