"""The per-layer quantization spec: everything needed to rebuild a packed layer's tensors.

A :class:`LayerSpec` is written into ``config.json`` (``quantization_config.layers``) for every
quantized module, so a packed checkpoint is rebuilt exactly from its own description.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .quant.rotation import is_block

__all__ = ["LayerSpec", "SCALE_DTYPES"]

SCALE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}
#: "Embedding": a packed input embedding table ``[vocab, hidden]`` (format version 3)
SOURCES = ("Linear", "Conv1D", "Embedding")
#: "aligned": format version 4 (hf_splitquant.config.written_format_version)
SPLITQUANT_RANGES = ("cluster", "part", "aligned")
OCS_SPLITS = ("auto", "qa", "naive")
OCS_LAYOUTS = ("appended", "source_group")
CLIPS = (None, "mse")


@dataclass(frozen=True)
class LayerSpec:
    """How one Linear-like layer is quantized and stored.

    Attributes:
        in_features / out_features: the float layer's shape (``weight`` is ``[out, in]``).
        bits: code width (2..8).
        group_size: inputs per scale group, ``None`` for one group per output channel.
        symmetric: symmetric grid without zero points, else asymmetric with integer zero points.
        transform: the packed format's name (``"rtn"``, ``"splitquant"``, ``"ocs"``; see
            :func:`hf_splitquant.methods.get_format`).
        scale_dtype: ``"float16"`` or ``"float32"``.
        source: the float module type, ``"Linear"``, GPT-2's ``"Conv1D"`` (weight stored ``[in, out]``) or
            ``"Embedding"`` (an input embedding table, ``in_features = hidden``, ``out_features = vocab``).
        has_bias: whether the layer has a (float) bias.
        splitquant_range: ``"cluster"`` (each cluster's grid spans its own members, float origin),
            ``"aligned"`` (likewise, but the origin a whole number of steps from 0: an int8 zero point;
            2-3 bits) or ``"part"`` (the paper's numerics: each dense part's grid spans its values and the
            zeros around them).
        ocs_expand_ratio: OCS only: duplicated input channels = ``ceil(ratio * in_features)``.
        ocs_split: OCS only: ``"qa"`` (quantization-aware halves), ``"naive"`` (plain halves) or
            ``"auto"`` (whichever of the two gives the smaller weight error for this layer).
        clip: ``None`` or ``"mse"`` (per-group MSE search of the clipping range; RTN and OCS grids).
        ocs_layout: OCS only: ``"source_group"`` (each copy on its source's group grid, format version 2)
            or ``"appended"`` (the copies form the last groups, format version 1).
        input_rotation: ``None``, or the block size ``b`` (a power of two dividing ``in_features``) of the
            Hadamard rotation the codes are stored in: they describe ``W R`` with ``R = diag(H_b, ...)``, and
            the layer multiplies its input by ``R`` first (:mod:`hf_splitquant.quant.rotation`; format
            version 5). Round-to-nearest format and ``Linear``/``Conv1D`` sources only.
    """

    in_features: int
    out_features: int
    bits: int
    group_size: int | None = None
    symmetric: bool = False
    transform: str = "rtn"
    scale_dtype: str = "float16"
    source: str = "Linear"
    has_bias: bool = True
    splitquant_range: str = "cluster"
    ocs_expand_ratio: float = 0.0
    ocs_split: str = "qa"
    clip: str | None = None
    #: where OCS copies take their grid; maps written before format version 2 have no field: "appended"
    ocs_layout: str = "appended"
    #: Hadamard block of the stored basis (format version 5); maps written before have no field: None
    input_rotation: int | None = None

    def __post_init__(self) -> None:
        for name in ("in_features", "out_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"layer spec field `{name}` must be a positive integer, got {value!r}")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise ValueError(f"layer spec field `bits` must be an integer in 2..8, got {self.bits!r}")
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1
        ):
            raise ValueError(f"layer spec field `group_size` must be a positive integer or None, got {self.group_size!r}")
        for name in ("symmetric", "has_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"layer spec field `{name}` must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.transform, str) or not self.transform:
            # which names exist is the format registry's business (hf_splitquant.methods.get_format)
            raise ValueError(f"layer spec field `transform` must be a format name, got {self.transform!r}")
        if self.scale_dtype not in tuple(SCALE_DTYPES):
            raise ValueError(f"layer spec field `scale_dtype` must be one of {tuple(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.source not in SOURCES:
            raise ValueError(f"layer spec field `source` must be one of {SOURCES}, got {self.source!r}")
        if self.source == "Embedding" and (self.transform != "rtn" or self.has_bias):
            raise ValueError("an `Embedding` layer spec must have transform 'rtn' and has_bias false, got "
                             f"transform={self.transform!r}, has_bias={self.has_bias}")
        if self.splitquant_range not in SPLITQUANT_RANGES:
            raise ValueError(
                f"layer spec field `splitquant_range` must be one of {SPLITQUANT_RANGES}, got {self.splitquant_range!r}"
            )
        if self.transform == "splitquant" and self.splitquant_range == "aligned" and self.bits > 3:
            raise ValueError(f"splitquant_range='aligned' takes 2-3 bits (its zero points must fit the int4 kernel's "
                             f"codes), got bits={self.bits}; use splitquant_range='cluster' for wider codes")

        ratio = self.ocs_expand_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"layer spec field `ocs_expand_ratio` must be a number in [0, 1], got {ratio!r}")
        if self.ocs_split not in OCS_SPLITS:
            raise ValueError(f"layer spec field `ocs_split` must be one of {OCS_SPLITS}, got {self.ocs_split!r}")
        if self.ocs_layout not in OCS_LAYOUTS:
            raise ValueError(f"layer spec field `ocs_layout` must be one of {OCS_LAYOUTS}, got {self.ocs_layout!r}")
        if self.clip not in CLIPS:
            raise ValueError(f"layer spec field `clip` must be one of {CLIPS}, got {self.clip!r}")
        if self.input_rotation is not None:
            block = self.input_rotation
            if not is_block(block):
                raise ValueError(f"layer spec field `input_rotation` must be None or a power of two >= 2, got {block!r}")
            if self.in_features % block:
                raise ValueError(f"layer spec field `input_rotation` ({block}) must divide in_features "
                                 f"({self.in_features})")
            if self.transform != "rtn" or self.source == "Embedding":
                raise ValueError("layer spec field `input_rotation` is for round-to-nearest (`transform='rtn'`) "
                                 f"Linear/Conv1D layers, got transform={self.transform!r}, source={self.source!r}")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["input_rotation"] is None:  # maps without rotation stay as older releases wrote (and read) them
            del data["input_rotation"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSpec:
        if not isinstance(data, dict):
            raise ValueError(f"a layer spec must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown layer spec fields {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**data)
