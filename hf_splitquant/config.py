"""``SplitQuantConfig``: the quantization config that ``from_pretrained`` and ``save_pretrained`` carry.

Only JSON values are stored. Every field is validated on construction (and so when a checkpoint's
``config.json`` is read): a bad value raises ``ValueError`` naming the field and what is allowed.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .methods import format_names, get_format, tensor_shapes
from .methods.attention_round import AttentionRoundOptions
from .methods.block_tuning import BlockTuningOptions
from .methods.gptq import GPTQOptions
from .patterns import compile_module_patterns
from .quant.rotation import is_block
from .spec import LayerSpec

__all__ = ["SplitQuantConfig", "FORMAT_VERSION", "QUANT_METHOD", "written_format_version"]

QUANT_METHOD = "splitquant"
#: Newest version of the packed storage format this library reads (and writes where a checkpoint needs it:
#: see :func:`written_format_version`).
FORMAT_VERSION = 5
ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8)
#: ``None`` and ``"rtn"`` both mean plain round-to-nearest
ALLOWED_TRANSFORMS = (None, *format_names())
ALLOWED_BIT_ALLOCATIONS = (None, "mixquant", "coding_length", "coding_length_inputs", "sensitivity")
#: rounding method -> the class validating its ``rounding_options``
ROUNDING_OPTIONS: dict[str, Any] = {"attention_round": AttentionRoundOptions, "gptq": GPTQOptions}
ALLOWED_ROUNDINGS = (None, *ROUNDING_OPTIONS)
ALLOWED_ERRORS = ("mse", "mae")


def written_format_version(layers: dict[str, dict[str, Any]] | None) -> int:
    """The version a checkpoint with this per-layer map is written with: the oldest that describes it
    (5 for layers with ``input_rotation``, 4 for SplitQuant layers with ``splitquant_range="aligned"``, 3 for
    packed embeddings, else 2), so
    checkpoints without the newer features stay readable by older hf_splitquant releases (and older ones
    refuse newer checkpoints with "upgrade hf_splitquant" instead of a puzzling field error)."""
    if not isinstance(layers, dict):  # None, or a malformed map that validation refuses with a clear message
        return 2
    specs = [spec for spec in layers.values() if isinstance(spec, dict)]
    if any(spec.get("input_rotation") is not None for spec in specs):
        return 5
    if any(spec.get("transform") == "splitquant" and spec.get("splitquant_range") == "aligned" for spec in specs):
        return 4
    if any(spec.get("source") == "Embedding" for spec in specs):
        return 3
    return 2


#: config fields that are copied into the layer specs of the formats that read them
_FORMAT_FIELDS = ("splitquant_range", "ocs_expand_ratio", "ocs_split", "ocs_layout")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_copy(value: Any) -> Any:
    """Copy of a JSON value (dicts and lists rebuilt, scalars shared): several times cheaper than
    ``copy.deepcopy`` on a large per-layer map, which transformers copies several times per load."""
    if isinstance(value, dict):
        return {k: _json_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_copy(v) for v in value]
    return value


class SplitQuantConfig(QuantizationConfigMixin):
    """Configuration of ``hf_splitquant`` weight quantization.

    Pass it to ``from_pretrained(..., quantization_config=SplitQuantConfig(...))`` to quantize while
    loading, or to :func:`hf_splitquant.quantize` for a model already in memory. A packed checkpoint
    stores it in ``config.json`` and is reloaded with plain ``from_pretrained`` after
    ``import hf_splitquant``.

    Args:
        bits: code width of the weights, 2..8.
        group_size: inputs sharing one scale (and zero point); ``None`` for one per output channel.
            Smaller groups are more accurate and cost more bits (16 + 8 bits per group). A layer with
            at most ``group_size`` inputs gets one group per output channel, recorded as ``None`` in
            its layer spec (and so in reports and cards).
        symmetric: symmetric grid (no zero points) instead of the default asymmetric min-max grid
            with integer zero points (0.0 exactly representable).
        transform: ``None`` for plain round-to-nearest, ``"splitquant"`` for SplitQuant (3-cluster
            k-means split, one grid per cluster).
        splitquant_range: with ``transform="splitquant"``: ``"cluster"`` fits each cluster's grid
            to its own weights (default, the most accurate; float origins, 6 int4-kernel terms per layer),
            ``"aligned"`` fits it too but with its origin a whole number of steps from 0 (int8 zero
            points: 0.375 fewer bits per weight at group 64, 3 kernel terms, so faster decoding; 2-3 bits;
            a somewhat larger rounding error), ``"part"`` reproduces the paper's numerics (each dense part's
            grid also spans the zeros around it; 3 kernel terms up to 3 bits).
        ocs_expand_ratio: with ``transform="ocs"``: fraction of input channels duplicated per layer
            (``ceil(r * in_features)``), 0..1. Default 0.05, the best of the paper's range 0.01-0.05 in
            ``benchmarks/bench_ocs_mixquant.py`` (quality rose with r on MiniLM and SmolLM2 at 3 and 4
            bits per channel, for about 5% more bits per weight).
        ocs_split: with ``transform="ocs"``: ``"qa"`` quantization-aware halves (default), ``"naive"``
            plain halves, or ``"auto"`` (per layer, the split with the smaller weight error). QA assumes
            both halves are rounded on one grid, which holds per channel, and with groups since
            ``ocs_layout="source_group"`` (with the old ``"appended"`` layout the copy landed in another
            group: SmolLM2 int3 g64 measured naive 75, QA 124, auto 121 perplexity).
        ocs_layout: with ``transform="ocs"``: ``"source_group"`` (default; packed format version 2): each
            duplicated column is rounded on its source group's grid, whose range covers it;
            ``"appended"``: the format version 1 layout (copies in the last groups), kept for reading.
        clip: ``None`` or ``"mse"``: search each group's clipping range for the least squared error
            (RTN and OCS grids; as the OCS paper's "OCS + clipping").
        input_rotation: ``None`` (default) or a power of two ``b`` (64 recommended): every quantized Linear
            whose input width ``b`` divides stores its weight in a Hadamard-rotated basis, ``W R`` with
            ``R = diag(H_b, ...)``, and rotates its input by ``R`` in the forward pass (float-equivalent; no
            extra bits per weight; format version 5; ``hf_splitquant/quant/rotation.py``). It pays with
            calibrated rounding: SmolLM2-135M, ``rounding="gptq"``, INT4 g128 26.40 -> 24.80 and INT3 g128
            44.98 -> 36.76 perplexity (float 22.17; ``benchmarks/results/rotation.md``); plain round-to-nearest
            gets worse rotated. RTN
            format only (``transform=None``).
        bit_allocation: ``None`` (every layer at ``bits``) or ``"mixquant"``: per-layer bit widths from
            the round-off error of the same quantizer, data-free. Needs the float weights of every
            layer, so ``from_pretrained`` loads them in float first and quantizes after loading.
            ``"coding_length"``: widths from each layer's lossy coding length (needs ``target_bits``).
            ``"coding_length_inputs"``: the same on each weight scaled by its input channels' RMS over the
            calibration tokens, at unit RMS (``hf_splitquant/methods/coding_length.py``); needs ``target_bits``,
            ``rounding`` and calibration data.
            ``"sensitivity"``: MixQuant's budget search on a calibrated sensitivity, each layer's round-off
            error weighted by the loss's empirical Fisher diagonal (``hf_splitquant/calibration/sensitivity.py``);
            needs ``target_bits``, ``rounding`` and calibration data (``hf_splitquant.quantize(model, config,
            calibration_data=...)``), and a model that computes a loss from ``labels`` (a causal LM).
        target_bits: with ``bit_allocation``: average bits per weight over the quantized layers,
            overheads included; bit widths are chosen for the least total relative error within it.
            ``None``: MixQuant's own rule with ``mixquant_qem``.
        mixquant_candidates: bit widths to choose from (default 2, 3, 4, 5, 6, 8).
        mixquant_reference_bits: MixQuant's reference width (default 8).
        mixquant_qem: MixQuant's quantization error multiplier: each layer gets the smallest
            candidate whose error is at most ``qem`` times its error at the reference width.
        mixquant_error: round-off error metric, ``"mse"`` or ``"mae"``.
        coding_length_eps: with ``bit_allocation="coding_length"``: the distortion ``eps`` of the lossy
            coding length ``L(W) = (m+n)/2 log2 det(I + m/(n eps^2) W W^T)``; needs ``target_bits``.
        rounding: ``None`` (round to nearest), ``"gptq"`` (GPTQ error feedback on the output-aware clipped
            grid, damped) or ``"attention_round"`` (Attention Round): codes chosen on calibration data;
            needs :func:`hf_splitquant.calibrate` (or ``quantize`` with ``calibration_data``).
        rounding_options: hyper-parameters of the rounding method (:class:`~hf_splitquant.methods.gptq.GPTQOptions`,
            :class:`~hf_splitquant.methods.attention_round.AttentionRoundOptions`); ``None`` for its defaults.
        activation_scaling: with ``rounding`` (RTN format): before each stage of a decoder block is rounded,
            scale the input channels of the layers a normalisation layer feeds (q/k/v, gate/up) by a searched
            power of their RMS and fold the inverse into the norm's weight (AWQ-style; float-equivalent, the
            format unchanged; ``hf_splitquant/methods/activation_scaling.py``).
        block_tuning: ``None`` (default) or a dict of :class:`~hf_splitquant.methods.block_tuning.BlockTuningOptions`
            (``{}`` for the defaults): after the rounding, train each decoder block's learned scales and
            weights against the float model's block output (``hf_splitquant/methods/block_tuning.py``). Needs
            ``rounding`` and the RTN format (``transform=None``); costs a forward and backward pass of one block
            per calibration batch and epoch.
        qat: quantization-aware training: ``from_pretrained`` returns fake-quant layers (float
            weights, straight-through estimator) that the stock ``Trainer`` trains;
            ``hf_splitquant.freeze(model)`` packs them.
        qat_learn_scales: with ``qat``: learn the grid scales too (LSQ-style) instead of following
            the weights' ranges.
        scale_dtype: storage dtype of scales, ``"float16"`` (default) or ``"float32"``.
        modules_to_not_convert: modules kept in float. Each entry is a module path, a run of path
            components matched anywhere (``"intermediate"``, ``"layer.1"`` but not ``layer.11``), a
            suffix, or a regex. ``None`` keeps the default: the output head (the module owning the
            model's last parameter, e.g. ``classifier`` or ``lm_head``). An explicit list replaces
            that default. Tied weights, embeddings and norms are not quantized (see ``embedding_bits``).
        embedding_bits: ``None`` (default) keeps the input embedding and the output head in float; 2..8
            packs them, round to nearest at this width with the config's ``group_size``, ``symmetric``,
            ``scale_dtype`` and ``clip``: the input embedding becomes a ``PackedEmbedding`` (a lookup
            dequantizes only its rows) and an output head tied to it computes on the same packed table (one
            tensor, the int4 kernel path); an untied head becomes a packed linear layer. Checkpoints with a
            packed embedding use format version 3. Not with ``qat`` or ``rounding``.
        seed: seed of the k-means initialisation (results are deterministic for a seed).
        layers: written by the library: the per-layer spec of every quantized module, keyed by
            module path relative to the base model. Do not set it by hand.
        format_version: version of the packed format, written by the library.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int | None = 64,
        symmetric: bool = False,
        transform: str | None = None,
        splitquant_range: str = "cluster",
        ocs_expand_ratio: float = 0.05,
        ocs_split: str = "qa",
        ocs_layout: str = "source_group",
        clip: str | None = None,
        input_rotation: int | None = None,
        bit_allocation: str | None = None,
        target_bits: float | None = None,
        mixquant_candidates: list[int] | None = None,
        mixquant_reference_bits: int = 8,
        mixquant_qem: float = 300.0,
        mixquant_error: str = "mse",
        coding_length_eps: float = 0.5,
        rounding: str | None = None,
        rounding_options: dict[str, Any] | None = None,
        block_tuning: dict[str, Any] | None = None,
        activation_scaling: bool = False,
        qat: bool = False,
        qat_learn_scales: bool = False,
        scale_dtype: str = "float16",
        modules_to_not_convert: list[str] | None = None,
        embedding_bits: int | None = None,
        seed: int = 0,
        layers: dict[str, dict[str, Any]] | None = None,
        format_version: int | None = None,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise ValueError(
                f"SplitQuantConfig got unknown fields {sorted(kwargs)}; known fields are "
                f"{sorted(self._field_names())}. A newer hf_splitquant may have written them: upgrade it."
            )
        self.quant_method = quant_method
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.transform = transform
        self.splitquant_range = splitquant_range
        self.ocs_expand_ratio = ocs_expand_ratio
        self.ocs_split = ocs_split
        self.ocs_layout = ocs_layout
        self.clip = clip
        self.input_rotation = input_rotation
        self.bit_allocation = bit_allocation
        self.target_bits = target_bits
        self.mixquant_candidates = mixquant_candidates if mixquant_candidates is not None else [2, 3, 4, 5, 6, 8]
        self.mixquant_reference_bits = mixquant_reference_bits
        self.mixquant_qem = mixquant_qem
        self.mixquant_error = mixquant_error
        self.coding_length_eps = coding_length_eps
        self.rounding = rounding
        self.rounding_options = rounding_options
        self.block_tuning = block_tuning
        self.activation_scaling = activation_scaling
        self.qat = qat
        self.qat_learn_scales = qat_learn_scales
        self.scale_dtype = scale_dtype
        self.modules_to_not_convert = modules_to_not_convert
        self.embedding_bits = embedding_bits
        self.seed = seed
        self.layers = layers
        self.format_version = format_version if format_version is not None else written_format_version(layers)
        self.post_init()

    @staticmethod
    def _field_names() -> tuple[str, ...]:
        return ("bits", "group_size", "symmetric", "transform", "splitquant_range", "ocs_expand_ratio", "ocs_split",
                "ocs_layout", "clip", "input_rotation", "bit_allocation", "target_bits", "mixquant_candidates", "mixquant_reference_bits",
                "mixquant_qem", "mixquant_error", "coding_length_eps", "rounding", "rounding_options", "block_tuning", "activation_scaling", "qat",
                "qat_learn_scales", "scale_dtype",
                "modules_to_not_convert", "embedding_bits", "seed", "layers", "format_version", "quant_method")

    def post_init(self) -> None:
        """Validate every field; raises ``ValueError`` naming the field and the allowed values."""
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"`quant_method` must be {QUANT_METHOD!r}, got {self.quant_method!r}")
        if not _is_int(self.format_version) or self.format_version < 1:
            raise ValueError(f"`format_version` must be a positive integer, got {self.format_version!r}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses packed format version {self.format_version}, but the installed "
                f"hf_splitquant reads versions up to {FORMAT_VERSION}: upgrade hf_splitquant "
                "(`pip install -U hf-splitquant`)"
            )
        if self.transform not in ALLOWED_TRANSFORMS:
            raise ValueError(f"`transform` must be one of {ALLOWED_TRANSFORMS}, got {self.transform!r}")
        self._check_layer_fields()
        if self.input_rotation is not None:
            block = self.input_rotation
            if not is_block(block):
                raise ValueError(f"`input_rotation` must be None or a power of two >= 2 (e.g. 64), got {block!r}")
            if self.transform_name != "rtn":
                raise ValueError(f"`input_rotation` needs the RTN format (transform=None), got transform={self.transform!r}")
        if self.bit_allocation not in ALLOWED_BIT_ALLOCATIONS:
            raise ValueError(f"`bit_allocation` must be one of {ALLOWED_BIT_ALLOCATIONS}, got {self.bit_allocation!r}")
        if self.target_bits is not None:
            if isinstance(self.target_bits, bool) or not isinstance(self.target_bits, (int, float)) or not (
                1.0 < self.target_bits <= 32.0
            ):
                raise ValueError(f"`target_bits` must be a number of bits per weight in (1, 32], got {self.target_bits!r}")
            if self.bit_allocation is None:
                raise ValueError("`target_bits` needs `bit_allocation` (e.g. 'mixquant'); set both or neither")
        candidates = self.mixquant_candidates
        if not isinstance(candidates, (list, tuple)) or not candidates or not all(_is_int(b) and b in ALLOWED_BITS for b in candidates) or len(set(candidates)) != len(
            candidates
        ):
            raise ValueError(f"`mixquant_candidates` must be distinct bit widths from {ALLOWED_BITS}, got {candidates!r}")
        self.mixquant_candidates = sorted(candidates)
        if not _is_int(self.mixquant_reference_bits) or self.mixquant_reference_bits not in ALLOWED_BITS:
            raise ValueError(f"`mixquant_reference_bits` must be one of {ALLOWED_BITS}, got {self.mixquant_reference_bits!r}")
        qem = self.mixquant_qem
        if isinstance(qem, bool) or not isinstance(qem, (int, float)) or not qem >= 1.0:
            raise ValueError(f"`mixquant_qem` must be a number >= 1, got {qem!r}")
        if self.mixquant_error not in ALLOWED_ERRORS:
            raise ValueError(f"`mixquant_error` must be one of {ALLOWED_ERRORS}, got {self.mixquant_error!r}")
        eps = self.coding_length_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"`coding_length_eps` must be a positive number, got {eps!r}")
        if self.bit_allocation in ("coding_length", "coding_length_inputs", "sensitivity") and self.target_bits is None:
            raise ValueError(f"`bit_allocation={self.bit_allocation!r}` needs `target_bits` (average bits per weight)")
        if self.rounding not in ALLOWED_ROUNDINGS:
            raise ValueError(f"`rounding` must be one of {ALLOWED_ROUNDINGS}, got {self.rounding!r}")
        if self.bit_allocation in ("sensitivity", "coding_length_inputs") and self.rounding is None:
            raise ValueError(f"`bit_allocation={self.bit_allocation!r}` measures each layer on calibration data: set "
                             "`rounding` (e.g. 'gptq') and pass `calibration_data` to hf_splitquant.quantize; "
                             "for a data-free allocation use bit_allocation='mixquant'")
        if self.rounding_options is not None:
            if not isinstance(self.rounding_options, dict):
                raise ValueError(f"`rounding_options` must be a dict or None, got {type(self.rounding_options).__name__}")
            if self.rounding is None and self.rounding_options:
                raise ValueError("`rounding_options` are given but `rounding` is None; set `rounding` "
                                 f"(one of {ALLOWED_ROUNDINGS[1:]}) or drop the options")
            if self.rounding is not None:
                ROUNDING_OPTIONS[self.rounding].from_dict(self.rounding_options)  # raises on unknown keys / bad values
        if self.block_tuning is not None:
            if not isinstance(self.block_tuning, dict):
                raise ValueError(f"`block_tuning` must be a dict of options or None, got {type(self.block_tuning).__name__}")
            if self.rounding is None:
                raise ValueError("`block_tuning` refines a calibrated rounding block by block: set `rounding` (e.g. "
                                 "'gptq') and pass calibration data, or drop `block_tuning`")
            if self.transform not in (None, "rtn"):
                raise ValueError(f"`block_tuning` trains the learned scales of the RTN format only; transform="
                                 f"{self.transform!r} is not supported (use transform=None or drop `block_tuning`)")
            BlockTuningOptions.from_dict(self.block_tuning)  # raises on unknown keys / bad values
        if not isinstance(self.activation_scaling, bool):
            raise ValueError(f"`activation_scaling` must be True or False, got {self.activation_scaling!r}")
        if self.activation_scaling:
            if self.rounding is None:
                raise ValueError("`activation_scaling` chooses input scales from calibration statistics: set `rounding` "
                                 "(e.g. 'gptq') and pass calibration data, or drop `activation_scaling`")
            if self.transform not in (None, "rtn"):
                raise ValueError(f"`activation_scaling` is for the RTN format; transform={self.transform!r} is not "
                                 "supported (use transform=None or drop `activation_scaling`)")
            if (self.rounding_options or {}).get("target") == "float":
                raise ValueError("`activation_scaling` cannot be combined with rounding_options target='float' (the "
                                 "float block's inputs are not scaled); drop one of them")
        if not isinstance(self.qat, bool):
            raise ValueError(f"`qat` must be True or False, got {self.qat!r}")
        if not isinstance(self.qat_learn_scales, bool):
            raise ValueError(f"`qat_learn_scales` must be True or False, got {self.qat_learn_scales!r}")
        if self.qat and self.rounding is not None:
            raise ValueError("`qat=True` trains the weights itself; it cannot be combined with `rounding`")
        if self.modules_to_not_convert is not None and (
            not isinstance(self.modules_to_not_convert, (list, tuple))
            or not all(isinstance(m, str) for m in self.modules_to_not_convert)
        ):
            raise ValueError(
                f"`modules_to_not_convert` must be None or a list of module names, got {self.modules_to_not_convert!r}"
            )
        if self.modules_to_not_convert is not None:
            self.modules_to_not_convert = list(self.modules_to_not_convert)
            compile_module_patterns(self.modules_to_not_convert)  # a bad regex fails here, naming the field
        if self.embedding_bits is not None:
            if not _is_int(self.embedding_bits) or self.embedding_bits not in ALLOWED_BITS:
                raise ValueError(f"`embedding_bits` must be None (embeddings and head in float) or one of {ALLOWED_BITS}, "
                                 f"got {self.embedding_bits!r}")
            if self.qat:
                raise ValueError("`embedding_bits` is not supported with `qat=True` (QAT trains the float embedding): "
                                 "set one of them")
            if self.rounding is not None:
                raise ValueError(f"`embedding_bits` is not supported with `rounding={self.rounding!r}` (calibrated "
                                 "codes cover linear layers only): quantize the embeddings with rounding=None")
        if not _is_int(self.seed):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}")
        if self.layers is not None:
            if not isinstance(self.layers, dict):
                raise ValueError(f"`layers` must be a mapping of module path -> layer spec, got {type(self.layers).__name__}")
            for name, spec in self.layers.items():
                if not isinstance(name, str) or not name:
                    raise ValueError(f"`layers` keys must be module paths, got {name!r}")
                try:
                    get_format(LayerSpec.from_dict(spec))
                except (TypeError, ValueError) as err:
                    raise ValueError(f"`layers[{name!r}]` is invalid: {err}") from None

    def _check_layer_fields(self) -> None:
        """The fields every layer spec copies are checked by :class:`LayerSpec` itself (one set of rules)."""
        try:
            LayerSpec(in_features=1, out_features=1, **(self._layer_fields(self.bits)
                                                        | {name: getattr(self, name) for name in _FORMAT_FIELDS}))
        except (TypeError, ValueError) as err:
            raise ValueError(str(err).replace("layer spec field ", "")) from None

    def _layer_fields(self, bits: int) -> dict[str, Any]:
        fields = {"bits": bits, "group_size": self.group_size, "symmetric": self.symmetric,
                  "transform": self.transform_name, "scale_dtype": self.scale_dtype, "clip": self.clip}
        # format-specific fields only where the format reads them (others keep the spec's defaults)
        return fields | {name: getattr(self, name) for name in get_format(self.transform_name).spec_fields}

    @property
    def transform_name(self) -> str:
        """The transform as used in layer specs (``"rtn"`` for plain round-to-nearest)."""
        return self.transform or "rtn"

    def layer_specs(self) -> dict[str, LayerSpec]:
        """The per-layer map as :class:`LayerSpec` objects (empty before quantization)."""
        return {name: LayerSpec.from_dict(spec) for name, spec in (self.layers or {}).items()}

    def spec_for(self, in_features: int, out_features: int, has_bias: bool, source: str = "Linear",
                 bits: int | None = None) -> LayerSpec:
        """The spec this config gives a layer of that shape (at ``bits``, default ``self.bits``).

        A ``group_size`` at least as wide as the layer's grouped columns (``group_size >= in_features``)
        stores one group per output channel: the spec then says so (``group_size=None``), so the
        per-layer map, reports and model cards give the grouping the layer really has.
        """
        rotation = self.input_rotation
        if rotation is not None and (source == "Embedding" or in_features % rotation):
            rotation = None  # (the layer keeps its plain basis: the rotation blocks must tile its inputs)
        spec = LayerSpec(in_features=in_features, out_features=out_features, source=source, has_bias=has_bias,
                         input_rotation=rotation, **self._layer_fields(self.bits if bits is None else bits))
        if spec.group_size is not None:
            per_channel = replace(spec, group_size=None)
            if tensor_shapes(spec) == tensor_shapes(per_channel):  # one group per row either way
                return per_channel
        return spec

    def embedding_spec(self, in_features: int, out_features: int, source: str = "Embedding",
                       has_bias: bool = False) -> LayerSpec:
        """The round-to-nearest spec of a packed input embedding (``source="Embedding"``, ``in_features`` =
        hidden size, ``out_features`` = vocabulary) or of an untied output head (``source="Linear"``) at
        ``embedding_bits``."""
        if self.embedding_bits is None:
            raise ValueError("`embedding_bits` is None: this config keeps the embeddings in float")
        spec = LayerSpec(in_features=in_features, out_features=out_features, bits=self.embedding_bits,
                         group_size=self.group_size, symmetric=self.symmetric, transform="rtn",
                         scale_dtype=self.scale_dtype, source=source, has_bias=has_bias, clip=self.clip)
        if spec.group_size is not None and tensor_shapes(spec) == tensor_shapes(replace(spec, group_size=None)):
            return replace(spec, group_size=None)
        return spec

    @classmethod
    def recipe(cls, name: str, **overrides: Any) -> SplitQuantConfig:
        """The named preset ``name`` (:mod:`hf_splitquant.recipes`: ``"w4"``, ``"w3"``, ``"w2"``, their ``-tuned``
        forms, ``"w3-mixed"``, ``"w3-mixed-tuned"``, ``"w4-data-free"``), with ``overrides`` replacing single settings.

        Example: ``SplitQuantConfig.recipe("w3")``; the calibrated recipes (``rounding`` set) need
        ``hf_splitquant.quantize(model, config, calibration_data=...)``.
        """
        from .recipes import recipe_settings

        settings = recipe_settings(name)
        unknown = set(overrides) - set(cls._field_names())
        if unknown:
            raise ValueError(f"unknown SplitQuantConfig setting(s) {sorted(unknown)} in the overrides of recipe {name!r}")
        settings.update(overrides)
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        return {name: _json_copy(getattr(self, name)) for name in self._field_names()}

    def __deepcopy__(self, memo: dict[int, Any]) -> SplitQuantConfig:
        new = copy.copy(self)  # every field is already validated JSON: no need to validate again
        new.__dict__ = _json_copy(self.__dict__)
        return new

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SplitQuantConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]
