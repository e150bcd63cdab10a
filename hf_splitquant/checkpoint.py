"""Validation of packed checkpoints before and after their tensors are loaded.

A quantized checkpoint is something people download from strangers. Before any tensor data is
read, the safetensors headers (names, shapes, dtypes; parsed and bounds-checked by the safetensors
library, nothing is ever unpickled) are checked against the per-layer map in ``config.json``: the
format version, every expected tensor present with the exact shape and dtype, nothing unexpected
under a quantized layer. After loading, the values are checked (finite positive scales, zero points
and cluster ids in range) and every tensor's bytes in the files are compared with the SHA-256 digest that
``save_pretrained`` wrote into the header, so a corrupt file never loads silently. The headers also
carry a digest of the per-layer map itself, binding ``config.json`` to the files: a map edited
without the files (or files swapped under a map) is refused even where shapes still agree.
Checkpoints written before that digest existed load without that one check.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from .methods import get_format, stored_bytes, tensor_shapes
from .spec import LayerSpec

logger = logging.get_logger(__name__)

__all__ = [
    "FORMAT_METADATA_KEY",
    "DIGEST_METADATA_PREFIX",
    "LAYER_MAP_METADATA_KEY",
    "MAX_UNKNOWN_MAP_ENTRIES",
    "CheckpointError",
    "read_headers",
    "check_format_version",
    "check_layout",
    "check_values",
    "tensor_digest",
    "verify_digests",
    "layer_map_digest",
    "check_layer_map_digest",
    "check_checkpoint_files",
    "model_checkpoint_keys",
    "unknown_map_entries",
    "concurrent_write_note",
    "file_identities",
    "check_files_unchanged",
    "pin_files",
    "CheckpointReadGuard",
]

FORMAT_METADATA_KEY = "hf_splitquant_format_version"
DIGEST_METADATA_PREFIX = "hf_splitquant_sha256:"
#: SHA-256 of the per-layer map (``quantization_config.layers``) the files were saved with.
LAYER_MAP_METADATA_KEY = "hf_splitquant_layers_sha256"
#: Map entries naming modules the model lacks that are tolerated (a task head absent from a base
#: model); more than this is refused before any per-entry work.
MAX_UNKNOWN_MAP_ENTRIES = 8
#: Bytes hashed per step when verifying digests (memory stays flat whatever the tensor size).
DIGEST_CHUNK_BYTES = 16 * 2**20

_DTYPE_NAMES = {
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}


class CheckpointError(ValueError):
    """A packed checkpoint is corrupt, truncated, or does not match its quantization map."""


def read_headers(files: Iterable[str | Path]) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    """Metadata and ``{key: (shape, dtype)}`` of safetensors files, reading headers only.

    Raises:
        CheckpointError: a file is not safetensors, or its header is corrupt or truncated.
    """
    from safetensors import SafetensorError, safe_open

    metadata: dict[str, str] = {}
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        path = Path(file)
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path.name}: hf_splitquant loads packed checkpoints from safetensors files only (nothing is "
                "unpickled); re-save the model with save_pretrained(safe_serialization=True)"
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key, value in (handle.metadata() or {}).items():
                    if metadata.setdefault(key, value) != value:
                        raise CheckpointError(
                            f"the safetensors headers disagree on `{key}` ({path.name} and another file): the "
                            "files come from different saves (a shard replaced, or the checkpoint is being "
                            "written); save or download the whole checkpoint again"
                        )
                for key in handle.keys():
                    view = handle.get_slice(key)
                    tensors[key] = (tuple(view.get_shape()), view.get_dtype())
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path.name} is not a readable safetensors file (corrupt or truncated): {err}") from None
    return metadata, tensors


def check_format_version(metadata: Mapping[str, str], supported: int) -> None:
    """The header's format version must be present and not newer than ``supported``."""
    raw = metadata.get(FORMAT_METADATA_KEY)
    if raw is None:
        raise CheckpointError(
            "the safetensors header has no hf_splitquant format version: these files were not written by "
            "hf_splitquant's save_pretrained (or were re-saved by another tool)"
        )
    # the config's rule: a positive integer; here written as plain ASCII digits ("-5", "0", "+1",
    # " 1" or a full-width digit are refused, although int() would take them)
    if not isinstance(raw, str) or not re.fullmatch(r"[1-9][0-9]{0,8}", raw, flags=re.ASCII):
        raise CheckpointError(
            f"invalid hf_splitquant format version {raw!r} in the safetensors header (a positive integer in "
            "ASCII digits is expected): the header was edited or damaged"
        )
    version = int(raw)
    if version > supported:
        raise CheckpointError(
            f"this checkpoint uses packed format version {version}, but the installed hf_splitquant reads versions "
            f"up to {supported}: upgrade hf_splitquant (`pip install -U hf-splitquant`)"
        )


def _find(prefixes: list[str], suffix: str, tensors: Mapping[str, object]) -> str | None:
    for prefix in prefixes:
        key = f"{prefix}.{suffix}"
        if key in tensors:
            return key
    return None


def check_layout(
    layers: Mapping[str, tuple[LayerSpec, list[str]]],
    tensors: Mapping[str, tuple[tuple[int, ...], str]],
) -> None:
    """Every packed tensor present with its exact shape and dtype, and nothing unexpected.

    Args:
        layers: per quantized layer (by map key): its spec and the key prefixes it may be stored
            under in the checkpoint (with or without the base-model prefix).
        tensors: the headers' ``{key: (shape, dtype)}``.
    """
    for name, (spec, prefixes) in layers.items():
        expected = tensor_shapes(spec)
        for suffix, (shape, dtype) in expected.items():
            key = _find(prefixes, suffix, tensors)
            if key is None:
                raise CheckpointError(f"packed tensor `{name}.{suffix}` is missing from the checkpoint")
            got_shape, got_dtype = tensors[key]
            want_dtype = _DTYPE_NAMES[dtype]
            if got_dtype != want_dtype or tuple(got_shape) != tuple(shape):
                raise CheckpointError(
                    f"`{key}` is {got_dtype}{list(got_shape)} in the checkpoint but the quantization map says "
                    f"{want_dtype}{list(shape)} ({spec.transform}, {spec.bits} bits, {spec.out_features}x"
                    f"{spec.in_features}): the files and config.json do not belong together"
                )
        bias_key = _find(prefixes, "bias", tensors)
        if spec.has_bias and bias_key is None:
            raise CheckpointError(f"`{name}.bias` is missing from the checkpoint")
        if not spec.has_bias and bias_key is not None:
            raise CheckpointError(
                f"the quantization map says layer `{name}` has no bias (`has_bias: false`) but the checkpoint "
                f"holds `{bias_key}`: config.json and the files do not belong together (it would be dropped)"
            )
        allowed = set(expected) | ({"bias"} if spec.has_bias else set())
        for prefix in prefixes:
            for key in tensors:
                suffix = key[len(prefix) + 1 :]
                if key.startswith(prefix + ".") and "." not in suffix and suffix not in allowed:
                    raise CheckpointError(
                        f"unexpected tensor `{key}` in quantized layer `{name}` (the map expects "
                        f"{sorted(allowed)}): the files and config.json do not belong together"
                    )


def check_values(name: str, spec: LayerSpec, tensors: Mapping[str, torch.Tensor]) -> None:
    """Loaded packed tensors hold sane values (finite positive scales, companions in range); the format
    says what sane is (:meth:`hf_splitquant.methods.base.QuantFormat.invalid_values`)."""
    problem = get_format(spec).invalid_values(tensors, spec)
    if problem is not None:
        suffix, message = problem
        raise CheckpointError(f"`{name}.{suffix}` {message}")


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes as safetensors stores them (contiguous, little-endian)."""
    t = tensor.detach().contiguous().cpu()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return hashlib.sha256(data).hexdigest()


def _hash_region(data: mmap.mmap, view: memoryview, start: int, end: int) -> str:
    """SHA-256 of ``data[start:end]`` hashed in chunks of the mapping itself (no copy is made).

    Each chunk's pages are released from the mapping once hashed (``MADV_DONTNEED``; they stay in
    the page cache), so the resident size does not grow with the tensor either.
    """
    digest = hashlib.sha256()
    dontneed = getattr(mmap, "MADV_DONTNEED", None)
    for offset in range(start, end, DIGEST_CHUNK_BYTES):
        stop = min(offset + DIGEST_CHUNK_BYTES, end)
        digest.update(view[offset:stop])
        if dontneed is not None:
            page = offset - offset % mmap.PAGESIZE
            data.madvise(dontneed, page, stop - page)
    return digest.hexdigest()


def verify_digests(files: Iterable[str | Path], metadata: Mapping[str, str], required: Iterable[str] = (),
                   tied: Iterable[str] = (), wanted: Collection[str] | None = None) -> None:
    """Hash every tensor's bytes straight from the files (memory-mapped, hashed in chunks of
    :data:`DIGEST_CHUNK_BYTES` through a ``memoryview``: no tensor is built and no bytes are copied,
    so memory stays flat for tensors of any size) and compare with the digests in the header.

    Every tensor must have a digest, and every digest a tensor: a tensor removed from a file, or a
    shard left out of ``model.safetensors.index.json``, would otherwise be re-initialised at random.

    Args:
        files: the checkpoint's safetensors files.
        metadata: the headers' merged metadata (``hf_splitquant_sha256:<key>`` entries).
        required: key prefixes of the quantized layers (kept for callers; every tensor now needs a digest).
        tied: keys the model ties to another parameter (``save_pretrained`` drops them from the files
            but lists their digests).
        wanted: the checkpoint keys the model being loaded takes (see :func:`model_checkpoint_keys`);
            a digest without a tensor is refused only for these (``None``: for every key). A base
            model loaded from a head checkpoint does not take the head's dropped tied keys.

    Raises:
        CheckpointError: a digest differs (corrupt data), a tensor has none, or a digest has no tensor.
    """
    del required  # every tensor is required to carry a digest
    if not any(k.startswith(DIGEST_METADATA_PREFIX) for k in metadata):
        raise CheckpointError(
            "the safetensors header carries no hf_splitquant checksums, so the data cannot be verified: "
            "re-save the model with hf_splitquant's save_pretrained"
        )
    seen: set[str] = set()
    for file in files:
        name = Path(file).name
        with open(file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            (header_len,) = struct.unpack("<Q", data[:8])
            header = json.loads(bytes(data[8 : 8 + header_len]))
            base = 8 + header_len
            with memoryview(data) as view:
                for key, entry in header.items():
                    if key == "__metadata__":
                        continue
                    seen.add(key)
                    expected = metadata.get(DIGEST_METADATA_PREFIX + key)
                    if expected is None:
                        raise CheckpointError(
                            f"tensor `{key}` in {name} has no checksum in the safetensors header: it was added "
                            "after saving; remove it or save the checkpoint again"
                        )
                    start, end = entry["data_offsets"]
                    if _hash_region(data, view, base + start, base + end) != expected:
                        raise CheckpointError(
                            f"the data of `{key}` in {name} does not match the SHA-256 digest recorded when "
                            "it was saved: the checkpoint is corrupt; download or save it again"
                        )
    tied = set(tied)
    absent = sorted(key for meta_key in metadata if meta_key.startswith(DIGEST_METADATA_PREFIX)
                    and (key := meta_key[len(DIGEST_METADATA_PREFIX):]) not in seen and key not in tied
                    and (wanted is None or key in wanted))
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise CheckpointError(
            f"tensor `{absent[0]}`{more} was saved (the header lists its checksum) but is in none of the "
            "checkpoint's files: a file was edited or a shard is missing from model.safetensors.index.json; "
            "it would be re-initialised at random. Download or save the checkpoint again"
        )


def model_checkpoint_keys(model_keys: Iterable[str], prefix: str = "") -> set[str]:
    """The checkpoint keys that fill ``model_keys``: each as is, with and without ``prefix``.

    transformers loads a head model from a base checkpoint and the other way round by adding or
    removing the base-model prefix, so both spellings name the same tensor.
    """
    keys: set[str] = set()
    for key in model_keys:
        keys.add(key)
        if prefix:
            keys.add(f"{prefix}.{key}")
            if key.startswith(prefix + "."):
                keys.add(key[len(prefix) + 1 :])
    return keys


def layer_map_digest(layers: Mapping[str, Any] | None) -> str:
    """SHA-256 of the per-layer map as canonical JSON (sorted keys, compact)."""
    text = json.dumps(layers or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def check_layer_map_digest(metadata: Mapping[str, str], layers: Mapping[str, Any] | None) -> None:
    """The map in ``config.json`` must be the one the files were saved with.

    Checkpoints saved before the map digest existed carry none: they load, without this check.

    Raises:
        CheckpointError: the digests differ (``config.json`` or the files were edited or swapped).
    """
    expected = metadata.get(LAYER_MAP_METADATA_KEY)
    if expected is None:
        logger.info("This checkpoint predates the per-layer map digest; the map is checked against shapes only.")
        return
    if layer_map_digest(layers) != expected:
        raise CheckpointError(
            "the per-layer quantization map in config.json (`quantization_config.layers`) is not the one these "
            "files were saved with (its SHA-256 differs from the safetensors header's "
            f"`{LAYER_MAP_METADATA_KEY}`): config.json and the files do not belong together (one was edited or "
            "swapped), which would load with wrong outputs; download or save the checkpoint again"
        )


def check_checkpoint_files(files: Iterable[str | Path], folder: str | Path | None = None) -> None:
    """Every weight file must be a plain file name inside the checkpoint's folder.

    transformers joins ``model.safetensors.index.json``'s ``weight_map`` values to the folder as they
    are, so ``../elsewhere/x.safetensors`` or an absolute path would be read from outside it.

    Args:
        files: the weight files transformers resolved.
        folder: the checkpoint folder when loading from a local folder (the files may lie in a
            subfolder of it); otherwise the files must only share one folder.

    Raises:
        CheckpointError: the files lie in different folders or outside ``folder``, or the index maps
            a tensor to something that is not a plain file name.
    """
    paths = [os.path.abspath(os.fspath(f)) for f in files]  # abspath also normalises `..`
    if not paths:
        return
    dirs = sorted({os.path.dirname(p) for p in paths})
    home = os.path.abspath(os.fspath(folder)) if folder is not None else None
    if len(dirs) > 1 or (home is not None and os.path.commonpath([home, dirs[0]]) != home):
        inside = home if home is not None else dirs[0]
        outside = next((p for p in paths if os.path.dirname(p) != inside), paths[0])
        raise CheckpointError(
            f"weight file {outside} lies outside the checkpoint folder {inside}: files outside the folder are "
            "never read; fix model.safetensors.index.json"
        )
    for index in sorted(Path(dirs[0]).glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            entries = list(weight_map.items())
        except (OSError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{index.name} is not a valid index: {err}") from None
        for key, value in entries:
            if not isinstance(value, str) or value != os.path.basename(value) or value in ("", ".", ".."):
                raise CheckpointError(
                    f"{index.name} maps `{key}` to {value!r}, which is not a file name inside the checkpoint "
                    "folder: weight files outside the folder are never read; fix or remove the index"
                )


def unknown_map_entries(keys: Iterable[str], module_names: Iterable[str], prefix: str = "",
                        tolerance: int = MAX_UNKNOWN_MAP_ENTRIES) -> list[str]:
    """The map keys that name no module of the model (with or without the base-model ``prefix``).

    A few are fine (a task head the base model being loaded does not have); more than
    ``tolerance`` means the map does not belong to this model, or was padded to exhaust the loader.

    Raises:
        CheckpointError: more than ``tolerance`` keys name no module.
    """
    known = set(module_names)
    unknown: list[str] = []
    for key in keys:
        if key not in known and (not prefix or f"{prefix}.{key}" not in known):
            unknown.append(key)
            if len(unknown) > tolerance:
                raise CheckpointError(
                    f"the quantization map in config.json names more than {tolerance} modules that this model "
                    f"does not have (e.g. `{unknown[0]}`, `{unknown[-1]}`): it does not belong to this model or "
                    "was padded; use the config.json saved with the weights"
                )
    return unknown


def file_identities(files: Iterable[str | Path]) -> dict[str, tuple[int, ...]]:
    """What identifies each file's current content at its path (device, inode, size, times)."""
    identities = {}
    for file in files:
        st = os.stat(file)
        identities[os.fspath(file)] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return identities


def check_files_unchanged(identities: Mapping[str, tuple[int, ...]]) -> None:
    """The files verified before loading must be the ones still at their paths after loading.

    A save swapping a new checkpoint in between the checks and the tensor reads would otherwise
    give a model mixing the two.

    Raises:
        CheckpointError: a file was replaced or removed meanwhile.
    """
    for file, identity in identities.items():
        try:
            current = file_identities([file])[file]
        except OSError:
            current = None
        if current != identity:
            raise CheckpointError(
                f"{Path(file).name} was replaced while the model loaded (the checkpoint is being written): the "
                "loaded tensors may mix two saves; load again once the save has finished"
            )


def pin_files(files: list[str]) -> Callable[[], None] | None:
    """Make ``files`` (in place) name the exact files open now, whatever is saved at their paths later.

    Each file is opened and the list entry replaced by a symbolic link, in a private temporary
    folder and under the same file name, to ``/proc/<pid>/fd/<n>``: everything read through the list
    afterwards (the checks, then transformers' tensor reads) sees the content that was verified,
    even if a save swaps a new checkpoint into the folder meanwhile or removes the old one. Linux
    only (``/proc``); elsewhere nothing changes and ``None`` is returned.

    Returns:
        a function that closes the descriptors and removes the links (idempotent), or ``None``.
    """
    proc = Path(f"/proc/{os.getpid()}/fd")
    if not proc.is_dir() or not files:
        return None
    import shutil
    import tempfile

    try:
        links = Path(tempfile.mkdtemp(prefix="hf_splitquant-pins-"))
    except OSError as err:  # no writable temporary folder: load unpinned (checked after loading instead)
        logger.debug(f"Checkpoint files not pinned: {err}")
        return None
    fds: list[int] = []

    def release() -> None:
        while fds:
            os.close(fds.pop())
        shutil.rmtree(links, ignore_errors=True)

    try:
        pinned = []
        for file in files:
            fds.append(os.open(file, os.O_RDONLY))
            link = links / f"{len(pinned)}" / Path(file).name
            link.parent.mkdir()
            os.symlink(proc / str(fds[-1]), link)
            pinned.append(str(link))
    except OSError as err:  # unreadable files fail in the checks that follow, with their own message
        logger.debug(f"Checkpoint files not pinned: {err}")
        release()
        return None
    files[:] = pinned
    return release


def concurrent_write_note(folder: str | Path | None, loaded_layers: Mapping[str, Any] | None = None,
                          identities: Mapping[str, tuple[int, ...]] | None = None) -> str | None:
    """Why a load may have failed other than corruption: the checkpoint is being written right now.

    True when a live process is saving into ``folder`` (an atomic save's temporary beside it), when
    ``config.json`` on disk no longer holds the map this load read, or when the weight files now at
    their paths are not the ones this load read (``identities``, from :func:`file_identities`).
    """
    if folder is None:
        return None
    from .saving import writer_in_progress

    folder = Path(folder)
    pid = writer_in_progress(folder)
    if pid is not None:
        return (f"the checkpoint in {folder} is being written by process {pid} right now; retry when that "
                "save has finished (the files are not corrupt)")
    if identities:
        try:
            check_files_unchanged(identities)
        except CheckpointError:
            return (f"the checkpoint in {folder} was replaced while it loaded (it is being written, or was "
                    "rewritten meanwhile); retry")
    if loaded_layers is not None:
        try:
            current = json.loads((folder / "config.json").read_text()).get("quantization_config", {}).get("layers")
        except (OSError, ValueError, AttributeError):
            return None
        if layer_map_digest(current) != layer_map_digest(loaded_layers):
            return (f"the checkpoint in {folder} was being written while it loaded (config.json changed "
                    "meanwhile); retry")
    return None


def expected_bytes(spec: LayerSpec) -> int:
    """Bytes of a layer's packed tensors (used to bound allocations)."""
    return stored_bytes(spec)


class CheckpointReadGuard:
    """Everything checked around transformers' reading of a packed checkpoint's files.

    Built before the tensors are read (``_process_model_before_weight_loading``): the weight files
    must lie in the checkpoint folder (:func:`check_checkpoint_files`), and they are pinned
    (:func:`pin_files`) so that what :meth:`verify` checks is what transformers reads. :meth:`finish`,
    after loading, releases the pins (or, unpinned, checks the files were not replaced meanwhile).
    An error caused by a save running into the folder says the checkpoint is being written.

    Args:
        files: transformers' list of weight files (rewritten in place when pinned).
        folder: the checkpoint folder if loading from a local folder (``config._name_or_path``).
        pin: pin the files (not with disk offload, which reopens files by path later).
    """

    def __init__(self, files: list[str], folder: str | os.PathLike | None, pin: bool = True) -> None:
        folder = os.fspath(folder) if folder is not None and os.path.isdir(folder) else None
        check_checkpoint_files(files, folder)
        self.files = files
        self.folder = folder or os.path.dirname(os.path.abspath(files[0]))
        originals = list(files)
        self._release: Callable[[], None] | None = None
        if pin:
            release = pin_files(files)
            self._release = weakref.finalize(self, release) if release is not None else None
        # what is read, by the path it came from: a change there means a save in between
        self.identities = dict(zip(originals, file_identities(files).values()))

    def _raise(self, err: CheckpointError, layers: Mapping[str, Any] | None, identities: bool = True) -> None:
        note = concurrent_write_note(self.folder, layers, self.identities if identities else None)
        if note is None:
            raise err
        raise CheckpointError(f"{note}. ({err})") from None

    def verify(self, supported_version: int, layers: Mapping[str, Any] | None,
               layout: Mapping[str, tuple[LayerSpec, list[str]]], required: Iterable[str] = (),
               tied: Iterable[str] = (), wanted: Collection[str] | None = None) -> None:
        """Headers, format version, layout, map digest and every tensor's digest (see the module doc).

        Args:
            supported_version: the newest packed format version this library reads.
            layers: ``quantization_config.layers`` as read from ``config.json``.
            layout, required, tied, wanted: as for :func:`check_layout` and :func:`verify_digests`.
        """
        try:
            metadata, tensors = read_headers(self.files)
            check_format_version(metadata, supported_version)
            check_layout(layout, tensors)
            check_layer_map_digest(metadata, layers)
            verify_digests(self.files, metadata, required=required, tied=tied, wanted=wanted)
        except CheckpointError as err:
            self._raise(err, layers)

    def finish(self, layers: Mapping[str, Any] | None) -> None:
        """After loading: release the pins, or (unpinned) check that no file was replaced."""
        if self._release is not None:
            self._release()
            return
        try:
            check_files_unchanged(self.identities)
        except CheckpointError as err:
            self._raise(err, layers, identities=False)
