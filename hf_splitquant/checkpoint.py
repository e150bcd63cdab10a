"""Validation of packed checkpoints before and after their tensors are loaded.

A quantized checkpoint is something people download from strangers. Before any tensor data is
read, the safetensors headers (names, shapes, dtypes; parsed and bounds-checked by the safetensors
library, nothing is ever unpickled) are checked against the per-layer map in ``config.json``: the
format version, every expected tensor present with the exact shape and dtype, nothing unexpected
under a quantized layer. After loading, the values are checked (finite positive scales, zero points
and cluster ids in range) and every tensor's bytes in the files are compared with the SHA-256 digest that
``save_pretrained`` wrote into the header, so a corrupt file never loads silently.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .methods import tensor_shapes
from .spec import LayerSpec

__all__ = [
    "FORMAT_METADATA_KEY",
    "DIGEST_METADATA_PREFIX",
    "CheckpointError",
    "read_headers",
    "check_format_version",
    "check_layout",
    "check_values",
    "tensor_digest",
    "verify_digests",
]

FORMAT_METADATA_KEY = "hf_splitquant_format_version"
DIGEST_METADATA_PREFIX = "hf_splitquant_sha256:"

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
_MAX_TRIT_BYTE = 3**5 - 1


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
                metadata.update(handle.metadata() or {})
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
    try:
        version = int(raw)
    except ValueError:
        raise CheckpointError(f"invalid hf_splitquant format version {raw!r} in the safetensors header") from None
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
        if spec.has_bias and _find(prefixes, "bias", tensors) is None:
            raise CheckpointError(f"`{name}.bias` is missing from the checkpoint")
        allowed = set(expected) | {"bias"}
        for prefix in prefixes:
            for key in tensors:
                suffix = key[len(prefix) + 1 :]
                if key.startswith(prefix + ".") and "." not in suffix and suffix not in allowed:
                    raise CheckpointError(
                        f"unexpected tensor `{key}` in quantized layer `{name}` (the map expects "
                        f"{sorted(allowed)}): the files and config.json do not belong together"
                    )


def _max(t: torch.Tensor) -> int:
    return int(t.max()) if t.numel() else 0


def check_values(name: str, spec: LayerSpec, tensors: Mapping[str, torch.Tensor]) -> None:
    """Loaded packed tensors hold sane values (finite positive scales, codes' companions in range)."""
    scale = tensors["weight_scale"].float()
    if not torch.isfinite(scale).all() or not (scale > 0).all():
        raise CheckpointError(f"`{name}.weight_scale` holds NaN, Inf, zero or negative scales")
    if "weight_min" in tensors and not torch.isfinite(tensors["weight_min"].float()).all():
        raise CheckpointError(f"`{name}.weight_min` holds NaN or Inf values")
    if "weight_zero" in tensors and _max(tensors["weight_zero"]) > 2**spec.bits - 1:
        raise CheckpointError(f"`{name}.weight_zero` holds zero points above {2**spec.bits - 1} for {spec.bits}-bit codes")
    if "weight_cluster" in tensors and _max(tensors["weight_cluster"]) > _MAX_TRIT_BYTE:
        raise CheckpointError(f"`{name}.weight_cluster` holds bytes that are not five base-3 cluster ids")
    if "weight_dup_index" in tensors:
        index = tensors["weight_dup_index"]
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= spec.in_features):
            raise CheckpointError(f"`{name}.weight_dup_index` points outside the layer's {spec.in_features} inputs")


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes as safetensors stores them (contiguous, little-endian)."""
    t = tensor.detach().contiguous().cpu()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return hashlib.sha256(data).hexdigest()


def verify_digests(files: Iterable[str | Path], metadata: Mapping[str, str], required: Iterable[str] = ()) -> None:
    """Hash every tensor's bytes straight from the files (memory-mapped, no tensor is built) and
    compare with the digests in the header metadata.

    Args:
        files: the checkpoint's safetensors files.
        metadata: the headers' merged metadata (``hf_splitquant_sha256:<key>`` entries).
        required: key prefixes whose tensors must carry a digest (the quantized layers).

    Raises:
        CheckpointError: a digest differs (corrupt data), or a required tensor has none.
    """
    required = tuple(p + "." for p in required)
    if not any(k.startswith(DIGEST_METADATA_PREFIX) for k in metadata):
        raise CheckpointError(
            "the safetensors header carries no hf_splitquant checksums, so the data cannot be verified: "
            "re-save the model with hf_splitquant's save_pretrained"
        )
    for file in files:
        with open(file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            (header_len,) = struct.unpack("<Q", data[:8])
            header = json.loads(bytes(data[8 : 8 + header_len]))
            base = 8 + header_len
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                expected = metadata.get(DIGEST_METADATA_PREFIX + key)
                if expected is None:
                    if key.startswith(required):
                        raise CheckpointError(f"packed tensor `{key}` has no checksum in the safetensors header")
                    continue
                start, end = entry["data_offsets"]
                if hashlib.sha256(data[base + start : base + end]).hexdigest() != expected:
                    raise CheckpointError(
                        f"the data of `{key}` in {Path(file).name} does not match the SHA-256 digest recorded when "
                        "it was saved: the checkpoint is corrupt; download or save it again"
                    )


def expected_bytes(spec: LayerSpec) -> int:
    """Bytes of a layer's packed tensors (used to bound allocations)."""
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size()
               for shape, dtype in tensor_shapes(spec).values())
