"""Calibration benchmark: round-to-nearest vs GPTQ (ours) vs Attention Round vs Attention Round with
coding-length bit allocation, on SmolLM2-135M, by Wikipedia perplexity.

For each code width (INT2, INT3, INT4; group size 64, asymmetric, fp16 scales) it measures:

* ``rtn``: plain round-to-nearest (no data);
* ``gptq``: ``rounding="gptq"`` with the library defaults (GPTQ error feedback, damping 1.0, on the
  output-aware clipped grid), same calibration data as ``ar``;
* ``gptq-float``: the same with ``rounding_options={"target": "float"}`` (each layer fitted to the float
  model's outputs, :mod:`hf_splitquant.methods.float_target`);
* ``recipe``: ``SplitQuantConfig.recipe("w<bits>")`` (the named preset, with its own group size);
* ``ar``: Attention Round (:func:`hf_splitquant.quantize` with ``calibration_data``), sequential
  block by block on ``--cal-samples`` blocks of ``--cal-len`` tokens of the Wikipedia
  ``"calibration"`` part, ``--iterations`` steps per layer;
* ``gptq+as`` / ``gptq+as+bt``: ``rounding="gptq"`` with ``activation_scaling=True`` (without / with
  ``--block-tuning``);
* ``gptq+sens`` / ``gptq+mq`` / ``gptq+cl`` / ``gptq+cli``: ``rounding="gptq"`` with per-layer widths
  (candidates 2, 3, 4) at ``--target-bits`` (default: the bits per weight of the rtn variant):
  ``bit_allocation="sensitivity"`` (Fisher-weighted errors on the calibration data), ``"mixquant"``
  (data-free round-off errors), ``"coding_length"`` (the faithful coding length of the weights) or
  ``"coding_length_inputs"`` (the coding length of the weights scaled by their inputs' RMS);
* ``gptq+sens+bt``: ``gptq+sens`` followed by ``--block-tuning`` (mixed widths, then tuned);
* ``rtn+cl`` / ``ar+cl``: the same with ``bit_allocation="coding_length"`` at the bits per weight of
  the uniform width (so the comparison is at equal size; candidates 2, 3, 4, 5, 6, 8). Not at INT2:
  every candidate but 2 costs more than the INT2 budget, so the allocation is INT2 everywhere.

Quality: perplexity on ``--eval-blocks`` x ``--eval-len`` tokens of the Wikipedia ``"eval"`` part
(``assets.perplexity_token_blocks``; disjoint articles from the calibration part). Also: bits per
weight (every stored bit), quantization wall time, peak memory of the quantization (anonymous
memory, sampled every 20 ms, minus its value just before; the RSS would count the lazily memory-mapped
float weights as they are first read), the activations held (one block's inputs and
outputs), and the mean over layers of the layer-output MSE of Attention Round relative to RTN.

Caveat for INT4: SmolLM2's weights come from a Q4_1 GGUF file (already 4-bit in blocks of 32), so an
INT4 grid with groups of 64 (aligned to those blocks) is close to lossless for RTN already.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/bench_calibration.py             # about 15-25 min on 2 CPU cores
    HF_HUB_OFFLINE=1 python benchmarks/bench_calibration.py --quick     # smoke run, a few minutes

Progress goes to stderr, the markdown table to stdout, raw numbers to ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class PeakMemory:
    """Peak anonymous memory of this process while the ``with`` block runs, sampled every 20 ms.

    Anonymous (private) memory, not the resident set: ``from_pretrained`` memory-maps the float
    safetensors lazily, so the RSS grows as the float weights are first touched, which is not a cost
    of quantizing.
    """

    def __init__(self) -> None:
        from hf_splitquant.calibration import anonymous_memory

        self.read = anonymous_memory
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self.start = self.peak = self.read()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.read())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())

    @property
    def increase_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch: int = 2) -> float:
    """``exp`` of the mean next-token NLL over the blocks (each block scored on its own)."""
    from hf_splitquant import PackedLinear

    for module in model.modules():  # dequantize once per layer instead of at every forward
        if isinstance(module, PackedLinear):
            module.set_weight_cache(True)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, blocks.shape[0], batch):
            ids = blocks[start : start + batch]
            n = ids.shape[0] * (ids.shape[1] - 1)
            nll += float(model(input_ids=ids, labels=ids).loss.double()) * n
            count += n
    return math.exp(nll / count)


RESULT_MARKER = "@@BENCH_CALIBRATION_RESULT@@"
#: per-layer width variants: the method name -> ``bit_allocation`` (all with ``rounding="gptq"``, candidates 2, 3, 4;
#: ``gptq+sens+bt`` adds ``--block-tuning``)
ALLOCATIONS = {"gptq+sens": "sensitivity", "gptq+mq": "mixquant", "gptq+cl": "coding_length",
               "gptq+cli": "coding_length_inputs", "gptq+sens+bt": "sensitivity"}


def load_smollm2(eval_blocks: int, eval_len: int) -> tuple[Any, torch.Tensor, torch.nn.Module]:
    """``(tokenizer, eval token blocks, float32 model)``: the model and evaluation every SmolLM2 quality
    benchmark shares (``bench_peers.py`` too), with transformers' logging and progress bars quiet."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import splitquant_assets as assets

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    blocks = assets.perplexity_token_blocks(tokenizer, eval_blocks, eval_len, part="eval")
    return tokenizer, blocks, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this (fresh) process: quantize, measure, evaluate."""
    torch.set_num_threads(job["threads"])
    import hf_splitquant
    import splitquant_assets as assets
    from hf_splitquant import SplitQuantConfig, quantization_report

    tokenizer, eval_blocks, model = load_smollm2(job["eval_blocks"], job["eval_len"])
    row: dict[str, Any] = {"method": job["method"], "bits": job["bits"]}
    if job["method"] == "float":
        row["bits_per_weight"] = 32.0
    else:
        kwargs: dict[str, Any] = {"bits": job["bits"], "group_size": job["group_size"]}
        if job["method"] in ("rtn+cl", "ar+cl"):
            kwargs.update(bit_allocation="coding_length", target_bits=job["target_bits"])
        if job["method"].startswith("ar"):
            kwargs.update(rounding="attention_round", rounding_options={"iterations": job["iterations"]})
        if job["method"] == "gptq":  # library defaults (damping 1.0, output-aware clipped grid) unless --damping
            kwargs.update(rounding="gptq", rounding_options=None if job.get("damping") is None else
                          {"damping": job["damping"]})
        if job["method"] == "gptq-float":  # the same, each layer fitted to the float model's outputs
            kwargs.update(rounding="gptq", rounding_options={"target": "float", **(
                {} if job.get("damping") is None else {"damping": job["damping"]})})
        if job["method"] in ("gptq+bt", "gptq+as+bt", "gptq+sens+bt"):  # GPTQ, then block-wise tuning (float blocks)
            kwargs.update(rounding="gptq", block_tuning=job["block_tuning"])
            row["block_tuning"] = job["block_tuning"]
        if job["method"] in ("gptq+as", "gptq+as+bt"):  # activation-aware input scaling before GPTQ
            kwargs.update(rounding="gptq", activation_scaling=True)
        if job["method"] in ALLOCATIONS:
            kwargs.update(rounding="gptq", bit_allocation=ALLOCATIONS[job["method"]], target_bits=job["target_bits"],
                          mixquant_candidates=[2, 3, 4])
        if job.get("input_rotation"):  # Hadamard-rotated inputs (hf_splitquant/quant/rotation.py)
            kwargs["input_rotation"] = job["input_rotation"]
            row["input_rotation"] = job["input_rotation"]
        config = SplitQuantConfig(**kwargs)
        if job["method"] == "recipe":  # the named preset for this width, with its own group size
            config = SplitQuantConfig.recipe(f"w{job['bits']}")
            row["recipe"] = f"w{job['bits']}"
            row["group_size"] = config.group_size
        cal_blocks = assets.perplexity_token_blocks(tokenizer, job["cal_samples"], job["cal_len"], part="calibration")
        with PeakMemory() as memory:
            t0 = time.perf_counter()
            if config.rounding is not None:
                hf_splitquant.quantize(model, config, calibration_data=cal_blocks, batch_size=job.get("batch_size", 4),
                                       progress=False)
            else:
                hf_splitquant.quantize(model, config, progress=False)
            row["quantize_seconds"] = time.perf_counter() - t0
        row["peak_memory_increase_mb"] = memory.increase_mb
        if job.get("save_dir"):
            folder = Path(job["save_dir"]) / f"int{job['bits']}_g{config.group_size}_{job['method']}"
            model.save_pretrained(folder)
            row["saved_to"] = str(folder)
        row["bits_per_weight"] = quantization_report(model).bits_per_weight
        calibration = getattr(model, "calibration_report", None)
        if calibration is not None:
            if calibration.get("blocks"):
                row["blocks"] = calibration["blocks"]
            if calibration.get("activation_scaling"):
                row["activation_scaling"] = calibration["activation_scaling"]
            row.update(activations_mb=calibration["activations_mb"],
                       mean_layer_mse_vs_rtn=calibration["mean_mse_ratio"],
                       layers_kept_rtn=sum(1 for i in calibration["layers"].values() if i["kept_rtn"]))
        if job["method"].endswith("+cl") or job["method"] in ALLOCATIONS:
            widths = [spec["bits"] for spec in model.config.quantization_config.layers.values()]
            row["bit_histogram"] = {b: widths.count(b) for b in sorted(set(widths))}
    t0 = time.perf_counter()
    row["perplexity"] = perplexity(model, eval_blocks)
    row["eval_seconds"] = time.perf_counter() - t0
    return row


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_one` in a fresh Python process (clean memory measurement, no state between configs)."""
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise RuntimeError(f"benchmark child failed ({job}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="RTN vs Attention Round (vs coding-length allocation) on SmolLM2-135M")
    parser.add_argument("--quick", action="store_true", help="smoke run: INT3 only, tiny data, 2 steps")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--methods", nargs="+", choices=["rtn", "gptq", "gptq-float", "recipe", "ar", "rtn+cl", "ar+cl",
                                                            *ALLOCATIONS, "gptq+bt", "gptq+as", "gptq+as+bt"],
                        default=["rtn", "gptq", "ar", "rtn+cl", "ar+cl"], help="variants to run (+cl needs rtn)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--cal-samples", type=int, default=8, help="calibration blocks (default 8)")
    parser.add_argument("--cal-len", type=int, default=256, help="tokens per calibration block (default 256)")
    parser.add_argument("--iterations", type=int, default=10,
                        help="Attention Round steps per layer (default 10; the library default is 100)")
    parser.add_argument("--damping", type=float, default=None, help="gptq: damping (default: the library's)")
    parser.add_argument("--target-bits", type=float, default=None,
                        help="gptq+sens / gptq+mq: bits per weight (default: the rtn variant's)")
    parser.add_argument("--block-tuning", default="{}",
                        help='gptq+bt: block-wise tuning options as JSON (default "{}": the library defaults)')
    parser.add_argument("--batch-size", type=int, default=4, help="calibration batch size (default 4)")
    parser.add_argument("--input-rotation", type=int, default=None,
                        help="Hadamard block of the input rotation (SplitQuantConfig.input_rotation; default: none)")
    parser.add_argument("--save-dir", default=None,
                        help="also save each packed model under DIR/int<bits>_g<group>_<method> (e.g. to start QAT from)")
    parser.add_argument("--eval-blocks", type=int, default=4)
    parser.add_argument("--eval-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on 2 shared cores 2-thread kernels were several times slower)")
    parser.add_argument("--output", default=None, help="JSON results (default benchmarks/results/calibration[_quick].json)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(RESULT_MARKER + json.dumps(run_one(json.loads(args.child))), flush=True)
        return 0
    if any(m in ("rtn+cl", "ar+cl") for m in args.methods) and "rtn" not in args.methods:
        parser.error("the +cl variants take the bits per weight of the rtn variant: keep rtn in --methods")
    if args.quick:
        args.bits, args.cal_samples, args.cal_len, args.iterations = [3], 2, 64, 2
        args.eval_blocks, args.eval_len = 1, 128
    output = Path(args.output or HERE / "results" / ("calibration_quick.json" if args.quick else "calibration.json"))
    common = {key: getattr(args, key) for key in ("group_size", "cal_samples", "cal_len", "iterations", "eval_blocks",
                                                  "eval_len", "threads", "damping", "batch_size", "save_dir",
                                                  "input_rotation")}
    common["block_tuning"] = json.loads(args.block_tuning)

    started = time.perf_counter()
    rows = [run_child({**common, "method": "float", "bits": 32})]
    log(f"float: perplexity {rows[0]['perplexity']:.3f}")
    for bits in args.bits:
        uniform_bpw = None
        for variant in [m for m in args.methods if bits > 2 or m not in ("rtn+cl", "ar+cl")]:
            target = args.target_bits if variant in ALLOCATIONS and args.target_bits else uniform_bpw
            if target is None and (variant.endswith("+cl") or variant in ALLOCATIONS):
                parser.error(f"{variant} needs --target-bits or the rtn variant before it")
            row = run_child({**common, "method": variant, "bits": bits, "target_bits": target})
            if variant == "rtn":
                uniform_bpw = row["bits_per_weight"]
            rows.append(row)
            log(f"INT{bits} {variant}: {row['bits_per_weight']:.3f} bits/weight, perplexity {row['perplexity']:.3f}, "
                f"quantize {row['quantize_seconds']:.1f} s, peak memory +{row['peak_memory_increase_mb']:.0f} MB "
                f"({time.perf_counter() - started:.0f} s elapsed)")

    total = time.perf_counter() - started
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "SmolLM2-135M-Instruct (assets.smollm2_path, float32 from the Q4_1 GGUF)",
        "eval": f"perplexity on {args.eval_blocks} x {args.eval_len} Wikipedia 'eval' tokens",
        "calibration": f"{args.cal_samples} x {args.cal_len} Wikipedia 'calibration' tokens, batch {args.batch_size}",
        "attention_round": {"iterations": args.iterations, "other options": "library defaults"},
        "group_size": args.group_size, "threads": args.threads, "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
        "total_seconds": total, "quick": args.quick, "each configuration": "a fresh subprocess",
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")

    print(f"SmolLM2-135M, {meta['eval']}; calibration {meta['calibration']}; Attention Round {args.iterations} "
          f"steps/layer; group size {args.group_size}; {args.threads} torch thread(s); total {total / 60:.1f} min\n")
    print("| config | bits/weight | perplexity | quantize time (s) | peak memory increase (MB) | "
          "layer MSE vs RTN |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        name = "float32" if row["method"] == "float" else f"INT{row['bits']} {row['method']}"
        if "recipe" in row:
            name += f" ({row['recipe']}, group {row['group_size']})"
        if "block_tuning" in row:
            name += f" {json.dumps(row['block_tuning'])}"
        if row.get("input_rotation"):
            name += f" rotated (Hadamard {row['input_rotation']})"
        if "bit_histogram" in row:
            name += " " + "/".join(f"{n}x{b}b" for b, n in row["bit_histogram"].items())
        mse = f"{row['mean_layer_mse_vs_rtn']:.3f}" if "mean_layer_mse_vs_rtn" in row else "-"
        seconds = f"{row['quantize_seconds']:.0f}" if "quantize_seconds" in row else "-"
        mem = f"{row['peak_memory_increase_mb']:.0f}" if "peak_memory_increase_mb" in row else "-"
        print(f"| {name} | {row['bits_per_weight']:.3f} | {row['perplexity']:.2f} | {seconds} | {mem} | {mse} |")
    print(f"\nraw results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
