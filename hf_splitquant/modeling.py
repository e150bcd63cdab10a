"""Model surgery for packed and fake-quant layers: which modules are quantized, their shapes and
float weights, replacing modules, and quantizing or dequantizing a whole model in memory.

Pure PyTorch plus transformers' public model classes (``Conv1D``); nothing here knows the
quantizer machinery of ``from_pretrained`` (that glue lives in
:mod:`hf_splitquant.integrations.transformers`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from .config import SplitQuantConfig, written_format_version
from .memory import release_freed_memory
from .methods import quantize_weight
from .nn.packed_embedding import PackedEmbedding, TiedPackedHead
from .nn.packed_linear import PackedLinear
from .patterns import compile_module_patterns, matches_any
from .spec import LayerSpec

logger = logging.get_logger(__name__)

__all__ = [
    "QUANTIZABLE",
    "base_prefix",
    "has_base_prefix_module",
    "normalise_name",
    "resolve_name",
    "default_modules_to_not_convert",
    "is_skipped",
    "select_modules",
    "module_shape",
    "float_weight",
    "set_module",
    "spec_for_module",
    "iter_packed_modules",
    "embedding_modules",
    "quantize_layer",
    "search_bit_widths",
    "quantize_modules",
    "dequantize_model",
]

#: the float module types that are quantized
QUANTIZABLE = (nn.Linear, Conv1D)



def base_prefix(model: nn.Module) -> str:
    """The model's ``base_model_prefix`` (``"bert"``, ``"model"``, ...) or ``""``."""
    return getattr(model, "base_model_prefix", "") or ""


def has_base_prefix_module(model: nn.Module) -> bool:
    """Whether ``model`` wraps its base model under ``base_model_prefix`` (a task head model)."""
    prefix = base_prefix(model)
    return bool(prefix) and isinstance(getattr(model, prefix, None), nn.Module) and getattr(model, prefix) is not model


def normalise_name(model: nn.Module, name: str) -> str:
    """Module path relative to the base model, so a head model and its base model share keys."""
    prefix = base_prefix(model)
    if prefix and has_base_prefix_module(model) and name.startswith(prefix + "."):
        return name[len(prefix) + 1 :]
    return name


def resolve_name(model: nn.Module, key: str) -> str | None:
    """The module path in ``model`` for a normalised key, or ``None`` if the model has no such module."""
    candidates = [key]
    if has_base_prefix_module(model):
        candidates.insert(0, f"{base_prefix(model)}.{key}")
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    return None


def default_modules_to_not_convert(model: nn.Module) -> list[str]:
    """Output embeddings and the module owning the model's last parameter (its task head).

    transformers' own helper returns the last *parameter* name (e.g. ``classifier.bias``), which then
    matches no module; we strip the parameter name so the head really stays in float.
    """
    skip: set[str] = set()
    params = list(model.named_parameters())
    if params:
        skip.add(params[-1][0].rpartition(".")[0])
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        skip.update(name for name, module in model.named_modules() if module is out_emb)
    return sorted(s for s in skip if s)


def _tied_module_names(model: nn.Module) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names = set(tied.keys()) | set(tied.values())
    return {n.rpartition(".")[0] for n in names}


def is_skipped(name: str, patterns: list[str]) -> bool:
    """Whether ``name`` matches a ``modules_to_not_convert`` pattern.

    transformers' rules (a prefix up to a module boundary, a regex with that boundary, or a suffix),
    plus a whole run of path components anywhere: ``"intermediate"`` skips
    ``bert.encoder.layer.0.intermediate.dense`` and ``"layer.1"`` does not skip ``layer.11``.
    """
    return matches_any(name, compile_module_patterns(patterns))  # bounded cost: see hf_splitquant.patterns


def select_modules(model: nn.Module, config: SplitQuantConfig) -> list[tuple[str, nn.Module]]:
    """The Linear / Conv1D modules that ``config`` quantizes, in model order."""
    skip = list(config.modules_to_not_convert) if config.modules_to_not_convert is not None else (
        default_modules_to_not_convert(model)
    )
    skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    tied = _tied_module_names(model)
    selected = []
    for name, module in model.named_modules():
        if not isinstance(module, QUANTIZABLE) or name in tied:
            continue
        if is_skipped(name, skip):
            continue
        selected.append((name, module))
    return selected


def module_shape(module: nn.Module) -> tuple[int, int, str]:
    """(in_features, out_features, source) of a float Linear-like module."""
    if isinstance(module, Conv1D):
        in_f, out_f = module.weight.shape
        return int(in_f), int(out_f), "Conv1D"
    return int(module.in_features), int(module.out_features), "Linear"


def float_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` float weight of a Linear or Conv1D."""
    w = module.weight.detach()
    return w.t() if isinstance(module, Conv1D) else w


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at path ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def iter_packed_modules(model: nn.Module) -> Iterator[tuple[str, PackedLinear]]:
    """``(name, module)`` of every :class:`PackedLinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            yield name, module




def embedding_modules(model: nn.Module) -> tuple[tuple[str, nn.Module] | None, tuple[str, nn.Module] | None, bool]:
    """``(input embedding, output head, tied)``: each ``(path, module)`` or ``None``; ``tied`` when the
    head computes with the input embedding's table (same weight, or a :class:`TiedPackedHead`)."""
    def find(getter: str) -> tuple[str, nn.Module] | None:
        get = getattr(model, getter, None)
        module = get() if callable(get) else None
        if module is None:
            return None
        return next(((name, m) for name, m in model.named_modules() if m is module), None)

    try:
        inp, out = find("get_input_embeddings"), find("get_output_embeddings")
    except NotImplementedError:  # models without embeddings
        return None, None, False
    if inp is None or out is None:
        return inp, out, False
    if isinstance(out[1], TiedPackedHead):
        return inp, out, out[1].embedding is inp[1]
    weight = getattr(out[1], "weight", None)
    # a loading skeleton is tied only after its weights are loaded: the model's tie map says it will be
    pairs = getattr(model, "all_tied_weights_keys", None) or {}
    keys = {f"{out[0]}.weight", f"{inp[0]}.weight"}
    tied = (weight is not None and weight is getattr(inp[1], "weight", None)) or any(
        {target, source} == keys for target, source in pairs.items())
    return inp, out, bool(tied)


def embedding_plan(model: nn.Module, config: SplitQuantConfig) -> tuple[tuple[str, nn.Embedding], tuple[str, nn.Module] | None,
                                                                   bool, LayerSpec]:
    """``(input embedding, output head, tied, spec)`` for ``config.embedding_bits``; a clear error when the model's
    input embedding is not an ``nn.Embedding``."""
    inp, out, tied = embedding_modules(model)
    if inp is None or not isinstance(inp[1], nn.Embedding):
        raise ValueError(f"`embedding_bits` packs the input embedding, but {type(model).__name__}'s input embedding "
                         f"is {'missing' if inp is None else type(inp[1]).__name__}, not an nn.Embedding; "
                         "set embedding_bits=None")
    emb = inp[1]
    return inp, out, tied, config.embedding_spec(emb.embedding_dim, emb.num_embeddings)


def _pack_embeddings(model: nn.Module, config: SplitQuantConfig, selected: set[str]) -> list[tuple[str, nn.Module, LayerSpec | None]]:
    """The packed input embedding and output head (``config.embedding_bits``), not swapped in yet:
    ``(path, new module, spec or None for a tied head)``."""
    inp, out, tied, spec = embedding_plan(model, config)
    name, emb = inp
    packed = quantize_layer(emb.weight.detach(), spec, config.seed, name)
    release_freed_memory()
    new_emb = PackedEmbedding.from_packed(spec, packed, None, device=emb.weight.device, dtype=emb.weight.dtype)
    result: list[tuple[str, nn.Module, LayerSpec | None]] = [(name, new_emb, spec)]
    if out is not None and tied:
        result.append((out[0], TiedPackedHead(new_emb), None))
    elif out is not None and isinstance(out[1], nn.Linear) and out[0] not in selected:
        head = out[1]
        head_spec = config.embedding_spec(head.in_features, head.out_features, "Linear", head.bias is not None)
        head_packed = quantize_layer(head.weight.detach(), head_spec, config.seed, out[0])
        release_freed_memory()
        result.append((out[0], PackedLinear.from_packed(head_spec, head_packed, head.bias, device=head.weight.device,
                                                        dtype=head.weight.dtype), head_spec))
    return result


def spec_for_module(config: SplitQuantConfig, module: nn.Module, bits: int | None = None) -> Any:
    """The :class:`~hf_splitquant.spec.LayerSpec` ``config`` gives a float Linear / Conv1D (at ``bits``)."""
    in_f, out_f, source = module_shape(module)
    return config.spec_for(in_f, out_f, module.bias is not None, source, bits=bits)


def quantize_layer(weight: torch.Tensor, spec: LayerSpec, seed: int, name: str) -> dict[str, torch.Tensor]:
    """Stored tensors of one layer's float ``[out, in]`` weight; errors name the layer."""
    try:
        return quantize_weight(weight, spec, seed=seed)
    except ValueError as err:
        raise ValueError(f"cannot quantize layer `{name}`: {err}") from None


def search_bit_widths(selected: list[tuple[str, nn.Module]], config: SplitQuantConfig,
                      progress: bool = True) -> dict[str, int]:
    """Per-layer bit widths for ``config.bit_allocation`` (MixQuant or coding length), by module name."""
    from .methods.mixquant import allocate_by_budget, allocate_by_qem, roundoff_error, spec_bits

    if config.bit_allocation in ("sensitivity", "coding_length_inputs"):
        raise ValueError(f"bit_allocation={config.bit_allocation!r} needs calibration data: use hf_splitquant.calibrate "
                         "(or quantize with calibration_data), or a data-free allocation ('mixquant', 'coding_length')")
    # Round-off errors are only needed by MixQuant; coding length needs only the stored costs.
    measure = config.bit_allocation == "mixquant"
    widths = sorted(set(config.mixquant_candidates) | ({config.mixquant_reference_bits} if measure else set()))
    errors: dict[str, dict[int, float]] = {}
    relative: dict[str, dict[int, float]] = {}
    reference: dict[str, float] = {}
    costs: dict[str, dict[int, int]] = {}
    sizes: dict[str, int] = {}
    for name, module in tqdm(selected, desc="Bit-width search", unit="layer",
                             disable=not progress or not logging.is_progress_bar_enabled()):
        in_f, out_f, source = module_shape(module)
        weight = float_weight(module).float()
        if not torch.isfinite(weight).all():
            raise ValueError(f"layer `{name}` has NaN or Inf weights; cannot quantize it")
        sizes[name] = in_f * out_f
        cache: dict = {}
        by_bits = {}
        for bits in widths:
            spec = config.spec_for(in_f, out_f, module.bias is not None, source, bits=bits)
            if bits in config.mixquant_candidates:
                costs.setdefault(name, {})[bits] = spec_bits(spec)
            if measure:
                by_bits[bits] = roundoff_error(weight, spec, config.mixquant_error, config.seed, cache)
        if measure:
            reference[name] = by_bits[config.mixquant_reference_bits]
            errors[name] = {b: e for b, e in by_bits.items() if b in config.mixquant_candidates}
            scale = float(weight.pow(2).mean() if config.mixquant_error == "mse" else weight.abs().mean())
            # error relative to the layer's own scale, times its weights: layers of any scale and size
            # compare, and a bit spent anywhere buys the same kind of error reduction
            relative[name] = {b: sizes[name] * e / max(scale, 1e-30) for b, e in errors[name].items()}
    if config.bit_allocation == "coding_length":
        from .methods.coding_length import allocate_by_coding_length

        weights = {name: float_weight(module) for name, module in selected}
        return allocate_by_coding_length(weights, costs, sizes, config.target_bits, config.coding_length_eps)
    if config.target_bits is None:
        return allocate_by_qem(errors, reference, config.mixquant_qem)
    return allocate_by_budget(relative, costs, sizes, config.target_bits)


def quantize_modules(model: nn.Module, config: SplitQuantConfig, progress: bool = True) -> None:
    """Replace the selected float layers by packed ones (round to nearest) and write ``config.layers``.

    Every packed layer is built before any is swapped in, so an error leaves the model untouched.
    """
    selected = select_modules(model, config)
    if not selected:
        raise ValueError(
            "no Linear layer to quantize: every Linear/Conv1D is listed in `modules_to_not_convert` or tied"
        )
    bit_widths = search_bit_widths(selected, config, progress) if config.bit_allocation else {}
    # Build every packed layer first and swap them in at the end: an error leaves the model untouched.
    replacements: list[tuple[str, PackedLinear]] = []
    layers: dict[str, dict[str, Any]] = {}
    for name, module in tqdm(selected, desc="Quantizing", unit="layer",
                             disable=not progress or not logging.is_progress_bar_enabled()):
        spec = spec_for_module(config, module, bits=bit_widths.get(name))
        weight = float_weight(module)
        packed = quantize_layer(weight, spec, config.seed, name)
        release_freed_memory()
        new = PackedLinear.from_packed(spec, packed, module.bias, device=weight.device)
        replacements.append((name, new))
        layers[normalise_name(model, name)] = spec.to_dict()
    if config.embedding_bits is not None:
        for name, new, spec in _pack_embeddings(model, config, {n for n, _ in selected}):
            replacements.append((name, new))
            if spec is not None:
                layers[normalise_name(model, name)] = spec.to_dict()
    for name, new in replacements:
        set_module(model, name, new)
    config.layers = layers
    config.format_version = max(config.format_version, written_format_version(layers))


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``PackedLinear`` by the float module it came from (``nn.Linear``, ``Conv1D``, or
    ``nn.Embedding`` with its tied head sharing the table again)."""
    heads = [(name, m) for name, m in model.named_modules() if isinstance(m, TiedPackedHead)]
    embeddings: dict[int, nn.Embedding] = {}
    for name, module in list(iter_packed_modules(model)):
        spec = module.spec
        if isinstance(module, PackedEmbedding):
            table = module.dequantize_weight(dtype or module.dtype)
            new_emb = nn.Embedding(spec.out_features, spec.in_features, device=table.device, dtype=table.dtype)
            new_emb.weight = nn.Parameter(table)
            embeddings[id(module)] = new_emb
            set_module(model, name, new_emb)
            continue
        w_dtype = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
        weight = module.dequantize_weight(w_dtype)
        device = weight.device
        if spec.source == "Conv1D":
            new: nn.Module = Conv1D(spec.out_features, spec.in_features)
            new.weight = nn.Parameter(weight.t().contiguous())
        else:
            new = nn.Linear(spec.in_features, spec.out_features, bias=spec.has_bias, device=device, dtype=w_dtype)
            new.weight = nn.Parameter(weight)
        if spec.has_bias:
            new.bias = nn.Parameter(module.bias.detach().to(w_dtype).clone())
        set_module(model, name, new.to(device))
    for name, head in heads:
        table = embeddings[id(head.embedding)]
        linear = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
        linear.weight = table.weight  # tied again
        set_module(model, name, linear)
    return model


