"""Fast batch-1 decoding: a static KV cache and a compiled decoding step in plain ``model.generate``.

At small model sizes a decoding step costs Python and dispatch time, not weight bytes: eager SmolLM2-135M
spends about half of each token in module code and ~5,000 small op calls around its 211 int4 kernel calls.
:func:`compile_for_decoding` removes that the way transformers intends: ``generate`` with
``cache_implementation="static"`` runs the prompt eagerly and every later step through ``torch.compile``
(inductor fuses the norms, rotary embeddings and cache updates into a few C++ kernels around the int4
kernel calls). transformers compiles automatically only on accelerators; the compile config set here
also allows it on CPU.

Three more things it does, each measured on SmolLM2-135M with 2 threads (``benchmarks/results/
decode_smollm2_llamacpp.md``, "Session 32": 14.0 -> 9.9 ms per step together): each block's q/k/v and gate/up
packed layers run as one stacked int4 call per group (:func:`stack_sibling_layers`: 211 -> 121 kernel calls per
SmolLM2 token, the same outputs bit for bit, no second copy of the weights); the one-token attention of the
compiled step runs as plain math that inductor fuses (:func:`single_query_attention`) instead of the CPU SDPA
kernel, whose fixed cost per call (about 60 us, 30 calls per token) was the largest item after the int4
kernels; and inductor's ``size_asserts`` are off (a check per graph input per step; dynamo's guards already
check the inputs' sizes and strides).

It changes the model's ``generation_config``, its attention implementation and how its packed layers are
grouped for the kernel (and builds their int4 layouts up front, so the compiled step never traces the one-time
conversion); the saved format is untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, CompileConfig
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging

from ..modeling import iter_packed_modules
from ..nn.packed_linear import PackedLinear, stack_siblings

__all__ = ["DECODING_ATTENTION", "compile_for_decoding", "decoding_compile_config", "single_query_attention",
           "stack_sibling_layers"]

logger = logging.get_logger(__name__)

#: the attention implementation :func:`compile_for_decoding` gives models that use SDPA
DECODING_ATTENTION = "hf_splitquant_decoding"
#: layers of one module that multiply the same input, by attribute name (Llama, Mistral, Qwen, Gemma, Phi-3 ...)
SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
#: inductor options :func:`compile_for_decoding` passes when it is given neither ``options`` nor a ``mode``
DEFAULT_INDUCTOR_OPTIONS = {"size_asserts": False}


def single_query_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except in the compiled one-token step on CPU: there ``softmax(q k^T) v`` as
    plain ops, which inductor fuses around two small matmuls, where the CPU SDPA kernel pays a fixed cost per
    call larger than the work at this size. Prefill, eager code, training, other devices and position biases
    take SDPA unchanged. Masks are SDPA's (boolean, ``True`` = attend), registered under the same name."""
    one_token = (query.shape[2] == 1 and query.device.type == "cpu" and torch.compiler.is_compiling()
                 and not dropout and kwargs.get("position_bias") is None and kwargs.get("softcap") is None)
    if not one_token:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    # repeat_kv then one batched matmul: measured faster here than grouping the query heads (an M=groups matmul)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # in float32 throughout, as the SDPA kernel accumulates (probabilities rounded to bf16 moved greedy tokens)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    weights = torch.matmul(query.float(), key.float().transpose(2, 3)) * scale
    if attention_mask is not None:
        weights = (weights.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                   else weights + attention_mask)
    weights = torch.softmax(weights, dim=-1)
    return torch.matmul(weights, value.float()).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODING_ATTENTION, single_query_attention)
AttentionMaskInterface.register(DECODING_ATTENTION, sdpa_mask)


def stack_sibling_layers(model: nn.Module) -> int:
    """Run each block's q/k/v and gate/up packed layers (:data:`SIBLING_NAMES`) as one stacked int4 kernel call
    per group (:func:`hf_splitquant.nn.packed_linear.stack_siblings`: the same outputs, bit for bit, no second
    copy of the weights); returns how many groups were stacked. Layers not on the int4 path, or whose layouts
    cannot be stacked, keep their own calls."""
    stacked = 0
    for module in model.modules():
        for names in SIBLING_NAMES:
            members = [getattr(module, name, None) for name in names]
            if all(isinstance(m, PackedLinear) for m in members):
                stacked += stack_siblings(members)
    return stacked


def decoding_compile_config(fullgraph: bool = True, dynamic: bool | None = False, mode: str = "default",
                            options: dict[str, Any] | None = None) -> CompileConfig:
    """The ``CompileConfig`` :func:`compile_for_decoding` sets: ``fullgraph`` (a graph break is an error, not a
    silent slowdown), static shapes (``dynamic=False``, see below), inductor's default mode
    (``"reduce-overhead"``, transformers' default, means CUDA graphs) with :data:`DEFAULT_INDUCTOR_OPTIONS`, and
    the flag that lets ``generate`` compile on CPU (transformers otherwise compiles only on accelerators).
    ``torch.compile`` takes inductor ``options`` *or* a ``mode``: with ``options`` (yours replace the defaults),
    ``mode`` must stay ``"default"`` (it is then dropped); another ``mode`` goes without the default options.

    Why ``dynamic=False``: the decoding step's shapes are fixed by the static cache, and with ``None``
    (torch's automatic dynamic shapes) a *recompile* caused by a changed shape is traced with symbolic shapes.
    That happens as soon as a process compiles a second model whose packed tensors differ in shape (another
    group size, another model) and made that model's step 25-40% slower on SmolLM2
    (``benchmarks/results/decode_smollm2_llamacpp.md``, session 33). With ``False`` each shape gets its own
    specialised graph."""
    if options is None and mode in ("default", None):
        options = dict(DEFAULT_INDUCTOR_OPTIONS)
    if options is not None:
        if mode not in ("default", None):
            raise ValueError(f"torch.compile takes either `mode` or `options`, not both: got mode={mode!r} and "
                             f"options={options!r}; drop one (mode='default' with options is fine)")
        mode = None  # torch.compile refuses a mode beside options, even "default"
    config = CompileConfig(fullgraph=fullgraph, dynamic=dynamic, mode=mode, options=options)
    config._compile_all_devices = True  # transformers' switch for compiling on CPU (its generate checks it)
    return config


def compile_for_decoding(model: nn.Module, fullgraph: bool = True, dynamic: bool | None = False,
                         mode: str = "default", options: dict[str, Any] | None = None,
                         fast_attention: bool = True, fuse_siblings: bool = True) -> nn.Module:
    """Make plain ``model.generate(...)`` decode with a static KV cache and a compiled step; returns ``model``.

    Works for packed models (quantize-on-load, reloaded, quantized in memory) and float models alike. The
    first ``generate`` compiles (tens of seconds to minutes on a small CPU); later calls reuse the compiled
    step as long as the batch size stays and the cache (prompt plus new tokens) does not outgrow the largest
    one seen (transformers keeps the static cache at that size). Compiled code computes in a different
    order than eager code (fused kernels), so logits can differ by float rounding; greedy tokens normally
    agree. Undo with ``model.generation_config.compile_config = None``,
    ``model.generation_config.cache_implementation = None`` and ``model.set_attn_implementation("sdpa")``, or
    pass ``disable_compile=True`` to one call.

    Args:
        model: a causal LM with ``generate`` (its layers must trace without graph breaks when ``fullgraph``).
        fullgraph, dynamic, mode, options: passed to ``torch.compile`` (see :func:`decoding_compile_config`).
        fast_attention: a model on SDPA attention gets :data:`DECODING_ATTENTION` (:func:`single_query_attention`:
            SDPA everywhere but the compiled one-token step on CPU); other implementations are left alone.
        fuse_siblings: each block's q/k/v and gate/up packed layers run as one int4 call per group
            (:func:`stack_sibling_layers`).
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
    groups = stack_sibling_layers(model) if fuse_siblings else 0
    if fast_attention and getattr(model.config, "_attn_implementation", None) == "sdpa":
        try:
            model.set_attn_implementation(DECODING_ATTENTION)
        except (ValueError, AttributeError) as error:  # a model outside transformers' attention interface
            logger.info("compile_for_decoding: attention stays on SDPA (%s)", error)
    config = model.generation_config
    config.cache_implementation = "static"
    config.compile_config = decoding_compile_config(fullgraph, dynamic, mode, options)
    # a compiled call that generate kept from an earlier config is dropped, so the new config takes effect
    for attr in ("_compiled_call", "_last_compile_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    logger.info("compile_for_decoding: static cache and compiled decoding step set; %d packed layers on the int4 "
                "kernel (%d groups stacked into one call each); attention %s", packed, groups,
                getattr(model.config, "_attn_implementation", None))
    return model
