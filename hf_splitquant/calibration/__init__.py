"""Quantization with calibration data: sequential, block-by-block Attention Round, on one or many processes.

:func:`calibrate_and_quantize` (what ``hf_splitquant.quantize(model, config, calibration_data=...)``
calls) works like GPTQ-style sequential calibration:

1. Bit widths (``config.bit_allocation``: MixQuant or coding length) are decided first, from the
   weights alone; every layer then keeps its width.
2. The calibration samples run through the model up to the first transformer block, whose inputs
   (hidden states and the keyword arguments the model passes it: masks, rotary embeddings, ...) are
   kept. Only one block's activations are ever held.
3. For each block: the block runs on the kept inputs with forward hooks on its quantized Linear
   layers, which sum ``H = X^T X`` of each layer's inputs (padding tokens excluded). The inputs come
   from the *already quantized* previous blocks, so errors do not compound unseen. Each layer's codes
   are chosen by Attention Round (:mod:`hf_splitquant.methods.attention_round`) on the objective
   ``|X (W_q - W)^T|^2``, the layer is replaced by a :class:`~hf_splitquant.nn.packed_linear.PackedLinear`,
   and the now-quantized block runs again to produce the next block's inputs.
4. Quantized layers outside the repeated blocks (e.g. BERT's pooler) are calibrated last, with one
   pass of the whole (already quantized) model.
5. ``config.layers`` is written and the quantizer attached: ``save_pretrained`` writes the usual
   packed format.

Several processes (``torchrun --nproc_per_node N script.py``; ``accelerate.Accelerator``, gloo on CPU)
split the calibration batches: global batch ``i`` goes to process ``i % N`` (the split of accelerate's
``prepare_data_loader`` with ``even_batches=False``: no sample is repeated to even out the shards).
Each process sums its local statistics; after the local pass they are summed once across processes
(``accelerator.reduce``), never inside a loop over the uneven shards. The optimisation needs only
``H`` and the token count, so it is a full-batch optimisation identical to the one-process run. The
layers of a block are then divided among the processes (layer ``j`` on process ``j % N``) and the packed
results broadcast, so every process ends with the same packed model; only the main process shows
progress (and should save).

Bit-exactness across process counts. The result is bit-identical to the one-process run with the
same ``batch_size`` because: (a) batches are formed globally before sharding, so each batch has the
same composition (and padding) on every process count, and the same per-batch forward and per-batch
``X^T X`` (same shapes, same kernels, same number of torch threads per process: run both with
e.g. ``OMP_NUM_THREADS=1``); (b) the per-batch statistics are summed *exactly*, in fixed-point
integers (:class:`ExactSum`: each value split into four signed 32-bit limbs at fixed binary positions
``2^48 .. 2^-48``, summed as int64), so the sum does not depend on the order or grouping of the
additions (float sums do: ``(a+b)+c != a+(b+c)``; even float64 would differ in the last bits and could
flip a float32 rounding; the test shows that the per-layer objectives then differ between 1 and 2
processes); (c) the optimisation then runs on identical inputs, and each layer on one process only.


The rooms: :mod:`~hf_splitquant.calibration.data` (samples, batches, shards, files),
:mod:`~hf_splitquant.calibration.statistics` (exact sums of ``X^T X``),
:mod:`~hf_splitquant.calibration.distributed` (the Accelerator, layer owners, broadcasts),
:mod:`~hf_splitquant.calibration.blocks` (the model's repeated blocks, their inputs, memory) and
:mod:`~hf_splitquant.calibration.loop` (the block loop). The entry point is :func:`calibrate`
(also reached through ``hf_splitquant.quantize(model, config, calibration_data=...)``).
"""

from __future__ import annotations

from .blocks import anonymous_memory, find_blocks
from .data import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, load_calibration_file, shard_batches
from .loop import calibrate_and_quantize, quantize_from_file
from .statistics import ExactSum

#: the public name of the entry point
calibrate = calibrate_and_quantize

__all__ = ["calibrate", "calibrate_and_quantize", "quantize_from_file", "load_calibration_file", "ExactSum",
           "shard_batches", "find_blocks", "anonymous_memory", "DEFAULT_BATCH_SIZE", "DEFAULT_MAX_LENGTH"]
