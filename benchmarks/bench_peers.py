"""Peers in the same run: llm-compressor GPTQ and HQQ against our round-to-nearest on SmolLM2-135M.

Run it in the peers' own virtual environment (``make peers-install`` builds ``.venv-peers``: the CPU
torch 2.13.0, transformers 5.23.0, llm-compressor, hqq, this package and the asset packages)::

    .venv-peers/bin/python benchmarks/bench_peers.py --configs 3:128 2:64 --methods gptq
    .venv-peers/bin/python benchmarks/bench_peers.py --quick        # smoke run, a few minutes

Every configuration runs in a fresh Python process and is evaluated exactly as
``benchmarks/bench_calibration.py`` evaluates ours (its :func:`perplexity`): the same float32
SmolLM2-135M, perplexity on ``--eval-blocks`` x ``--eval-len`` tokens of the Wikipedia ``"eval"``
part, calibration on ``--cal-samples`` x ``--cal-len`` tokens of the ``"calibration"`` part
(disjoint articles). Every ``nn.Linear`` of the decoder layers is quantized, asymmetric, in groups
along the input dimension; the embeddings and the (tied) head stay in float.

Methods (``--methods``):

* ``float``: the float32 model (the reference of every ratio);
* ``rtn``: our plain round-to-nearest (``hf_splitquant.quantize`` with ``SplitQuantConfig(bits,
  group_size)``), the anchor that ties this run to ``benchmarks/results/calibration_*.json``;
* ``gptq``: llm-compressor's ``GPTQModifier`` through ``oneshot`` with its defaults (damping 0.01,
  static activation order, block 128), on the same calibration tokens;
* ``ours-gptq-rot``: our ``rounding="gptq"`` with ``input_rotation=64`` (the settings of the ``w4`` / ``w3``
  recipes at the configuration's width and group), on the same calibration tokens; the peers' row and ours
  then come from one invocation;
* ``hqq``: HQQ's ``HQQLinear`` with ``BaseQuantizeConfig(nbits, group_size)`` (its default
  optimiser, axis 1); the dequantized weights are put back into the float layers for evaluation.

Bits per weight count the same things for all: ``bits`` per code plus, per group, an fp16 scale and
the zero point as each method's own format stores it (ours: uint8; llm-compressor: an integer
packed at the code width; HQQ: a floating-point zero in its compute dtype, counted as fp16). Groups
that do not divide a row are counted as whole groups (``ceil``), except HQQ's, which run across
rows (it groups the flattened weight). The peers' own packed formats also spend 3.2 bits per 3-bit
code (ten codes in an int32); that is not counted here.

Results are merged into ``--output`` (rows keyed by method, bits and group size; a rerun replaces
its rows), and the markdown table of everything in it is written next to it (``.md``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULT_MARKER = "@@BENCH_PEERS_RESULT@@"
METHODS = ("float", "rtn", "gptq", "hqq", "ours-gptq-rot")
LABELS = {"float": "float32", "rtn": "RTN (ours)", "gptq": "GPTQ (llm-compressor)", "hqq": "HQQ",
          "ours-gptq-rot": "GPTQ rotated (ours)"}
ZERO_POINT_BITS = {"rtn": "uint8 (8 bits)", "ours-gptq-rot": "uint8 (8 bits)", "gptq": "integer packed at the code width",
                   "hqq": "floating point (counted as fp16)"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` inside the decoder layers (``model.model.layers``), by qualified name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"}


def grouped_bits_per_weight(shapes: list[tuple[int, int]], bits: int, group_size: int, zero_bits: int,
                            scale_bits: int = 16, groups_span_rows: bool = False) -> float:
    """Stored bits per weight of grouped asymmetric codes: codes + (scale + zero point) per group.

    ``groups_span_rows``: groups cut the flattened weight (HQQ), so there are ``numel / group_size``
    of them; otherwise each row holds ``ceil(in_features / group_size)`` groups.
    """
    total_bits = total_weights = 0
    for out_features, in_features in shapes:
        numel = out_features * in_features
        groups = math.ceil(numel / group_size) if groups_span_rows else \
            out_features * math.ceil(in_features / group_size)
        total_bits += numel * bits + groups * (scale_bits + zero_bits)
        total_weights += numel
    return total_bits / total_weights


def max_levels_per_group(weight: torch.Tensor, group_size: int, span_rows: bool = False) -> int:
    """The most distinct values in any group of ``weight`` (a check that it really is on a b-bit grid)."""
    w = weight.detach().float()
    groups = w.reshape(-1, group_size) if span_rows else w[:, : (w.shape[1] // group_size) * group_size].reshape(
        -1, group_size)
    # distinct values per row of ``groups``: sort, count the steps
    s = groups.sort(dim=1).values
    return int(((s[:, 1:] != s[:, :-1]).sum(dim=1) + 1).max())


def quantize_gptq(model: torch.nn.Module, bits: int, group_size: int, cal_blocks: torch.Tensor,
                  job: dict[str, Any]) -> dict[str, Any]:
    """llm-compressor ``GPTQModifier`` via ``oneshot`` with its defaults, on our calibration tokens."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group_size)
    modifier = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                            ignore=["lm_head"], bypass_divisibility_checks=job.get("gptq_bypass", False))
    if job.get("gptq_damping") is not None:  # a diagnostic row; the default (0.01) is the peer as users run it
        modifier.dampening_frac = job["gptq_damping"]
    dataset = Dataset.from_dict({"input_ids": cal_blocks.tolist(),
                                 "attention_mask": torch.ones_like(cal_blocks).tolist()})
    oneshot(model=model, dataset=dataset, recipe=[modifier], num_calibration_samples=cal_blocks.shape[0],
            max_seq_length=cal_blocks.shape[1], shuffle_calibration_samples=False, batch_size=job["gptq_batch"])
    return {"dampening_frac": modifier.dampening_frac, "actorder": str(modifier.actorder),
            "block_size": modifier.block_size, "bypass_divisibility_checks": modifier.bypass_divisibility_checks}


def quantize_hqq(model: torch.nn.Module, bits: int, group_size: int) -> dict[str, Any]:
    """HQQ with its default optimiser, layer by layer; the dequantized weight replaces the float one."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    for module in decoder_linears(model).values():
        # HQQLinear's forward runs its own kernels (fp16-minded); evaluate its dequantized weight instead
        layer = HQQLinear(module, config, compute_dtype=torch.float32, device="cpu", del_orig=False)
        with torch.no_grad():
            module.weight.copy_(layer.dequantize().reshape(module.weight.shape).to(module.weight.dtype))
        del layer
    return {"weight_quant_params": {k: v for k, v in config["weight_quant_params"].items()
                                    if isinstance(v, (int, float, bool, str, type(None)))}}


def label(job: dict[str, Any]) -> str:
    """The row's series name (a GPTQ damping other than llm-compressor's default is its own series)."""
    if job["method"] == "gptq" and job.get("gptq_damping") is not None:
        return f"GPTQ (llm-compressor, damping {job['gptq_damping']:g})"
    return LABELS[job["method"]]


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this (fresh) process: quantize, check, evaluate."""
    torch.set_num_threads(job["threads"])
    sys.path.insert(0, str(HERE))
    # the model and evaluation of our calibration benchmark, unchanged
    from bench_calibration import load_smollm2, perplexity

    import splitquant_assets as assets

    tokenizer, eval_blocks, model = load_smollm2(job["eval_blocks"], job["eval_len"])
    method, bits, group_size = job["method"], job["bits"], job["group_size"]
    row: dict[str, Any] = {"method": method, "label": label(job), "bits": bits, "group_size": group_size,
                           "threads": torch.get_num_threads(), "load_average_start": os.getloadavg()}
    linears = decoder_linears(model)
    shapes = [tuple(m.weight.shape) for m in linears.values()]
    row["quantized_layers"] = len(shapes)
    if method == "float":
        row["bits_per_weight"] = 32.0
    else:
        t0 = time.perf_counter()
        if method in ("rtn", "ours-gptq-rot"):
            import hf_splitquant
            from hf_splitquant import SplitQuantConfig, quantization_report

            if method == "rtn":
                hf_splitquant.quantize(model, SplitQuantConfig(bits=bits, group_size=group_size), progress=False)
            else:  # the w4 / w3 recipe settings at this width and group, on the peers' calibration tokens
                cal_blocks = assets.perplexity_token_blocks(tokenizer, job["cal_samples"], job["cal_len"],
                                                            part="calibration")
                config = SplitQuantConfig(bits=bits, group_size=group_size, rounding="gptq", input_rotation=64)
                hf_splitquant.quantize(model, config, calibration_data=cal_blocks, batch_size=4, progress=False)
            row["quantize_seconds"] = time.perf_counter() - t0
            report = quantization_report(model)
            row["bits_per_weight"] = report.bits_per_weight
            row["quantized_layers"] = len(report.layers)
            # our own report, cross-checked against the formula the peers are counted with
            row["bits_per_weight_formula"] = grouped_bits_per_weight(shapes, bits, group_size, zero_bits=8)
        else:
            cal_blocks = assets.perplexity_token_blocks(tokenizer, job["cal_samples"], job["cal_len"],
                                                        part="calibration")
            if method == "gptq":
                import llmcompressor

                row["peer_version"] = f"llmcompressor {llmcompressor.__version__}"
                row["settings"] = quantize_gptq(model, bits, group_size, cal_blocks, job)
                zero_bits, span = bits, False
            else:
                import hqq

                row["peer_version"] = f"hqq {getattr(hqq, '__version__', '?')}"
                row["settings"] = quantize_hqq(model, bits, group_size)
                zero_bits, span = 16, True
            row["quantize_seconds"] = time.perf_counter() - t0
            row["bits_per_weight"] = grouped_bits_per_weight(shapes, bits, group_size, zero_bits=zero_bits,
                                                             groups_span_rows=span)
            # the effective weights really lie on a 2^bits-level grid per group (checked on every layer)
            levels = 0
            for module in decoder_linears(model).values():
                weight = getattr(module, "weight", None)
                if weight is not None:
                    levels = max(levels, max_levels_per_group(weight, group_size, span_rows=span))
            row["max_levels_per_group"] = levels
        row["zero_point"] = ZERO_POINT_BITS[method]
    t0 = time.perf_counter()
    row["perplexity"] = perplexity(model, eval_blocks)
    row["eval_seconds"] = time.perf_counter() - t0
    row["load_average_end"] = os.getloadavg()
    return row


def run_child(job: dict[str, Any], log_dir: Path | None) -> dict[str, Any]:
    """:func:`run_one` in a fresh Python process; a failure becomes a row.

    llm-compressor refuses a group size that does not divide every layer's input width (SmolLM2's
    576-input layers with groups of 128): the refusal is recorded and the configuration rerun with its
    ``bypass_divisibility_checks=True`` (the last group of each row is then narrower).
    """
    row = _run_child(job, log_dir)
    if job["method"] == "gptq" and "not divisible by group_size" in row.get("error", "") and \
            not job.get("gptq_bypass"):
        log("  refused (group size does not divide 576); rerunning with bypass_divisibility_checks=True")
        retry = _run_child({**job, "gptq_bypass": True}, log_dir)
        retry["refused_by_default"] = row["error"]
        return retry
    return row


def _run_child(job: dict[str, Any], log_dir: Path | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if log_dir is not None:
        name = f"{job['method']}_int{job['bits']}_g{job['group_size']}{'_bypass' if job.get('gptq_bypass') else ''}.log"
        (log_dir / name).write_text(result.stdout[-20000:] + "\n--- stderr ---\n" + result.stderr[-50000:])
    warnings = sorted({line.split("|")[-1].strip()[:300] for line in result.stderr.splitlines()
                       if "requires strict division" in line or "Hessian inversion failed" in line})
    for line in result.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            row = json.loads(line[len(RESULT_MARKER):])
            if warnings:
                row["peer_warnings"] = warnings
            return row
    tail = (result.stderr or result.stdout).strip().splitlines()
    error = next((ln for ln in reversed(tail) if "Error" in ln), tail[-1] if tail else "no output")
    log(f"  failed: {error}")
    return {"method": job["method"], "label": label(job), "bits": job["bits"],
            "group_size": job["group_size"], "error": error[:500], "peer_warnings": warnings,
            "seconds_until_failure": time.perf_counter() - t0}


def key(row: dict[str, Any]) -> tuple[str, int, int | None]:
    return row["label"], row["bits"], row.get("group_size") if row["method"] != "float" else None


def write_markdown(data: dict[str, Any], path: Path) -> None:
    """The table of every row in ``data`` (ratios to the float row)."""
    rows = data["rows"]
    float_ppl = next((r["perplexity"] for r in rows if r["method"] == "float"), None)
    meta = data["meta"]
    lines = [f"# Peers in the same run: SmolLM2-135M ({meta['eval']}; calibration {meta['calibration']})", "",
             "Every Linear of the decoder layers quantized, asymmetric, groups along the input; embeddings and "
             "head in float. Bits per weight: codes + fp16 scale + zero point per group (zero point as each "
             "format stores it: ours uint8, llm-compressor packed at the code width, HQQ a float counted as "
             "fp16). Each configuration in a fresh process (the run is several invocations, each merging "
             "its rows into the JSON): " + ", ".join(f"`{c}`" for c in meta.get("commands", [meta.get("command")]))
             + ".", "",
             "| config | method | bits/weight | perplexity | x float | quantize (s) | threads | load avg | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(METHODS)}
    for row in sorted(rows, key=lambda r: (r["method"] != "float", -r["bits"], -(r.get("group_size") or 0),
                                           order.get(r["method"], 9))):
        config = "float32" if row["method"] == "float" else f"INT{row['bits']} g{row['group_size']}"
        if "error" in row:
            note = f"failed: {row['error'][:160]}"
            if "refused_by_default" in row:
                note = f"refused (group size does not divide 576 inputs); with bypass_divisibility_checks=True: {note}"
            lines.append(f"| {config} | {row['label']} | - | - | - | - | - | - | {note} |")
            continue
        ratio = f"{row['perplexity'] / float_ppl:.3g}x" if float_ppl else "-"
        secs = f"{row['quantize_seconds']:.0f}" if "quantize_seconds" in row else "-"
        load = f"{row['load_average_start'][0]:.1f}-{row['load_average_end'][0]:.1f}"
        note = "; ".join(row.get("peer_warnings", []))[:200]
        if "refused_by_default" in row:
            note = "refused by default (group size does not divide 576 inputs); run with " \
                   "bypass_divisibility_checks=True"
        lines.append(f"| {config} | {row['label']} | {row['bits_per_weight']:.3f} | {row['perplexity']:.2f} | "
                     f"{ratio} | {secs} | {row['threads']} | {load} | {note} |")
    lines += ["", f"Versions: {meta.get('versions')}. Raw numbers: `{path.with_suffix('.json').name}`."]
    path.write_text("\n".join(lines) + "\n")


def parse_config(text: str) -> tuple[int, int]:
    bits, _, group = text.partition(":")
    return int(bits), int(group)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "hqq"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="llm-compressor GPTQ and HQQ vs our RTN on SmolLM2-135M")
    parser.add_argument("--quick", action="store_true", help="smoke run: INT3 g64, tiny data")
    parser.add_argument("--configs", nargs="+", default=["3:128", "2:64", "4:128", "3:64", "4:64"],
                        help="BITS:GROUP ... (llm-compressor refuses g128 on SmolLM2: g64 is its nearest point)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--cal-samples", type=int, default=16)
    parser.add_argument("--cal-len", type=int, default=512)
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--eval-len", type=int, default=512)
    parser.add_argument("--gptq-batch", type=int, default=4, help="llm-compressor calibration batch size")
    parser.add_argument("--gptq-damping", type=float, default=None,
                        help="llm-compressor dampening_frac (default: its own, 0.01); rows get their own series")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: 2, or 1 when the 1-minute load average exceeds the cores)")
    parser.add_argument("--output", default=None, help="JSON (default benchmarks/results/peers_smollm2[_quick].json)")
    parser.add_argument("--log-dir", default="out/peers_logs", help="each child's output (default out/peers_logs)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(RESULT_MARKER + json.dumps(run_one(json.loads(args.child))), flush=True)
        return 0
    if args.quick:
        args.configs, args.cal_samples, args.cal_len, args.eval_blocks, args.eval_len = ["3:64"], 2, 64, 1, 128
    threads = args.threads or (1 if os.getloadavg()[0] > (os.cpu_count() or 1) else 2)
    output = Path(args.output or HERE / "results" / ("peers_smollm2_quick.json" if args.quick else
                                                     "peers_smollm2.json"))
    output.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    common = {"cal_samples": args.cal_samples, "cal_len": args.cal_len, "eval_blocks": args.eval_blocks,
              "eval_len": args.eval_len, "threads": threads, "gptq_batch": args.gptq_batch,
              "gptq_damping": args.gptq_damping}
    meta = {"model": "SmolLM2-135M-Instruct (assets.smollm2_path, float32 from the Q4_1 GGUF)",
            "eval": f"perplexity on {args.eval_blocks} x {args.eval_len} Wikipedia 'eval' tokens",
            "calibration": f"{args.cal_samples} x {args.cal_len} Wikipedia 'calibration' tokens",
            "cpu_count": os.cpu_count(), "versions": versions(), "each configuration": "a fresh subprocess",
            "command": " ".join(["benchmarks/bench_peers.py", *(argv if argv is not None else sys.argv[1:])])}
    data: dict[str, Any] = {"meta": meta, "rows": []}
    if output.exists():
        old = json.loads(output.read_text())
        if old["meta"].get("eval") != meta["eval"] or old["meta"].get("calibration") != meta["calibration"]:
            parser.error(f"{output} holds results on other data ({old['meta'].get('eval')}); pick another --output")
        data["rows"] = old["rows"]
        meta["commands"] = [*old["meta"].get("commands", [old["meta"].get("command")]), meta["command"]]
    else:
        meta["commands"] = [meta["command"]]

    def record(row: dict[str, Any]) -> None:
        data["rows"] = [r for r in data["rows"] if key(r) != key(row)] + [row]
        meta["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        output.write_text(json.dumps(data, indent=2) + "\n")
        write_markdown(data, output.with_suffix(".md"))

    jobs = []
    if "float" in args.methods and not any(r["method"] == "float" for r in data["rows"]):
        jobs.append({"method": "float", "bits": 32, "group_size": None})
    for bits, group_size in map(parse_config, args.configs):
        jobs += [{"method": m, "bits": bits, "group_size": group_size} for m in args.methods if m != "float"]
    started = time.perf_counter()
    for job in jobs:
        log(f"{job['method']} INT{job['bits']} g{job['group_size']}: {threads} thread(s), load average "
            f"{os.getloadavg()[0]:.1f} ...")
        row = run_child({**common, **job}, log_dir)
        record(row)
        if "error" not in row:
            log(f"  {row['bits_per_weight']:.3f} bits/weight, perplexity {row['perplexity']:.3f}, quantize "
                f"{row.get('quantize_seconds', 0):.0f} s ({time.perf_counter() - started:.0f} s elapsed)")
    print(output.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
