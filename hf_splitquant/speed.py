"""Speed measurement of packed models against float ones, and the machine conditions it ran under.

Used by ``hf-splitquant bench`` and ``benchmarks/bench_speed.py``. A speed figure means little
without its conditions: :func:`machine_conditions` records the torch thread count, the CPU model and
the vector extensions torch's CPU kernels can use (from ``/proc/cpuinfo`` on Linux), the CPUs this
process may run on and the load average. :func:`interleaved_throughput` times several models in one
process, round by round (one run of each model per round), so a slow drift of the machine's speed
(other jobs, frequency scaling) hits every model alike; it reports wall-clock and CPU-time
throughput, the latter being what a busy or throttled machine distorts least.
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import kernels
from .nn.packed_linear import PackedLinear
from .version import __version__

__all__ = ["CPU_FEATURES", "native_bf16", "Throughput", "machine_conditions", "format_conditions", "interleaved_throughput",
           "generate_exactly",
           "kernel_paths", "tensor_bytes", "resident_bytes"]

#: ``/proc/cpuinfo`` flags that decide which CPU kernels torch can use (bf16 and int8 dot products, AMX tiles)
CPU_FEATURES = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, list[str]]:
    """(CPU model name, its flags among :data:`CPU_FEATURES`) from the first processor in ``path``."""
    try:
        text = path.read_text()
    except OSError:
        return None, []
    name, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name is None:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / arm
            flags = set(value.split())
        if name is not None and flags:
            break
    return name, [f for f in CPU_FEATURES if f in flags]


@functools.cache  # the hardware does not change while running: read /proc/cpuinfo once
def native_bf16(device_type: str = "cpu") -> bool:
    """Whether ``device_type`` computes bf16 matrix products natively (faster than float32): a CPU with
    AVX-512 BF16 or AMX-BF16 (read from ``/proc/cpuinfo``), or a CUDA device that supports bf16."""
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type != "cpu":
        return False
    flags = _cpuinfo()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine_conditions(threads: int | None = None) -> dict[str, Any]:
    """What a throughput figure depends on: threads, CPU, vector extensions, load, library versions.

    Args:
        threads: the torch thread count used (default: ``torch.get_num_threads()``).
    """
    import transformers

    name, flags = _cpuinfo()
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        available = os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else None
    return {
        "threads": threads if threads is not None else torch.get_num_threads(),
        "cpu": name or platform.processor() or platform.machine(),
        "cpu_flags": flags,
        "torch_cpu_capability": capability,
        "logical_cpus": os.cpu_count(),
        "cpus_available": available,
        "load_average": list(load) if load else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "int4_kernel": kernels.int4_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_splitquant": __version__,
    }


def format_conditions(before: dict[str, Any], after: dict[str, Any] | None = None) -> str:
    """One line of the conditions (with the load average after the run when given)."""
    flags = ", ".join(before["cpu_flags"]) or "none found"
    load = "n/a" if before["load_average"] is None else "/".join(f"{x:.2f}" for x in before["load_average"])
    if after is not None and after.get("load_average") is not None:
        load += " before, " + "/".join(f"{x:.2f}" for x in after["load_average"]) + " after"
    return (f"{before['threads']} torch threads on {before['cpus_available']} available of "
            f"{before['logical_cpus']} logical CPUs; CPU {before['cpu']} (vector extensions: {flags}; torch kernels "
            f"{before['torch_cpu_capability']}); load average (1/5/15 min) {load}; torch {before['torch']}, "
            f"transformers {before['transformers']}, hf_splitquant {before['hf_splitquant']}")


@dataclass
class Throughput:
    """Units (tokens, sentences) per second of one model, from the median round."""

    units_per_s: float
    #: units per second of process CPU time (all threads): what contention for the cores distorts least
    units_per_cpu_s: float
    wall_s: list[float]
    cpu_s: list[float]


def interleaved_throughput(models: Sequence[nn.Module], run: Callable[[nn.Module], Any], units: int,
                           repeats: int, warmup: int = 1) -> list[Throughput]:
    """Throughput of ``run(model)`` (doing ``units`` units of work) for each model, in one process.

    Each model runs ``warmup`` times first (kernel layouts are built on the first call), then
    ``repeats`` rounds time every model once, in turn; the median round counts.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for model in models:
        for _ in range(warmup):
            run(model)
    wall: list[list[float]] = [[] for _ in models]
    cpu: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, model in enumerate(models):
            w0, c0 = time.perf_counter(), time.process_time()
            run(model)
            wall[i].append(time.perf_counter() - w0)
            cpu[i].append(time.process_time() - c0)
    return [Throughput(units / statistics.median(w), units / max(statistics.median(c), 1e-9), w, c)
            for w, c in zip(wall, cpu)]


def generate_exactly(model: nn.Module, input_ids: torch.Tensor, new_tokens: int, **kwargs: Any) -> torch.Tensor:
    """Greedy ``model.generate`` making exactly ``new_tokens`` tokens, as llama.cpp's loop does: end-of-text is
    off in a copy of the model's generation config (its compile settings kept). ``min_new_tokens`` would do it
    with two logits processors that users decoding normally do not run (~0.9 ms per SmolLM2 step).

    Raises:
        RuntimeError: generate stopped early anyway.
    """
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    with torch.inference_mode():
        out = model.generate(input_ids, generation_config=config, max_new_tokens=new_tokens, do_sample=False,
                             **kwargs)
    if out.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate stopped after {out.shape[1] - input_ids.shape[1]} of {new_tokens} new tokens")
    return out


def kernel_paths(model: nn.Module, tokens: int, dtype: torch.dtype) -> str:
    """How many packed layers take each path for ``tokens`` tokens per call at ``dtype`` activations
    (``int4/6 x30``: 30 layers on the int4 kernel with six terms); ``-`` for a float model."""
    probe = torch.zeros(tokens, 1, dtype=dtype)
    paths: Counter[str] = Counter()
    for module in model.modules():
        if isinstance(module, PackedLinear):
            path = module.kernel_for(probe.to(module.device))
            if path == "int4":
                path = f"int4/{kernels.int4_terms(module.spec)}"
            paths[path] += 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(paths.items())) or "-"


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared storage counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def resident_bytes(model: nn.Module) -> int:
    """:func:`tensor_bytes` plus the int4 kernel layouts and dequantized caches its packed layers hold."""
    total = tensor_bytes(model)
    for module in model.modules():
        if isinstance(module, PackedLinear):
            if module._int4 is not None:
                total += module._int4.nbytes()
            if module._cached is not None:
                total += module._cached.numel() * module._cached.element_size()
    return total
