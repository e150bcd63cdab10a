"""Quality / size / time / memory benchmark of hf_splitquant on real offline models.

For every (model, bits, group size, transform) configuration this measures, in one process where
the float baseline is computed once:

* bits per weight (``quantization_report``, every stored bit counted), the packed checkpoint's
  size on disk (``save_pretrained`` into a temporary folder) and the float checkpoint's size on
  disk (the float model saved the same way);
* quality: all-MiniLM-L6-v2: mean cosine similarity between float and quantized sentence
  embeddings over ``assets.embedding_sentences(300)``; SmolLM2-135M: perplexity on Wikipedia
  token blocks (``assets.perplexity_token_blocks(tok, N, 512, part="eval")``) next to the float
  model's perplexity;
* time to quantize: the ``from_pretrained(..., quantization_config=...)`` wall time minus the float
  ``from_pretrained`` wall time;
* a save -> reload check: the reloaded packed checkpoint must reproduce the in-memory quantized
  model's outputs;
* peak memory of quantize-on-load, each load in a fresh subprocess (``--measure-load``, hidden):
  the maximum of the process's USS (private memory), sampled every ~5 ms by a background thread,
  minus its value just before the load.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/bench_quality.py --model all --output benchmarks/results/quality.json
    HF_HUB_OFFLINE=1 python benchmarks/bench_quality.py --quick        # CI smoke run, < 60 s

Progress goes to stderr; the markdown report goes to stdout; raw numbers go to ``--output``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# With libgomp's default (spinning) wait policy, 2 OpenMP threads on a 2-core machine that other
# processes also use make small tensor ops 5-30x slower (a thread spins at a barrier while its
# partner is descheduled). Sleeping waits keep the timings sane; must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "results" / "quality.json"
QUICK_OUTPUT = HERE / "results" / "quality_quick.json"
RESULT_MARKER = "@@MEASURE_LOAD_RESULT@@"
MB = 1e6
FLOAT = "float"

# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_group(text: str) -> int | None:
    if text.lower() in ("none", "channel", "per-channel"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"group size must be positive or 'none', got {text!r}")
    return value


def group_label(group: int | None) -> str:
    return "chan" if group is None else str(group)


def dir_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@dataclass(frozen=True)
class ModelInfo:
    key: str
    title: str
    kind: str  # "embedding" or "lm"
    path_fn: Callable[[], Path]
    auto_class: str  # attribute of transformers
    model_class: str  # concrete class, imported before the memory baseline

    def path(self) -> Path:
        return self.path_fn()

    def load(self, source: str | Path, quantization_config: Any = None) -> torch.nn.Module:
        import transformers

        auto = getattr(transformers, self.auto_class)
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        model = auto.from_pretrained(source, **kwargs)
        model.eval()
        return model


def _minilm_path() -> Path:
    import splitquant_assets as assets

    return assets.minilm_path()


def _smollm2_path() -> Path:
    import splitquant_assets as assets

    return assets.smollm2_path()


MODELS = {
    "minilm": ModelInfo("minilm", "all-MiniLM-L6-v2 (BertModel, 22.7M params)", "embedding", _minilm_path,
                        "AutoModel", "BertModel"),
    "smollm2": ModelInfo("smollm2", "SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M params)", "lm", _smollm2_path,
                         "AutoModelForCausalLM", "LlamaForCausalLM"),
}


#: benchmark transform name -> SplitQuantConfig fields
TRANSFORMS = {"rtn": {"transform": None}, "splitquant": {"transform": "splitquant"},
              "splitquant-aligned": {"transform": "splitquant", "splitquant_range": "aligned"}}


def make_config(bits: int, group: int | None, transform: str) -> Any:
    from hf_splitquant import SplitQuantConfig

    return SplitQuantConfig(bits=bits, group_size=group, **TRANSFORMS[transform])


# --------------------------------------------------------------------------------------------
# Peak memory of one load, in a fresh process
# --------------------------------------------------------------------------------------------


def anonymous_bytes() -> int:
    """Anonymous (heap) memory of this process from ``/proc/self/smaps_rollup`` (0 where unavailable).

    Unlike USS it leaves out the clean pages of memory-mapped checkpoint files that were read.
    """
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def malloc_trim() -> bool:
    """Return freed heap memory to the OS (glibc only); ``False`` where unavailable."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    gc.collect()
    return True


class UssSampler:
    """Samples the process's USS (and anonymous memory) every ``interval`` s in a background thread."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.peak_anon = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def uss(self) -> int:
        return self.process.memory_full_info().uss

    def _sample(self) -> None:
        self.peak = max(self.peak, self.uss())
        self.peak_anon = max(self.peak_anon, anonymous_bytes())
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> UssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def measure_load(args: argparse.Namespace) -> None:
    """Child mode: one ``from_pretrained`` with peak-USS sampling; prints one JSON line."""
    import resource

    import transformers

    import hf_splitquant  # noqa: F401  (registers the quantizer)

    torch.set_num_threads(args.threads)
    quiet_transformers()
    info = MODELS[args.model[0]]
    path = info.path()
    getattr(transformers, info.model_class)  # import the modeling module before the baseline
    getattr(transformers, info.auto_class)
    config = None if args.measure_load == FLOAT else make_config(args.bits[0], args.group_sizes[0], args.measure_load)
    if config is not None and args.embedding_bits is not None:  # packed embedding and head too
        config.embedding_bits = args.embedding_bits
    gc.collect()
    with UssSampler() as sampler:
        before = sampler.uss()
        anon_before = anonymous_bytes()
        start = time.perf_counter()
        model = info.load(path, config)
        wall = time.perf_counter() - start
        after = sampler.uss()
    # Loads are lazy where tensors stay memory-mapped from the checkpoint (a float load maps the file
    # and reads almost nothing): touch every tensor to get the model's resident cost once used.
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.detach().sum()
    gc.collect()
    touched = sampler.uss()
    anon_touched = anonymous_bytes()
    # glibc keeps freed temporaries of the quantization in its arenas; malloc_trim hands them back,
    # which shows what the loaded model itself holds.
    trimmed = malloc_trim()
    anon_trimmed = anonymous_bytes()
    result = {
        "uss_before_bytes": before,
        "uss_peak_bytes": sampler.peak,
        "uss_after_bytes": after,
        "peak_increase_bytes": sampler.peak - before,
        "retained_increase_bytes": after - before,
        "resident_after_touch_increase_bytes": touched - before,
        "anon_before_bytes": anon_before,
        "anon_peak_increase_bytes": sampler.peak_anon - anon_before,
        "anon_after_touch_increase_bytes": anon_touched - anon_before,
        "anon_after_malloc_trim_increase_bytes": anon_trimmed - anon_before if trimmed else None,
        "samples": sampler.samples,
        "load_s": wall,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "model_param_bytes": sum(t.numel() * t.element_size() for t in
                                 list(model.parameters()) + list(model.buffers())),
    }
    print(RESULT_MARKER + json.dumps(result), flush=True)


def add_memory_ratios(mem: dict[str, Any], float_mem: dict[str, Any]) -> None:
    mem["peak_ratio_vs_float_load_peak"] = mem["peak_increase_bytes"] / float_mem["peak_increase_bytes"]
    mem["peak_ratio_vs_float_resident"] = (
        mem["peak_increase_bytes"] / float_mem["resident_after_touch_increase_bytes"])
    # the float model's tensors (what a float model occupies once its mapped pages are all read)
    mem["peak_ratio_vs_float_tensor_bytes"] = mem["peak_increase_bytes"] / float_mem["model_param_bytes"]


def run_memory_child(model_key: str, transform: str, bits: int | None, group: int | None,
                     threads: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure-load", transform, "--model", model_key,
           "--threads", str(threads)]
    if transform != FLOAT:
        cmd += ["--bits", str(bits), "--group-sizes", "none" if group is None else str(group)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise RuntimeError(f"memory measurement failed (rc {proc.returncode}): {proc.stderr[-2000:]}")


# --------------------------------------------------------------------------------------------
# Quality metrics
# --------------------------------------------------------------------------------------------


def enable_dequantized_cache(model: torch.nn.Module) -> None:
    """Dequantize each packed weight once instead of at every forward (same numbers, faster), on the
    exact reference path: quality is the format's, whatever the batch shape (few-token calls would
    otherwise take the bf16 int4 kernel)."""
    from hf_splitquant import PackedLinear

    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.cache_dequantized = True
            module.kernel_mode = "reference"


def embeddings(model: torch.nn.Module, tokenizer: Any, sentences: list[str]) -> torch.Tensor:
    import splitquant_assets as assets

    return assets.mean_pooled_embeddings(model, tokenizer, sentences)


def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch: int = 4) -> tuple[float, float]:
    """(perplexity, mean token NLL) with ``labels=input_ids``, ``batch`` blocks at a time, float32."""
    nll_sum, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, blocks.shape[0], batch):
            ids = blocks[start : start + batch]
            loss = model(input_ids=ids, labels=ids).loss
            count = ids.shape[0] * (ids.shape[1] - 1)  # the shifted labels of every block
            nll_sum += float(loss.double()) * count
            tokens += count
    nll = nll_sum / tokens
    try:
        ppl = math.exp(nll)
    except OverflowError:
        ppl = math.inf
    return ppl, nll


class Evaluator:
    """Holds the float reference of one model and scores quantized models against it."""

    def __init__(self, info: ModelInfo, args: argparse.Namespace) -> None:
        from transformers import AutoTokenizer

        import splitquant_assets as assets

        self.info = info
        self.tokenizer = AutoTokenizer.from_pretrained(info.path())
        if info.kind == "embedding":
            self.sentences = assets.embedding_sentences(args.sentences)
            self.metric = "mean cosine similarity to float embeddings (higher is better)"
            self.short_metric = "cosine"
            self.protocol = {"sentences": len(self.sentences), "source": "assets.embedding_sentences"}
            self.check_input = self.sentences[:16]
        else:
            self.blocks = assets.perplexity_token_blocks(self.tokenizer, args.ppl_blocks, args.ppl_block_len,
                                                         part="eval")
            self.metric = (f"perplexity on {args.ppl_blocks} x {args.ppl_block_len} Wikipedia eval tokens "
                           "(lower is better)")
            self.short_metric = "perplexity"
            self.protocol = {"blocks": args.ppl_blocks, "block_len": args.ppl_block_len, "batch": 4,
                             "part": "eval", "source": "assets.perplexity_token_blocks"}
            self.check_input = self.blocks[:1, :128]
        self.reference: Any = None
        self.float_quality: float = math.nan

    def higher_is_better(self) -> bool:
        return self.info.kind == "embedding"

    def set_float(self, model: torch.nn.Module) -> dict[str, Any]:
        if self.info.kind == "embedding":
            self.reference = embeddings(model, self.tokenizer, self.sentences)
            self.float_quality = 1.0
            return {"quality": 1.0}
        ppl, nll = perplexity(model, self.blocks)
        self.float_quality = ppl
        return {"quality": ppl, "mean_nll": nll}

    def score(self, model: torch.nn.Module) -> dict[str, Any]:
        if self.info.kind == "embedding":
            emb = embeddings(model, self.tokenizer, self.sentences)
            cos = (emb * self.reference).sum(dim=1)
            return {"quality": float(cos.mean()), "cosine_min": float(cos.min()),
                    "cosine_median": float(cos.median())}
        ppl, nll = perplexity(model, self.blocks)
        return {"quality": ppl, "mean_nll": nll, "ppl_ratio_vs_float": ppl / self.float_quality,
                "nll_increase_vs_float": nll - math.log(self.float_quality)}

    def outputs(self, model: torch.nn.Module) -> torch.Tensor:
        """Small deterministic output used to check that save -> reload reproduces the model."""
        if self.info.kind == "embedding":
            return embeddings(model, self.tokenizer, self.check_input)
        with torch.inference_mode():
            return model(input_ids=self.check_input).logits.float()


# --------------------------------------------------------------------------------------------
# Benchmark of one model
# --------------------------------------------------------------------------------------------


def timed_load(info: ModelInfo, source: str | Path, config: Any = None) -> tuple[torch.nn.Module, float, float]:
    """(model, wall seconds, CPU seconds of this process, all threads)."""
    gc.collect()
    start, cpu_start = time.perf_counter(), time.process_time()
    model = info.load(source, config)
    return model, time.perf_counter() - start, time.process_time() - cpu_start


def system_cpu_seconds() -> float | None:
    """Busy CPU seconds of the whole machine so far (``/proc/stat``), or ``None`` off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def memory_selection(mode: str, configs: list[tuple[str, int, int | None]]) -> list[tuple[str, int, int | None]]:
    """The configurations that get a peak-memory subprocess (the float load too, except with --quick)."""
    if mode == "all":
        return list(configs)
    if mode == "subset":
        return [c for c in configs if c[1] in (2, 4) and c[2] == 64]
    if mode == "quick":  # the first configuration only: exercises the path cheaply
        return configs[:1]
    return []


def bench_model(info: ModelInfo, args: argparse.Namespace) -> dict[str, Any]:
    from hf_splitquant import quantization_report

    model_start = time.perf_counter()
    path = info.path()
    log(f"== {info.key}: {path}")
    configs = [(t, b, g) for t in args.transforms for b in args.bits for g in args.group_sizes]

    # Peak memory of quantize-on-load, each in a fresh process, before this process maps the checkpoint:
    # USS counts a read page of a memory-mapped file only while no other process maps that file.
    memory: dict[tuple[str, int, int | None], dict[str, Any]] = {}
    float_memory = None
    selected = memory_selection(args.memory, configs)
    if selected and args.memory != "quick":  # --quick skips the float child (each child costs ~7 s of imports)
        log("   memory: float load")
        float_memory = run_memory_child(info.key, FLOAT, None, None, args.threads)
    for transform, bits, group in selected:
        log(f"   memory: {transform} int{bits} g{group_label(group)}")
        memory[(transform, bits, group)] = mem = run_memory_child(info.key, transform, bits, group, args.threads)
        if float_memory is not None:
            add_memory_ratios(mem, float_memory)

    evaluator = Evaluator(info, args)

    # Float baseline: one untimed warm-up load (imports, file cache), then the best of two timed loads.
    info.load(path)
    float_model, t1, c1 = timed_load(info, path)
    del float_model
    float_model, t2, c2 = timed_load(info, path)
    float_load_s, float_load_cpu_s = min(t1, t2), min(c1, c2)
    with tempfile.TemporaryDirectory() as tmp:
        float_model.save_pretrained(tmp)
        float_disk = dir_bytes(tmp)
    source_weights = sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
    t0 = time.perf_counter()
    float_row: dict[str, Any] = {
        "transform": FLOAT, "bits": 32, "group_size": None, "bits_per_weight": 32.0,
        "disk_bytes": float_disk, "source_checkpoint_safetensors_bytes": source_weights,
        "load_s": float_load_s, "load_s_samples": [t1, t2], "load_cpu_s": float_load_cpu_s,
        **evaluator.set_float(float_model),
    }
    float_row["eval_s"] = time.perf_counter() - t0
    float_row["delta_vs_float"] = 0.0
    float_param_bytes = sum(t.numel() * t.element_size() for t in
                            list(float_model.parameters()) + list(float_model.buffers()))
    float_row["model_bytes"] = float_param_bytes
    if float_memory is not None:
        float_row["memory"] = float_memory
    del float_model
    gc.collect()
    log(f"   float: load {float_load_s:.2f} s, size on disk {float_disk / MB:.1f} MB, "
        f"{evaluator.short_metric} {float_row['quality']:.4g} (eval {float_row['eval_s']:.1f} s)")

    rows: list[dict[str, Any]] = []
    for transform, bits, group in configs:
        label = f"{transform} int{bits} g{group_label(group)}"
        config = make_config(bits, group, transform)
        model, load_s, load_cpu_s = timed_load(info, path, config)
        report = quantization_report(model)
        rep = report.to_dict()
        rep.pop("layers", None)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            model.save_pretrained(tmp)
            save_s = time.perf_counter() - t0
            disk = dir_bytes(tmp)
            disk_weights = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
            t0 = time.perf_counter()
            reloaded = info.load(tmp)
            reload_s = time.perf_counter() - t0
            expected = evaluator.outputs(model)
            got = evaluator.outputs(reloaded)
            reload_diff = float((expected - got).abs().max())
            reload_bpw = quantization_report(reloaded).bits_per_weight
            del reloaded
        enable_dequantized_cache(model)
        t0 = time.perf_counter()
        scores = evaluator.score(model)
        eval_s = time.perf_counter() - t0
        del model
        gc.collect()
        quality = scores["quality"]
        row = {
            "transform": transform, "bits": bits, "group_size": group,
            "bits_per_weight": report.bits_per_weight,
            "disk_bytes": disk, "disk_safetensors_bytes": disk_weights,
            "disk_ratio_vs_float": disk / float_disk,
            "model_bytes": report.model_bytes, "float_model_bytes": report.float_model_bytes,
            "load_s": load_s, "quantize_s": load_s - float_load_s,
            "load_cpu_s": load_cpu_s, "quantize_cpu_s": load_cpu_s - float_load_cpu_s,
            "save_s": save_s, "reload_s": reload_s, "eval_s": eval_s,
            "reload_max_abs_diff": reload_diff, "reload_bits_per_weight": reload_bpw,
            **scores,
            "delta_vs_float": quality - evaluator.float_quality,
            "report": rep,
        }
        if (transform, bits, group) in memory:
            row["memory"] = memory[(transform, bits, group)]
        rows.append(row)
        log(f"   {label}: {report.bits_per_weight:.3f} bpw, {disk / MB:.2f} MB, "
            f"{evaluator.short_metric} {quality:.4g}, load {load_s:.1f} s, eval {eval_s:.1f} s, "
            f"reload diff {reload_diff:.2g}")
        if reload_diff > 1e-4 or reload_bpw != report.bits_per_weight:
            log(f"   !! {label}: the reloaded checkpoint differs from the in-memory model "
                f"(max abs diff {reload_diff:.3g}, bpw {reload_bpw} vs {report.bits_per_weight})")

    return {
        "model": info.key, "title": info.title, "path": str(path), "metric": evaluator.metric,
        "higher_is_better": evaluator.higher_is_better(), "protocol": evaluator.protocol,
        "float": float_row, "configs": rows, "wall_s": time.perf_counter() - model_start,
    }


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def fmt_quality(value: float, higher_is_better: bool) -> str:
    if math.isnan(value):
        return "nan"
    if higher_is_better:
        return f"{value:.4f}"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.2e}"


def fmt_delta(value: float, higher_is_better: bool) -> str:
    if math.isnan(value):
        return "nan"
    if higher_is_better:
        return f"{value:+.4f}"
    return f"{value:+.4g}" if abs(value) < 1e5 else f"{value:+.2e}"


def peak_mb(row: dict[str, Any]) -> str:
    mem = row.get("memory")
    if not mem:
        return "-"
    return f"{mem['peak_increase_bytes'] / MB:.0f} (anon {mem['anon_peak_increase_bytes'] / MB:.0f})"


def goodness(row: dict[str, Any], higher_is_better: bool) -> float:
    q = row["quality"]
    if math.isnan(q):
        return -math.inf
    return q if higher_is_better else -q


def pareto_flags(rows: list[dict[str, Any]], higher_is_better: bool) -> list[bool]:
    """A row is Pareto-best when no row at <= its bits per weight has strictly better quality."""
    flags = []
    for row in rows:
        g = goodness(row, higher_is_better)
        flags.append(not any(other["bits_per_weight"] <= row["bits_per_weight"]
                             and goodness(other, higher_is_better) > g for other in rows))
    return flags


def model_tables(result: dict[str, Any]) -> str:
    hib = result["higher_is_better"]
    fl = result["float"]
    rows = result["configs"]
    lines = [f"### {result['title']}", "", f"quality = {result['metric']}; float load "
             f"{fl['load_s']:.2f} s (quantize s = quantized load s - float load s); model wall time "
             f"{result['wall_s']:.0f} s."]
    if fl.get("memory"):
        mem = fl["memory"]
        lines.append(f"Float load: peak +{mem['peak_increase_bytes'] / MB:.0f} MB during `from_pretrained` "
                     "(weights stay memory-mapped), "
                     f"+{mem['resident_after_touch_increase_bytes'] / MB:.0f} MB USS once every tensor is touched "
                     f"(float tensors: {mem['model_param_bytes'] / MB:.0f} MB). `peak load MB` = peak USS increase "
                     "during the quantizing `from_pretrained` (anon = anonymous memory only, without the mapped "
                     "checkpoint pages).")
    lines.append("")
    lines.append("| transform | bits | group | bits/weight | size on disk (MB) | quality | Δ vs float | "
                 "quantize s | peak load MB |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    lines.append(f"| float (fp32) | 32 | - | 32 | {fl['disk_bytes'] / MB:.1f} | {fmt_quality(fl['quality'], hib)} | "
                 f"0 | - (load {fl['load_s']:.2f}) | {peak_mb(fl)} |")
    for r in rows:
        lines.append(
            f"| {r['transform']} | {r['bits']} | {group_label(r['group_size'])} | {r['bits_per_weight']:.3f} | "
            f"{r['disk_bytes'] / MB:.2f} | {fmt_quality(r['quality'], hib)} | "
            f"{fmt_delta(r['delta_vs_float'], hib)} | {r['quantize_s']:.1f} (load {r['load_s']:.1f}, "
            f"cpu {r['quantize_cpu_s']:.1f}) | "
            f"{peak_mb(r)} |")
    lines += ["", "Sorted by bits per weight; `*` = Pareto-best: no configuration at <= its bits/weight has "
              f"better quality ({'higher' if hib else 'lower'} is better):", ""]
    lines.append("| | bits/weight | transform | bits | group | quality | size on disk (MB) |")
    lines.append("|---|---|---|---|---|---|---|")
    all_rows = rows + [fl]
    ordered = sorted(all_rows, key=lambda r: (r["bits_per_weight"], -goodness(r, hib)))
    for r, star in zip(ordered, pareto_flags(ordered, hib)):
        is_float = r["transform"] == FLOAT
        lines.append(
            f"| {'*' if star else ''} | {r['bits_per_weight']:.3f} | {'float (fp32)' if is_float else r['transform']} | "
            f"{r['bits']} | {'-' if is_float else group_label(r['group_size'])} | "
            f"{fmt_quality(r['quality'], hib)} | {r['disk_bytes'] / MB:.2f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def print_merged_report(paths: list[Path]) -> None:
    """Print the tables of several result files, one per model, configurations merged."""
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        for result in data["models"]:
            if result["model"] not in merged:
                merged[result["model"]] = {**result, "configs": list(result["configs"])}
                continue
            target = merged[result["model"]]
            if result["protocol"] != target["protocol"]:
                raise SystemExit(f"{path}: {result['model']} was measured with {result['protocol']}, "
                                 f"not {target['protocol']}; its numbers cannot be merged")
            seen = {(c["transform"], c["bits"], c["group_size"]) for c in target["configs"]}
            target["configs"] += [c for c in result["configs"]
                                  if (c["transform"], c["bits"], c["group_size"]) not in seen]
            target["wall_s"] += result["wall_s"]
    print("# hf_splitquant quality benchmark (merged)\n")
    print("Merged from " + ", ".join(f"`{os.path.relpath(p)}`" for p in paths) + "; model wall time is the sum.\n")
    for result in merged.values():
        # same order as a run: transform, bits, then per-channel before larger groups
        result["configs"].sort(key=lambda c: (c["transform"], c["bits"], c["group_size"] is not None,
                                              -(c["group_size"] or 0)))
        print(model_tables(result))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["all"], choices=["minilm", "smollm2", "all"])
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4, 8])
    parser.add_argument("--group-sizes", nargs="+", type=parse_group, default=[None, 128, 64],
                        help="inputs per group; 'none' = per output channel (default: none 128 64)")
    parser.add_argument("--transforms", nargs="+", default=["rtn", "splitquant"], choices=list(TRANSFORMS),
                        help="splitquant-aligned: splitquant_range='aligned' (2-3 bits)")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run (< 60 s): minilm only, 32 sentences, bits 2 4, group 64, peak memory of "
                             "the first configuration only")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"JSON file for the raw numbers (default {DEFAULT_OUTPUT.relative_to(HERE.parent)}; "
                             f"--quick: {QUICK_OUTPUT.relative_to(HERE.parent)})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", choices=["subset", "all", "none"], default=None,
                        help="which configurations get a peak-memory subprocess: subset (default: bits 2 and 4, "
                             "group 64, every transform), all, or none")
    parser.add_argument("--sentences", type=int, default=300, help="MiniLM sentences (default 300)")
    parser.add_argument("--ppl-blocks", type=int, default=8,
                        help="SmolLM2 perplexity blocks (default 8: 16 x 512 pushed the full run past ~25 min "
                             "on 2 cores)")
    parser.add_argument("--ppl-block-len", type=int, default=512)
    parser.add_argument("--report-from", nargs="+", type=Path, default=None, metavar="JSON",
                        help="measure nothing: print the tables of earlier --output files, merging the "
                             "configurations of the same model (the float row comes from the first file)")
    parser.add_argument("--measure-load", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--embedding-bits", type=int, default=None,
                        help="with --measure-load: SplitQuantConfig(embedding_bits=...) (packed embedding and head)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.measure_load is not None:
        measure_load(args)
        return 0
    if args.report_from:
        print_merged_report(args.report_from)
        return 0
    run_start = time.perf_counter()
    sys_cpu_start, own_cpu_start = system_cpu_seconds(), own_cpu_seconds()
    if args.quick:
        args.model = ["minilm"]
        args.sentences = 32
        args.bits = [2, 4]
        args.group_sizes = [64]
        if args.memory is None:
            args.memory = "quick"
    if args.memory is None:
        args.memory = "subset"
    output = args.output or (QUICK_OUTPUT if args.quick else DEFAULT_OUTPUT)
    models = list(MODELS) if "all" in args.model else list(dict.fromkeys(args.model))

    torch.set_num_threads(args.threads)
    quiet_transformers()
    import transformers

    import hf_splitquant

    results = []
    for key in models:
        results.append(bench_model(MODELS[key], args))

    wall = time.perf_counter() - run_start
    sys_cpu_end, own_cpu = system_cpu_seconds(), own_cpu_seconds() - own_cpu_start
    other_cpu = None if sys_cpu_start is None or sys_cpu_end is None else sys_cpu_end - sys_cpu_start - own_cpu
    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:], "quick": args.quick, "threads": args.threads, "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "hf_splitquant": hf_splitquant.__version__,
        "platform": platform.platform(), "memory_mode": args.memory,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "MB": "10^6 bytes",
        "wall_s": wall, "own_cpu_s": own_cpu,
        # CPU time other processes on the machine used during the run: timings are noisy when this is large.
        "other_processes_cpu_s": other_cpu,
    }
    contention = "" if other_cpu is None else (
        f" Other processes used {other_cpu:.0f} CPU-s during the run "
        f"({100 * other_cpu / (wall * (os.cpu_count() or 1)):.0f}% of the machine): wall times are contended.")
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as handle:
        json.dump({"meta": meta, "models": results}, handle, indent=2, allow_nan=True)
        handle.write("\n")

    print("# hf_splitquant quality benchmark\n")
    print(f"`{' '.join(['bench_quality.py', *sys.argv[1:]])}` - torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; "
          f"total wall time {wall:.0f} s ({wall / 60:.1f} min), this process + children {own_cpu:.0f} CPU-s."
          f"{contention} MB = 10^6 bytes. Raw numbers: `{os.path.relpath(output)}`.\n")
    for result in results:
        print(model_tables(result))
    log(f"done in {wall:.0f} s; wrote {output}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
