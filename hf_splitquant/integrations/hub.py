"""Model cards and Hub uploads for packed checkpoints.

* :func:`build_model_card` describes a packed model (or a packed checkpoint folder) as a
  :class:`huggingface_hub.ModelCard`: metadata ``base_model``, ``base_model_relation: quantized``,
  ``library_name: transformers`` and tags (``splitquant``, the methods, ``int2`` ...), then a body
  with the quantization table, the per-layer bits, evaluation results when given, and how to load it.
* :func:`save_with_card` writes the checkpoint and its ``README.md`` in one atomic save.
* :func:`push_to_hub` saves (with the card) into a temporary folder and uploads it with
  ``HfApi.create_repo`` + ``HfApi.upload_folder``; :func:`upload_checkpoint` uploads a folder
  already written (a card is generated for it when it has none).

Why not ``model.push_to_hub``: transformers 5.23's ``PushToHubMixin.push_to_hub`` saves into a
temporary folder and then always overwrites ``README.md`` with the card already on the Hub (or, for
a new repo, transformers' generic template), adding only ``model.model_tags``. A quantizer has no
hook there, so ``model.push_to_hub`` carries our tags (see :func:`tag_model`, applied by
:func:`push_to_hub` and :func:`save_with_card`) but not our card body, except on a repo that
already holds our card (transformers then downloads and keeps it). Use :func:`push_to_hub` here.

``Trainer(push_to_hub=True)``: ``Trainer.push_to_hub`` rewrites ``output_dir/README.md`` with its
training summary (keeping only the old card's tags) and uploads the folder, so our card body does
not survive it either; ``model.model_tags`` do. A packed model is not trainable
(``is_qat_trainable`` is False), so after QAT and packing, push with :func:`push_to_hub`.

The card template is ``model_cards/splitquant_model_card.md`` in the repository; the package
ships an identical copy (``hf_splitquant/templates/model_card.md``, package data, read through
:mod:`importlib.resources`), and a test checks that both are the same.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers.utils import logging

from ..report import QuantizationReport, quantization_report, report_from_specs
from ..saving import atomic_directory_write

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_COMMIT_MESSAGE",
    "build_model_card",
    "model_card_tags",
    "push_to_hub",
    "save_with_card",
    "tag_model",
    "template_path",
    "upload_checkpoint",
]

DEFAULT_COMMIT_MESSAGE = "Upload packed low-bit model (hf_splitquant)"
_CARD_FILE = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_METHOD_TITLES = {
    "rtn": "round-to-nearest (RTN) on affine grids",
    "splitquant": "SplitQuant, Song & Lin, arXiv 2501.12428: a 3-cluster k-means split, one grid per cluster",
    "ocs": "OCS: outlier channel splitting",
    "mixquant": "MixQuant per-layer bit widths",
}
_AUTO_CLASSES = (
    ("ForCausalLM", "AutoModelForCausalLM", "text-generation"),
    ("LMHeadModel", "AutoModelForCausalLM", "text-generation"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "AutoModelForTokenClassification", "token-classification"),
    ("ForMaskedLM", "AutoModelForMaskedLM", "fill-mask"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering", "question-answering"),
)
_TASK_TITLES = {
    "perplexity": "Perplexity",
    "embedding-fidelity": "Embedding fidelity to the float model",
    "fidelity": "Fidelity to the float model",
    "classification": "Classification accuracy",
}


def template_path() -> Path:
    """Path of the Jinja model-card template shipped with the package."""
    return Path(str(importlib.resources.files("hf_splitquant") / "templates" / "model_card.md"))


# --------------------------------------------------------------------------------------------
# What the card says
# --------------------------------------------------------------------------------------------


def _report_of(model: nn.Module | str | os.PathLike) -> tuple[QuantizationReport, dict[str, Any], Path | None]:
    """The report, the raw ``config.json`` (as a dict) and the checkpoint folder (if given one)."""
    if isinstance(model, nn.Module):
        report = quantization_report(model)
        config = getattr(model, "config", None)
        raw = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
        return report, raw, None
    folder = Path(model)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found; pass a packed model or a folder written by save_pretrained")
    raw = json.loads(config_file.read_text())
    qconfig = raw.get("quantization_config") or {}
    if qconfig.get("quant_method") != "splitquant":
        raise ValueError(f"{folder} is not an hf_splitquant checkpoint (no splitquant quantization_config)")
    from ..config import SplitQuantConfig

    return report_from_specs(SplitQuantConfig.from_dict(qconfig).layer_specs()), raw, folder


def _qconfig_dict(raw: Mapping[str, Any]) -> dict[str, Any]:
    qconfig = raw.get("quantization_config") or {}
    return qconfig.to_dict() if hasattr(qconfig, "to_dict") else dict(qconfig)


def model_card_tags(model: nn.Module | str | os.PathLike | QuantizationReport) -> list[str]:
    """Hub tags of a packed model: ``splitquant``, ``hf-splitquant``, each method, ``int<bits>`` per width.

    Args:
        model: a packed model, a packed checkpoint folder, or a :class:`QuantizationReport`.
    """
    if isinstance(model, QuantizationReport):
        report, qconfig = model, {}
    else:
        report, raw, _ = _report_of(model)
        qconfig = _qconfig_dict(raw)
    tags = ["splitquant", "hf-splitquant", "quantized"]
    tags += sorted({layer.transform for layer in report.layers})
    if qconfig.get("bit_allocation"):
        tags.append(str(qconfig["bit_allocation"]))
    tags += [f"int{bits}" for bits in sorted({layer.bits for layer in report.layers})]
    return list(dict.fromkeys(tags))


def tag_model(model: nn.Module) -> list[str]:
    """Add :func:`model_card_tags` to ``model.model_tags`` so transformers' own ``push_to_hub`` carries them."""
    tags = model_card_tags(model)
    if hasattr(model, "add_model_tags"):
        model.add_model_tags(tags)
    return tags


def _default_base_model(model: nn.Module | str | os.PathLike, raw: Mapping[str, Any]) -> str | None:
    """The source repo id the model was loaded from, when it looks like one (never a local path)."""
    name = getattr(model, "name_or_path", None) if isinstance(model, nn.Module) else None
    name = name or raw.get("_name_or_path") or ""
    if name and _REPO_ID.match(name) and not Path(name).exists():
        return name
    return None


def _auto_class(architecture: str | None) -> tuple[str, str | None]:
    """(transformers auto class to load with, pipeline tag) for an architecture name."""
    for suffix, auto, pipeline in _AUTO_CLASSES:
        if architecture and architecture.endswith(suffix):
            return auto, pipeline
    return "AutoModel", "feature-extraction" if architecture else None


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def _layer_groups(report: QuantizationReport) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int, Any], dict[str, Any]] = {}
    for layer in report.layers:
        key = (layer.transform, layer.bits, layer.group_size)
        group = groups.setdefault(key, {
            "method": layer.transform, "bits": layer.bits,
            "group_size": "per channel" if layer.group_size is None else layer.group_size,
            "layers": 0, "weights": 0, "bytes": 0,
        })
        group["layers"] += 1
        group["weights"] += layer.num_weights
        group["bytes"] += layer.packed_bytes
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2])):
        group = groups[key]
        group["bits_per_weight"] = 8 * group.pop("bytes") / group["weights"]
        rows.append(group)
    return rows


def _eval_sections(eval_results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Normalise evaluation results into card sections.

    Accepts one result or a list of results. A result is either the dict written by
    :mod:`hf_splitquant.evaluation` (``task``, ``dataset``, ``metrics``, optional
    ``reference_metrics``) or a flat ``{metric: value}`` mapping.
    """
    if not eval_results:
        return []
    results = [eval_results] if isinstance(eval_results, Mapping) else list(eval_results)
    sections = []
    for result in results:
        if not isinstance(result, Mapping):
            raise TypeError(f"eval_results must be a mapping or a list of mappings, got {type(result).__name__}")
        metrics = result.get("metrics")
        if not isinstance(metrics, Mapping):
            metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        reference = result.get("reference_metrics") or {}
        task = str(result.get("task", "evaluation"))
        rows = [
            {"name": name, "value": _fmt_value(value),
             "reference": _fmt_value(reference[name]) if name in reference else "-"}
            for name, value in metrics.items()
        ]
        sections.append({
            "title": _TASK_TITLES.get(task, task.replace("-", " ").capitalize()),
            "dataset": result.get("dataset"),
            "has_reference": bool(reference),
            "rows": rows,
        })
    return sections


def _method_title(report: QuantizationReport, qconfig: Mapping[str, Any]) -> str:
    methods = sorted({layer.transform for layer in report.layers})
    titles = [_METHOD_TITLES.get(m, m) for m in methods]
    if qconfig.get("bit_allocation"):
        titles.append(_METHOD_TITLES.get(str(qconfig["bit_allocation"]), str(qconfig["bit_allocation"])))
    return "; ".join(titles) if titles else "no quantized layers"


def build_model_card(
    model: nn.Module | str | os.PathLike,
    base_model: str | None = None,
    eval_results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    notes: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    license: str | None = None,
):  # -> huggingface_hub.ModelCard
    """Build the model card of a packed model.

    Args:
        model: a packed model in memory, or the folder of a packed checkpoint (``config.json`` is
            read, no weights are loaded).
        base_model: Hub id of the float model it was quantized from (card metadata ``base_model``,
            with ``base_model_relation: quantized``). ``None``: the model's ``name_or_path`` when it
            is a Hub id (a local path is never written); otherwise the field is left out.
        eval_results: evaluation results (see :mod:`hf_splitquant.evaluation`), one dict or a list.
        repo_id: the Hub repo the card goes to (used in the loading snippet and the title).
        model_name: title of the card; defaults to the repo name or a name made from the config.
        notes: free Markdown added under "Notes".
        checkpoint_dir: a folder holding the saved safetensors, to report their size on disk
            (defaults to ``model`` when it is a folder).
        license: optional license identifier for the metadata.

    Returns:
        A :class:`huggingface_hub.ModelCard`; ``card.data`` holds the metadata.

    Raises:
        ValueError: the model has no packed layers (it is not quantized by hf_splitquant).
    """
    import huggingface_hub
    from huggingface_hub import ModelCard, ModelCardData

    from ..version import __version__

    report, raw, folder = _report_of(model)
    if not report.layers:
        raise ValueError("the model has no hf_splitquant packed layers; quantize it before building its card")
    qconfig = _qconfig_dict(raw)
    base_model = base_model or _default_base_model(model, raw)
    architectures = raw.get("architectures") or []
    architecture = architectures[0] if architectures else (type(model).__name__ if isinstance(model, nn.Module) else None)
    auto_class, pipeline_tag = _auto_class(architecture)
    bits = sorted({layer.bits for layer in report.layers})
    methods = sorted({layer.transform for layer in report.layers})
    if model_name is None:
        if repo_id:
            model_name = repo_id.split("/")[-1]
        else:
            stem = base_model.split("/")[-1] if base_model else (architecture or "model")
            model_name = f"{stem}-{'-'.join(methods)}-" + "-".join(f"int{b}" for b in bits)

    roles = ", ".join(f"{role} {8 * n / report.num_weights:.3f}" for role, n in report.bytes_by_role().items())
    group_sizes = sorted({layer.group_size for layer in report.layers}, key=lambda g: -1 if g is None else g)
    rows: list[tuple[str, str]] = [
        ("method", ", ".join(methods) + (f" + {qconfig['bit_allocation']}" if qconfig.get("bit_allocation") else "")),
        ("code width", ", ".join(f"{b}-bit" for b in bits)),
        ("group size", ", ".join("per channel" if g is None else str(g) for g in group_sizes)),
        ("bits per weight (overheads included)", f"{report.bits_per_weight:.3f} ({roles})"),
        ("quantized layers", f"{len(report.layers)} layers, {report.num_weights:,} weights"),
    ]
    stored = report.bytes_by_role()
    grids = []
    if "zero_points" in stored:
        grids.append("asymmetric with integer zero points: w = (code - zero) * scale")
    if "minimums" in stored:
        grids.append("per-cluster min-max: w = code * scale + min")
    if not grids:
        grids.append("symmetric: w = (code - 2^(bits-1)) * scale")
    rows.append(("grid", "; ".join(grids)))
    if qconfig.get("scale_dtype"):
        rows.append(("scale dtype", str(qconfig["scale_dtype"])))
    skipped = qconfig.get("modules_to_not_convert")
    rows.append(("kept in float", ", ".join(skipped) if skipped else
                 "embeddings, norms, tied weights and the output head (default)"))
    if report.model_bytes and report.float_model_bytes:
        rows.append((
            "model size in memory",
            f"{_fmt_bytes(report.model_bytes)} vs {_fmt_bytes(report.float_model_bytes)} with {report.float_dtype} "
            f"weights ({report.model_bytes / report.float_model_bytes:.3f}x)",
        ))
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else folder
    if ckpt is not None:
        disk = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        if disk:
            dtype = str(raw.get("dtype") or raw.get("torch_dtype") or "float32")
            elem = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4)
            float_disk = disk - report.packed_bytes + elem * report.num_weights
            rows.append((
                "safetensors on disk",
                f"{_fmt_bytes(disk)} vs about {_fmt_bytes(float_disk)} for the same checkpoint with {dtype} weights "
                f"({disk / float_disk:.3f}x)",
            ))
    if qconfig.get("format_version") is not None:
        rows.append(("packed format version", str(qconfig["format_version"])))

    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        library_name="transformers",
        tags=model_card_tags(model),
        pipeline_tag=pipeline_tag,
        license=license,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        model_name=model_name,
        base_model=base_model,
        method_title=_method_title(report, qconfig),
        bits_per_weight=report.bits_per_weight,
        quantization_rows=rows,
        layer_groups=_layer_groups(report),
        eval_sections=_eval_sections(eval_results),
        auto_class=auto_class,
        repo_id=repo_id or (str(folder) if folder is not None else "path/to/this/checkpoint"),
        has_tokenizer=ckpt is not None and any((ckpt / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")),
        notes=notes,
        library_version=f"{__version__} (huggingface_hub {huggingface_hub.__version__})",
    )
    logger.info(f"Built model card for {model_name}: tags {card.data.tags}")
    return card


# --------------------------------------------------------------------------------------------
# Saving and uploading
# --------------------------------------------------------------------------------------------


def _write_checkpoint(model: nn.Module, folder: Path, tokenizer: Any, card_kwargs: dict[str, Any]) -> None:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    card = build_model_card(model, checkpoint_dir=folder, **card_kwargs)
    card.save(folder / _CARD_FILE)


def save_with_card(
    model: nn.Module,
    folder: str | os.PathLike,
    tokenizer: Any = None,
    base_model: str | None = None,
    eval_results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    overwrite: bool = False,
    **card_kwargs: Any,
) -> Path:
    """Save a packed model, its tokenizer and its ``README.md`` model card in one atomic write.

    The folder appears complete or not at all (see :func:`hf_splitquant.saving.atomic_directory_write`).
    ``card_kwargs`` go to :func:`build_model_card` (``repo_id``, ``model_name``, ``notes`` ...).
    The model's tags are also added to ``model.model_tags`` (:func:`tag_model`).

    Raises:
        FileExistsError: ``folder`` exists, is not empty and ``overwrite`` is False.
        ValueError: the model is not quantized by hf_splitquant.
    """
    if not quantization_report(model).layers:
        raise ValueError("the model has no hf_splitquant packed layers; quantize it before saving it with a card")
    tag_model(model)
    kwargs = {"base_model": base_model, "eval_results": eval_results, **card_kwargs}
    path = atomic_directory_write(folder, lambda tmp: _write_checkpoint(model, tmp, tokenizer, kwargs), overwrite)
    logger.info(f"Saved packed model with its model card to {path}")
    return path


def upload_checkpoint(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    revision: str | None = None,
    endpoint: str | None = None,
    base_model: str | None = None,
):  # -> huggingface_hub.CommitInfo
    """Create ``repo_id`` (if needed) and upload a packed checkpoint folder to it.

    A folder without ``README.md`` gets a generated card first (from its ``config.json``). The
    token and endpoint default to huggingface_hub's (``HF_TOKEN``, ``HF_ENDPOINT``, ``hf auth login``).

    Returns:
        The :class:`huggingface_hub.CommitInfo` of the upload.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'} not found; pass a folder written by save_pretrained")
    if not (folder / _CARD_FILE).is_file():
        card = build_model_card(folder, base_model=base_model, repo_id=repo_id)
        card.save(folder / _CARD_FILE)
    api = HfApi(endpoint=endpoint, token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=url.repo_id, folder_path=folder, commit_message=commit_message, revision=revision
    )
    logger.info(f"Uploaded {folder} to {url.repo_id}: {info.commit_url}")
    return info


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    tokenizer: Any = None,
    base_model: str | None = None,
    eval_results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    *,
    revision: str | None = None,
    endpoint: str | None = None,
    **card_kwargs: Any,
):  # -> huggingface_hub.CommitInfo
    """Push a packed model to the Hub with its generated model card.

    Saves the model, its tokenizer and ``README.md`` (:func:`build_model_card`) into a temporary
    folder, then ``HfApi.create_repo(exist_ok=True)`` and ``HfApi.upload_folder``.

    Args:
        model: a model quantized by hf_splitquant.
        repo_id: ``"user/name"`` of the model repo (created if missing).
        tokenizer: optional tokenizer (or processor) to upload with it.
        base_model, eval_results, **card_kwargs: see :func:`build_model_card`.
        private: create the repo private (ignored when it already exists).
        token, endpoint: override huggingface_hub's token and endpoint.
        commit_message, revision: of the upload commit.

    Returns:
        The :class:`huggingface_hub.CommitInfo` of the upload.
    """
    with tempfile.TemporaryDirectory(prefix="hf_splitquant-push-") as tmp:
        folder = save_with_card(
            model, Path(tmp) / "checkpoint", tokenizer, base_model=base_model, eval_results=eval_results,
            repo_id=repo_id, **card_kwargs,
        )
        return upload_checkpoint(
            folder, repo_id, private=private, token=token, commit_message=commit_message,
            revision=revision, endpoint=endpoint,
        )
