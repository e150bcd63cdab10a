"""Honest size accounting of packed models: every stored bit counted (codes with row padding,
scales, zero points or minimums, cluster ids)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .methods import get_format
from .nn.packed_linear import PackedLinear
from .spec import LayerSpec

__all__ = ["LayerReport", "QuantizationReport", "quantization_report", "report_from_specs", "format_report",
           "natural_key"]


@dataclass
class LayerReport:
    name: str
    transform: str
    bits: int
    group_size: int | None
    symmetric: bool
    shape: tuple[int, int]
    num_weights: int
    bytes_by_role: dict[str, int]

    @property
    def packed_bytes(self) -> int:
        return sum(self.bytes_by_role.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.packed_bytes / self.num_weights


@dataclass
class QuantizationReport:
    """Per-layer and total figures for a model's packed layers.

    ``bits_per_weight`` is over the quantized layers' weights, overheads included. ``model_bytes``
    counts every parameter and buffer of the model as it is in memory; ``float_model_bytes`` is the
    same model with the quantized weights in ``float_dtype`` (as a float checkpoint would store them).
    """

    method: str
    layers: list[LayerReport] = field(default_factory=list)
    model_bytes: int = 0
    float_model_bytes: int = 0
    float_dtype: str = "float32"

    @property
    def num_weights(self) -> int:
        return sum(layer.num_weights for layer in self.layers)

    @property
    def packed_bytes(self) -> int:
        return sum(layer.packed_bytes for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.packed_bytes / self.num_weights if self.layers else float("nan")

    def bytes_by_role(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for layer in self.layers:
            for role, n in layer.bytes_by_role.items():
                total[role] = total.get(role, 0) + n
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "num_quantized_layers": len(self.layers),
            "num_quantized_weights": self.num_weights,
            "packed_bytes": self.packed_bytes,
            "bits_per_weight": self.bits_per_weight,
            "bits_per_weight_by_role": {r: 8 * n / self.num_weights for r, n in self.bytes_by_role().items()}
            if self.layers
            else {},
            "model_bytes": self.model_bytes,
            "float_model_bytes": self.float_model_bytes,
            "float_dtype": self.float_dtype,
            "layers": [
                {
                    **asdict(layer),
                    "packed_bytes": layer.packed_bytes,
                    "bits_per_weight": layer.bits_per_weight,
                }
                for layer in self.layers
            ],
        }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _layer_report(name: str, spec: LayerSpec) -> LayerReport:
    fmt = get_format(spec)
    by_role = {fmt.tensor_roles.get(k, k): nbytes for k, nbytes in fmt.tensor_bytes(spec).items()}
    return LayerReport(
        name,
        spec.transform,
        spec.bits,
        spec.group_size,
        spec.symmetric,
        (spec.out_features, spec.in_features),
        spec.out_features * spec.in_features,
        by_role,
    )


def _method(layers: list[LayerReport]) -> str:
    methods = sorted({layer.transform for layer in layers})
    return "+".join(methods) if methods else "none"


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting module paths in model order: ``layers.2`` before ``layers.10`` (digit runs
    compare as numbers; a number sorts before a word at the same position)."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part)


def report_from_specs(specs: dict[str, LayerSpec]) -> QuantizationReport:
    """The packed-layer figures of a checkpoint from its per-layer map alone (no weights loaded), layers
    in natural order (``config.json`` stores the map sorted as strings: ``0, 1, 10, 11, ..., 2``)."""
    layers = [_layer_report(name, specs[name]) for name in sorted(specs, key=natural_key)]
    return QuantizationReport(_method(layers), layers)


def quantization_report(model: nn.Module, float_dtype: torch.dtype = torch.float32) -> QuantizationReport:
    """Measure the packed layers of ``model`` (works on any module tree)."""
    layers = [
        _layer_report(name, module.spec)
        for name, module in model.named_modules()
        if isinstance(module, PackedLinear)
    ]
    seen: set[int] = set()
    model_bytes = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            model_bytes += _nbytes(t)
    for module in model.modules():  # codes that live in the int4 layout only still count as stored
        if isinstance(module, PackedLinear) and module.codes_dropped:
            model_bytes += get_format(module.spec).tensor_bytes(module.spec)["weight"]
    elem = torch.empty((), dtype=float_dtype).element_size()
    float_bytes = (
        model_bytes - sum(la.packed_bytes for la in layers) + elem * sum(la.num_weights for la in layers)
    )
    return QuantizationReport(
        _method(layers), layers, model_bytes, float_bytes, str(float_dtype).removeprefix("torch.")
    )


def format_report(report: QuantizationReport, per_layer: bool = True) -> str:
    """A plain-text table of the report."""
    lines = []
    if per_layer:
        lines.append(f"{'layer':<60} {'method':<11} {'bits':>4} {'group':>6} {'shape':>12} {'bpw':>7}")
        for layer in report.layers:
            group = "chan" if layer.group_size is None else str(layer.group_size)
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            lines.append(
                f"{layer.name:<60} {layer.transform:<11} {layer.bits:>4} {group:>6} {shape:>12} "
                f"{layer.bits_per_weight:>7.3f}"
            )
    if not report.layers:
        return "no quantized layers"
    roles = ", ".join(f"{r} {8 * n / report.num_weights:.3f}" for r, n in report.bytes_by_role().items())
    lines.append(
        f"method {report.method}: {len(report.layers)} layers, {report.num_weights:,} weights, "
        f"{report.bits_per_weight:.3f} bits per weight ({roles})"
    )
    if report.model_bytes:
        lines.append(
            f"model size {report.model_bytes / 2**20:.2f} MiB in memory vs {report.float_model_bytes / 2**20:.2f} MiB "
            f"with {report.float_dtype} weights ({report.model_bytes / report.float_model_bytes:.3f}x)"
        )
    return "\n".join(lines)
