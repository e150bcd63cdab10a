"""Fast batch-1 decoding: a static KV cache and a compiled decoding step in plain ``model.generate``.

At small model sizes a decoding step costs Python and dispatch time, not weight bytes: eager SmolLM2-135M
spends about half of each token in module code and ~5,000 small op calls around its 211 int4 kernel calls.
:func:`compile_for_decoding` removes that the way transformers intends: ``generate`` with
``cache_implementation="static"`` runs the prompt eagerly and every later step through ``torch.compile``
(inductor fuses the norms, rotary embeddings and cache updates into a few C++ kernels around the int4
kernel calls). transformers compiles automatically only on accelerators; the compile config set here
also allows it on CPU.

It changes the model's ``generation_config`` only (and builds the packed layers' int4 layouts up front,
so the compiled step never traces the one-time conversion); the saved format is untouched.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import CompileConfig
from transformers.utils import logging

from ..modeling import iter_packed_modules

__all__ = ["compile_for_decoding", "decoding_compile_config"]

logger = logging.get_logger(__name__)


def decoding_compile_config(fullgraph: bool = True, dynamic: bool | None = None, mode: str = "default",
                            options: dict[str, Any] | None = None) -> CompileConfig:
    """The ``CompileConfig`` :func:`compile_for_decoding` sets: ``fullgraph`` (a graph break is an error, not a
    silent slowdown), inductor's ``mode="default"`` (``"reduce-overhead"``, transformers' default, means CUDA
    graphs), and the flag that lets ``generate`` compile on CPU (transformers otherwise compiles only on
    accelerators). ``torch.compile`` takes inductor ``options`` *or* a ``mode``: with ``options``, ``mode`` must
    stay ``"default"`` (it is then dropped)."""
    if options is not None:
        if mode not in ("default", None):
            raise ValueError(f"torch.compile takes either `mode` or `options`, not both: got mode={mode!r} and "
                             f"options={options!r}; drop one (mode='default' with options is fine)")
        mode = None  # torch.compile refuses a mode beside options, even "default"
    config = CompileConfig(fullgraph=fullgraph, dynamic=dynamic, mode=mode, options=options)
    config._compile_all_devices = True  # transformers' switch for compiling on CPU (its generate checks it)
    return config


def compile_for_decoding(model: nn.Module, fullgraph: bool = True, dynamic: bool | None = None,
                         mode: str = "default", options: dict[str, Any] | None = None) -> nn.Module:
    """Make plain ``model.generate(...)`` decode with a static KV cache and a compiled step; returns ``model``.

    Works for packed models (quantize-on-load, reloaded, quantized in memory) and float models alike. The
    first ``generate`` compiles (tens of seconds to minutes on a small CPU); later calls reuse the compiled
    step as long as the batch size stays and the cache (prompt plus new tokens) does not outgrow the largest
    one seen (transformers keeps the static cache at that size). Compiled code computes in a different
    order than eager code (fused kernels), so logits can differ by float rounding; greedy tokens normally
    agree. Undo with ``model.generation_config.compile_config = None`` and
    ``model.generation_config.cache_implementation = None``, or pass ``disable_compile=True`` to one call.

    Args:
        model: a causal LM with ``generate`` (its layers must trace without graph breaks when ``fullgraph``).
        fullgraph, dynamic, mode, options: passed to ``torch.compile`` (see :func:`decoding_compile_config`).
    """
    if not hasattr(model, "generation_config") or not hasattr(model, "generate"):
        raise TypeError(f"compile_for_decoding needs a model with `generate` (a causal LM), got {type(model).__name__}")
    if getattr(model, "hf_quantizer", None) is not None and not model.hf_quantizer.is_compileable:
        raise ValueError(f"this model's quantizer ({type(model.hf_quantizer).__name__}) does not allow "
                         "torch.compile, so generate would ignore the compile config")
    packed = 0
    for _, module in iter_packed_modules(model):
        packed += bool(module.prepare_int4())
        if hasattr(module, "prepare_rotation"):
            module.prepare_rotation()
    config = model.generation_config
    config.cache_implementation = "static"
    config.compile_config = decoding_compile_config(fullgraph, dynamic, mode, options)
    # a compiled call that generate kept from an earlier config is dropped, so the new config takes effect
    for attr in ("_compiled_call", "_last_compile_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    logger.info("compile_for_decoding: static cache and compiled decoding step set; %d packed layers on the int4 "
                "kernel", packed)
    return model
