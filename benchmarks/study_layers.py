"""Layer-level study of rounding and clipping methods on real SmolLM2-135M layers: error on the
calibration (fit) data AND on held-out data, relative to round-to-nearest.

For a handful of real layers (default ``layers.5`` q/v/o/down_proj and ``layers.20`` up_proj) the
inputs of the FLOAT model are collected with forward hooks and summed into ``H = X^T X``:

* fit: ``--fit-blocks`` x ``--block-len`` tokens of the Wikipedia ``"calibration"`` part
  (``assets.perplexity_token_blocks``, as ``benchmarks/bench_calibration.py`` calibrates);
* held-out: as many blocks of the ``"eval"`` part (other articles, never used for fitting).

Every method chooses a grid and codes from the fit ``H`` only; the layer output error
``|X (W_q - W)^T|^2 = tr(D H D^T)`` is then measured with both ``H`` and divided by RTN's. Methods:

* ``rtn``: round-to-nearest on the min-max grid; ``mse_clip``: the MSE clip search (``clip="mse"``);
  ``out_clip``: the output-aware clip search (:mod:`hf_splitquant.methods.output_clip`);
* ``gptq@d``: GPTQ error feedback on the min-max grid (:mod:`hf_splitquant.methods.gptq`) with
  relative damping ``d``; ``mse_clip+gptq@d`` / ``out_clip+gptq@d``: the same on the clipped grids;
* ``ar``: Attention Round (:mod:`hf_splitquant.methods.attention_round`, defaults, 100 steps);
  ``ar<-gptq@0.1``: AR started from GPTQ's codes (``init_codes``); ``ar(damped@cv)<-out_clip+gptq@cv``:
  AR on the output-clipped grid, started from GPTQ's codes there, whose objective uses the damped ``H``
  (a regulariser against overfitting);
* ``...@cv``: the damping chosen per layer by 2-fold cross-validation on the fit tokens
  (:func:`hf_splitquant.methods.gptq.select_damping`; the fit ``H`` is kept as two halves);
  ``out_clip+gptq@1 (no act_order)``: columns in their natural order. The JSON also holds the
  quantiles of the output-aware clip's shrink factors (``clip_factors``).

Widths: INT2 g64, INT3 g128, INT4 g128 (asymmetric, fp16 scales). Seconds are per layer, one thread.

Usage::

    PYTHONPATH=. HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/study_layers.py       # ~10 min
    ... python benchmarks/study_layers.py --quick                                        # smoke run

Writes ``benchmarks/results/layer_study.json`` and ``.md`` (``--quick``: ``layer_study_quick.*``) and
prints the markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_LAYERS = ("layers.5.self_attn.q_proj", "layers.5.self_attn.v_proj", "layers.5.self_attn.o_proj",
                  "layers.5.mlp.down_proj", "layers.20.mlp.up_proj")
WIDTHS = ((2, 64), (3, 128), (4, 128))  # (bits, group size)
DAMPINGS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Stop(Exception):
    """Raised after the last watched layer: the rest of the model is not needed."""


def collect_hessians(model: torch.nn.Module, blocks: torch.Tensor, names: list[str],
                     batch: int = 2) -> dict[str, tuple[torch.Tensor, int]]:
    """``(H = X^T X in float64, token count)`` of every named layer's inputs over the token blocks."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Callable:
        def run(module: torch.nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.t() @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return run

    full = {n: m for n, m in modules.items() if any(n.endswith(want) for want in names)}
    if len(full) != len(names):
        raise ValueError(f"layers not found: wanted {names}, found {sorted(full)}")
    handles = [m.register_forward_hook(hook(n)) for n, m in full.items()]
    last = max(int(n.split("layers.")[1].split(".")[0]) for n in full)
    layers = model.model.layers

    def stop(module: torch.nn.Module, args: tuple, output: Any) -> None:
        raise _Stop

    handles.append(layers[last].register_forward_hook(stop))
    try:
        with torch.inference_mode():
            for start in range(0, blocks.shape[0], batch):
                with contextlib.suppress(_Stop):
                    model(input_ids=blocks[start:start + batch])
    finally:
        for h in handles:
            h.remove()
    short = {n: next(w for w in names if n.endswith(w)) for n in full}
    return {short[n]: (sums[n], counts[n]) for n in full}


def clip_factors(weight: torch.Tensor, grid: Any, spec: Any) -> dict[str, float]:
    """Quantiles of the shrink factor each group of an (asymmetric) clipped grid got, and the share below 0.5."""
    from hf_splitquant.quant.grid import group_view

    gv = group_view(weight.float(), spec.group_size)
    full = gv.amax(-1).clamp(min=0) - gv.amin(-1).clamp(max=0)
    factor = (grid.state["weight_scale"].float() * (2**spec.bits - 1) / full).flatten()
    q = torch.quantile(factor, torch.tensor([0.1, 0.5, 0.9])).tolist()
    return {"p10": q[0], "p50": q[1], "p90": q[2], "below_0.5": float((factor < 0.5).float().mean())}


def study_layer(weight: torch.Tensor, folds: list[torch.Tensor], h_held: torch.Tensor, count: int, bits: int,
                group: int, ar_iterations: int, dampings: tuple[float, ...]) -> list[dict[str, Any]]:
    """All methods on one layer at one width: rows with fit / held-out objective and seconds.

    ``folds``: the ``X^T X`` of disjoint parts of the fit tokens (their sum is the fit ``H``), for the
    cross-validated choice of the damping.
    """
    from hf_splitquant.methods import element_grid
    from hf_splitquant.methods.attention_round import attention_round
    from hf_splitquant.methods.gptq import (
        DAMPING_CANDIDATES,
        damp_hessian,
        gptq_round,
        hessian_objective,
        select_damping,
    )
    from hf_splitquant.methods.output_clip import output_clip_grid
    from hf_splitquant.spec import LayerSpec

    out_f, in_f = weight.shape
    spec = LayerSpec(in_features=in_f, out_features=out_f, bits=bits, group_size=group, has_bias=False)
    mse_spec = LayerSpec(in_features=in_f, out_features=out_f, bits=bits, group_size=group, has_bias=False,
                         clip="mse")
    h_fit = sum(folds)
    h32 = h_fit.float()
    rows: list[dict[str, Any]] = []

    def record(method: str, grid: Any, codes: torch.Tensor, seconds: float, **extra: Any) -> None:
        values = grid.values(codes)
        rows.append({"method": method, "fit": hessian_objective(values, weight, h_fit),
                     "held": hessian_objective(values, weight, h_held), "seconds": seconds, **extra})

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        t0 = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - t0

    grid, t_grid = timed(lambda: element_grid(weight, spec))
    record("rtn", grid, grid.nearest_codes(), t_grid)
    mse_grid, t_mse = timed(lambda: element_grid(weight, mse_spec))
    record("mse_clip", mse_grid, mse_grid.nearest_codes(), t_mse)
    out_grid, t_out = timed(lambda: output_clip_grid(weight, spec, h32))
    record("out_clip", out_grid, out_grid.nearest_codes(), t_out, clip_factors=clip_factors(weight, out_grid, spec))

    gptq_codes: dict[tuple[str, float], tuple[torch.Tensor, float]] = {}
    grids = {"": (grid, t_grid), "mse_clip+": (mse_grid, t_mse), "out_clip+": (out_grid, t_out)}
    for prefix, (g, t_g) in grids.items():
        for d in (dampings if prefix != "mse_clip+" else (0.3, 1.0)):
            (codes, _), t = timed(lambda g=g, d=d: gptq_round(g, h32, damping=d))
            gptq_codes[(prefix, d)] = (codes, t + t_g)
            record(f"{prefix}gptq@{d:g}", g, codes, t + t_g, damping=d)
        if prefix != "out_clip+":
            continue  # (on the plain grid the choice is the same per layer: 0.1-0.3, down_proj 1.0)
        # damping chosen per layer by 2-fold cross-validation on the fit tokens, then refitted on all
        (best, scores), t_cv = timed(lambda g=g: select_damping(g, folds, DAMPING_CANDIDATES))
        codes, t = gptq_codes.get((prefix, best)) or (None, 0.0)
        if codes is None:
            (codes, _), t = timed(lambda g=g, best=best: gptq_round(g, h32, damping=best))
            t += t_g
        gptq_codes[(prefix, "cv")] = (codes, t + t_cv)
        record(f"{prefix}gptq@cv", g, codes, t + t_cv, damping=best, cv_scores=scores)

    (codes, _), t = timed(lambda: gptq_round(out_grid, h32, damping=1.0, act_order=False))
    record("out_clip+gptq@1 (no act_order)", out_grid, codes, t + t_out, damping=1.0)

    def ar(g: Any, init: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        codes, _ = attention_round(g, h, count, {"iterations": ar_iterations}, init_codes=init)
        return codes

    codes, t = timed(lambda: ar(grid, None, h32))
    record("ar", grid, codes, t + t_grid)
    init, t_init = gptq_codes[("", 0.1)]
    codes, t = timed(lambda: ar(grid, init, h32))
    record("ar<-gptq@0.1", grid, codes, t + t_init)
    init, t_init = gptq_codes[("out_clip+", "cv")]
    d_cv = next(r["damping"] for r in rows if r["method"] == "out_clip+gptq@cv")
    damped = damp_hessian(h_fit, d_cv).float()
    codes, t = timed(lambda: ar(out_grid, init, damped))
    record("ar(damped@cv)<-out_clip+gptq@cv", out_grid, codes, t + t_init, damping=d_cv)

    base = rows[0]
    for r in rows:
        r["fit_vs_rtn"] = r["fit"] / base["fit"]
        r["held_vs_rtn"] = r["held"] / base["held"]
    return rows


def _cell(row: dict[str, Any]) -> str:
    """Held-out ratio; for the cross-validated rows also the damping chosen."""
    text = f"{row['held_vs_rtn']:.3f}"
    return text + f" ({row['damping']:g})" if "@cv" in row["method"] else text


def markdown(results: list[dict[str, Any]], layers: list[str], meta: dict[str, Any]) -> str:
    lines = [
        "# Layer study: output error relative to RTN, fit vs held-out",
        "",
        f"SmolLM2-135M float inputs; H from {meta['fit_blocks']} x {meta['block_len']} Wikipedia calibration "
        f"tokens (fit) and {meta['held_blocks']} x {meta['block_len']} eval-part tokens (held-out); "
        f"AR {meta['ar_iterations']} steps; {meta['threads']} thread(s). Values: tr(D H D^T) / RTN's "
        "(lower is better; < 1 beats RTN). `fit`/`held`: mean over layers; per layer: held-out. "
        "`s/layer`: mean seconds per layer, including the grid search. `@cv`: damping chosen per layer "
        "(in brackets) by 2-fold cross-validation on the fit tokens (`gptq.select_damping`).",
        "",
        f"Command: `{meta['command']}` ({meta['total_seconds']:.0f} s in all)",
        "",
    ]
    short = [name.replace("layers.", "L").replace("self_attn.", "").replace("mlp.", "") for name in layers]
    for bits, group in meta["widths"]:
        lines += [f"## INT{bits} g{group}", "",
                  "| method | fit | held | " + " | ".join(short) + " | s/layer |",
                  "|---|---:|---:|" + "---:|" * len(short) + "---:|"]
        rows = [r for r in results if r["bits"] == bits and r["group_size"] == group]
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = {r["layer"]: r for r in rows if r["method"] == method}
            fit = sum(r["fit_vs_rtn"] for r in mine.values()) / len(mine)
            held = sum(r["held_vs_rtn"] for r in mine.values()) / len(mine)
            secs = sum(r["seconds"] for r in mine.values()) / len(mine)
            per = " | ".join(_cell(mine[name]) for name in layers)
            lines.append(f"| {method} | {fit:.3f} | {held:.3f} | {per} | {secs:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fit vs held-out layer error of rounding/clipping methods")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 layers, INT3 only, few tokens")
    parser.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS))
    parser.add_argument("--fit-blocks", type=int, default=8)
    parser.add_argument("--held-blocks", type=int, default=8)
    parser.add_argument("--block-len", type=int, default=256)
    parser.add_argument("--ar-iterations", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="JSON path (the .md goes next to it)")
    args = parser.parse_args(argv)
    widths = list(WIDTHS)
    if args.quick:
        args.layers = args.layers[:2]
        args.fit_blocks = args.held_blocks = 2
        args.block_len, args.ar_iterations = 64, 5
        widths = [(3, 128)]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import splitquant_assets as assets

    hf_logging.set_verbosity_error()
    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    fit_blocks = assets.perplexity_token_blocks(tokenizer, args.fit_blocks, args.block_len, part="calibration")
    held_blocks = assets.perplexity_token_blocks(tokenizer, args.held_blocks, args.block_len, part="eval")
    t_start = t0 = time.perf_counter()
    half = args.fit_blocks // 2
    folds = [collect_hessians(model, fit_blocks[:half], args.layers),
             collect_hessians(model, fit_blocks[half:], args.layers)]
    held = collect_hessians(model, held_blocks, args.layers)
    log(f"statistics collected in {time.perf_counter() - t0:.1f} s")
    modules = dict(model.named_modules())
    results: list[dict[str, Any]] = []
    for name in args.layers:
        weight = next(m for n, m in modules.items() if n.endswith(name)).weight.detach().float().clone()
        count = sum(fold[name][1] for fold in folds)
        hessians, h_held = [fold[name][0] for fold in folds], held[name][0]
        for bits, group in widths:
            t1 = time.perf_counter()
            rows = study_layer(weight, hessians, h_held, count, bits, group, args.ar_iterations, DAMPINGS)
            for r in rows:
                r.update(layer=name, bits=bits, group_size=group)
            results += rows
            best = min(rows, key=lambda r: r["held_vs_rtn"])
            log(f"{name} INT{bits} g{group}: {time.perf_counter() - t1:.1f} s; best held-out {best['method']} "
                f"{best['held_vs_rtn']:.3f}")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "platform": platform.platform(), "threads": args.threads,
        "fit_blocks": args.fit_blocks, "held_blocks": args.held_blocks, "block_len": args.block_len,
        "ar_iterations": args.ar_iterations, "widths": widths, "layers": args.layers,
        "command": "python benchmarks/study_layers.py" + (" --quick" if args.quick else ""),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    text = markdown(results, args.layers, meta)
    output = Path(args.output or HERE / "results" / ("layer_study_quick.json" if args.quick else "layer_study.json"))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    output.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
