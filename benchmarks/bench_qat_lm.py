"""Quantization-aware training of a causal LM (SmolLM2-135M) with the stock Trainer: PTQ against QAT
with and without distillation from the float model, and R2-Loss as a pre-step and during QAT.

One run = one row, written as JSON (``--output``); ``--summarize`` turns several into a markdown table
and a PNG of perplexity and training loss against optimizer steps and against wall time.

Modes (``--mode``):

* ``ptq``: post-training quantization only (``--init rtn``: min-max round-to-nearest; ``mse``: the
  MSE-clipped grid, the best data-free PTQ here; ``gptq``: the calibrated path of ``SplitQuantConfig.recipe``,
  ``rounding="gptq"`` on 16 x 512 calibration tokens; ``gptq-bt``: the same, then block-wise tuning with the
  library defaults, ``SplitQuantConfig(block_tuning={})``, the best post-training result). ``mse``, ``gptq``
  and ``gptq-bt`` leave their packed model in the cache; the QAT rows with the same ``--init`` start from it;
* ``qat``: QAT on the task loss (next-token cross-entropy) only;
* ``qat_kd``: QAT on the KL to the float model's logits (:func:`hf_splitquant.distillation_loss`,
  ``--alpha`` weights it against the cross-entropy);
* ``qat_kd_r2``: ``qat_kd`` plus R2-Loss on the quantized layers' latent float weights;
* ``ft_ptq`` / ``r2_ptq``: a short float fine-tune (the same data, seed and learning rate) without / with
  R2-Loss, then the same PTQ as ``ptq``: the control and the R2 pre-step.

QAT learns the step sizes (LSQ, initialised on the cached grid, so step 0 is the ``ptq --init mse`` model;
with ``--init gptq`` the QAT model is the packed GPTQ model itself, dequantized by ``prepare_qat``: step 0
computes exactly what the GPTQ model computes) at ``--scale-lr`` and, with ``--weight-lr``, the latent float weights; embeddings and norms stay
frozen. The fake-quant layers round onto the packed format's own grid; after training the model is
frozen to the packed format, its perplexity compared with the fake-quant model's, saved, reloaded with
plain ``from_pretrained`` and compared bit for bit.

Data: training blocks from the Wikipedia ``"calibration"`` articles, evaluation on ``--eval-blocks`` x
``--eval-len`` tokens of the ``"eval"`` articles (disjoint; the blocks the other benchmarks use). The
curve is measured on the first ``--curve-blocks`` evaluation blocks every ``--eval-every`` steps
(evaluation time is not counted in the training wall time). The machine's 1-minute load average is
recorded with every curve point: on a shared machine, wall time is inflated; steps and tokens are not.

Usage::

    python benchmarks/bench_qat_lm.py --mode ptq --bits 2 --group-size 64 --init mse --output r.json
    python benchmarks/bench_qat_lm.py --mode qat_kd --bits 2 --group-size 64 --minutes 10 --output k.json
    python benchmarks/bench_qat_lm.py --mode ptq --bits 3 --group-size 128 --init gptq --output g.json
    python benchmarks/bench_qat_lm.py --mode qat_kd --bits 3 --group-size 128 --init gptq --minutes 30 \
        --weight-lr 1e-5 --output gk.json
    python benchmarks/bench_qat_lm.py --mode qat_kd --bits 2 --group-size 64 --init gptq-bt --per-grid-step \
        --scale-lr 0.001 --weight-lr 0.02 --schedule cosine --max-steps 90 --minutes 30 --output bk.json
    python benchmarks/bench_qat_lm.py --summarize r.json k.json --md table.md --png curves.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

MODES = ("ptq", "qat", "qat_kd", "qat_kd_r2", "ft_ptq", "r2_ptq")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch: int = 2) -> float:
    """``exp`` of the mean next-token NLL over the blocks (each block scored on its own)."""
    from hf_splitquant import PackedLinear

    was_training = model.training
    model.eval()
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.set_weight_cache(True)
    nll, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch):
        ids = blocks[start : start + batch]
        n = ids.shape[0] * (ids.shape[1] - 1)
        nll += float(model(input_ids=ids, labels=ids).loss.double()) * n
        count += n
    model.train(was_training)
    return math.exp(nll / count)


#: --init values that start from a calibrated packed model (cached by ``--mode ptq``)
CALIBRATED = ("gptq", "gptq-bt")


def quant_config(opts: argparse.Namespace, qat: bool = False, clip: bool = True) -> Any:
    from hf_splitquant import SplitQuantConfig

    if opts.init in CALIBRATED and not qat:  # the calibrated recipe's settings at this width and group size
        return SplitQuantConfig(bits=opts.bits, group_size=opts.group_size, rounding="gptq",
                                block_tuning={} if opts.init == "gptq-bt" else None)
    return SplitQuantConfig(bits=opts.bits, group_size=opts.group_size,
                            clip="mse" if opts.init == "mse" and clip else None, qat=qat, qat_learn_scales=qat)


def grid_cache(opts: argparse.Namespace) -> Path:
    """Where ``--mode ptq --init mse|gptq`` leaves its packed model for the QAT rows to start from."""
    import splitquant_assets as assets

    return Path(assets.cache_dir()) / "bench_qat_lm" / f"smollm2_int{opts.bits}_g{opts.group_size}_{opts.init}"


def run(opts: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    import hf_splitquant
    import splitquant_assets as assets
    from hf_splitquant import (
        QATCallback,
        R2LossCallback,
        R2Regularizer,
        distillation_loss,
        freeze,
        prepare_qat,
        remove_autocast_forward,
    )
    from hf_splitquant.modeling import select_modules
    from hf_splitquant.qat import iter_fake_quant_modules, qat_parameter_groups

    hf_logging.set_verbosity_error()
    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    eval_blocks = assets.perplexity_token_blocks(tokenizer, opts.eval_blocks, opts.eval_len, part="eval")
    curve_blocks = eval_blocks[: opts.curve_blocks]
    row: dict[str, Any] = {"mode": opts.mode, "bits": opts.bits, "group_size": opts.group_size, "init": opts.init,
                           "options": {k: v for k, v in vars(opts).items() if k not in ("summarize",)}}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    start_load = os.getloadavg()[0]

    if opts.mode == "ptq":
        t0 = time.perf_counter()
        if opts.init in CALIBRATED:  # the calibration tokens bench_calibration.py uses (16 x 512)
            cal = assets.perplexity_token_blocks(tokenizer, 16, 512, part="calibration")
            hf_splitquant.quantize(model, quant_config(opts), calibration_data=cal,
                                   batch_size=2 if opts.init == "gptq-bt" else 4, progress=False)
        else:
            hf_splitquant.quantize(model, quant_config(opts), progress=False)
        row["quantize_seconds"] = time.perf_counter() - t0
        row["bits_per_weight"] = hf_splitquant.quantization_report(model).bits_per_weight
        if opts.init in ("mse", *CALIBRATED):  # the QAT rows start from these (calibration takes minutes)
            model.save_pretrained(grid_cache(opts))
        row["perplexity"] = perplexity(model, eval_blocks)
        row["load_average"] = [start_load, os.getloadavg()[0]]
        row["peak_rss_mb"] = peak_rss_mb()
        return row

    n_blocks = opts.train_blocks
    train = assets.perplexity_token_blocks(tokenizer, n_blocks, opts.seq_len, part="calibration")
    dataset = [{"input_ids": ids, "labels": ids} for ids in train]
    workdir = tempfile.mkdtemp(prefix="bench_qat_lm_")
    callbacks: list[Any] = []
    compute_loss_func = None
    loss_fn = None
    qat = opts.mode.startswith("qat")
    if qat:
        teacher = None
        if opts.mode != "qat":
            teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        cache = Path(opts.init_from) if opts.init_from else grid_cache(opts)
        if opts.init in CALIBRATED:
            if not cache.is_dir():
                raise SystemExit(f"--init {opts.init}: run `--mode ptq --init {opts.init}` with the same bits and group size "
                                 f"first (it writes {cache})")
            # the packed GPTQ model is the student: prepare_qat dequantizes it and keeps its stored grids,
            # so the codes at step 0 are GPTQ's, not a re-rounding of the float weights
            log(f"starting from the packed GPTQ model {cache}")
            row["init_from_cache"] = True
            model = AutoModelForCausalLM.from_pretrained(cache)
            prepare_qat(model, quant_config(opts, qat=True, clip=False))
        else:
            init_from = AutoModelForCausalLM.from_pretrained(cache) if opts.init == "mse" and cache.is_dir() else None
            if init_from is not None:
                log(f"initial grids from {cache}")
                row["init_from_cache"] = True
            # with cached grids, no clip search: the learned scales start from the cached ones
            prepare_qat(model, quant_config(opts, qat=True, clip=init_from is None), init_from=init_from)
            del init_from
        callbacks.append(QATCallback())
        groups = qat_parameter_groups(model, scale_lr=opts.scale_lr, weight_lr=opts.weight_lr,
                                      per_grid_step=opts.per_grid_step)
        if teacher is not None:
            loss_fn = distillation_loss(teacher, model, temperature=opts.temperature, alpha=opts.alpha)
            compute_loss_func = loss_fn
            row["teacher_mb"] = loss_fn.teacher_bytes / 2**20
        optimizer = torch.optim.AdamW(groups)
        row["trainable_parameters"] = sum(p.numel() for g in groups for p in g["params"])
    else:  # float fine-tune of the layers PTQ will quantize, then PTQ
        layers = [name for name, _ in select_modules(model, quant_config(opts))]
        for name, p in model.named_parameters():
            p.requires_grad_(name.rsplit(".", 1)[0] in layers)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opts.weight_lr)
        row["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if opts.mode in ("r2_ptq", "qat_kd_r2"):
        names = [n for n, _ in iter_fake_quant_modules(model)] if qat else layers
        reg = R2Regularizer(model, "linf", layers=names, lambda_=opts.r2_lambda, granularity="group",
                            group_size=opts.group_size)
        callbacks.append(R2LossCallback(reg, mode="decoupled"))

    curve: list[dict[str, Any]] = []
    # training time without the curve evaluations: wall seconds, and process CPU seconds (all threads), whose
    # value / --threads is the wall time the run would take on dedicated cores (the machine is shared)
    clock = {"train": 0.0, "last": time.perf_counter(), "eval": 0.0, "cpu": 0.0, "cpu_last": time.process_time()}
    tokens_per_step = opts.batch * opts.grad_accum * opts.seq_len

    class Curve(TrainerCallback):
        """Perplexity on the curve blocks every ``eval_every`` steps; stops at the time budget."""

        def _point(self, step: int, model: torch.nn.Module, loss: float | None = None) -> None:
            now = time.perf_counter()
            clock["train"] += now - clock["last"]
            clock["cpu"] += time.process_time() - clock["cpu_last"]
            point = {"step": step, "tokens": step * tokens_per_step, "train_seconds": round(clock["train"], 1),
                     "train_cpu_seconds": round(clock["cpu"], 1), "load1": os.getloadavg()[0]}
            if qat or step == 0:
                point["curve_ppl"] = perplexity(model, curve_blocks)
            if loss_fn is not None:
                point.update({f"train_{k}": v for k, v in loss_fn.pop_stats().items() if k != "tokens"})
            curve.append(point)
            log(f"{opts.mode} step {step}: {point}")
            clock["last"] = time.perf_counter()
            clock["cpu_last"] = time.process_time()
            clock["eval"] += clock["last"] - now

        def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
            self._point(0, model)

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
            if logs and "loss" in logs and curve:
                curve[-1].setdefault("logged_losses", []).append((state.global_step, logs["loss"]))

        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
            cpu = clock["cpu"] + time.process_time() - clock["cpu_last"]
            over = (cpu / opts.threads > opts.minutes * 60
                    or clock["train"] + time.perf_counter() - clock["last"] > opts.wall_minutes * 60)
            if state.global_step % opts.eval_every == 0 or over or state.global_step == args.max_steps:
                self._point(state.global_step, model)
            if over:
                control.should_training_stop = True

    callbacks.append(Curve())
    # transformers' "constant" schedule ignores warmup_steps; its warm-up twin does not
    schedule = "constant_with_warmup" if opts.schedule == "constant" and opts.warmup_steps else opts.schedule
    args = TrainingArguments(workdir, per_device_train_batch_size=opts.batch, gradient_accumulation_steps=opts.grad_accum,
                             max_steps=opts.max_steps, lr_scheduler_type=schedule, report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="steps", logging_steps=1, disable_tqdm=True,
                             seed=opts.seed, dataloader_num_workers=0, max_grad_norm=1.0,
                             gradient_checkpointing=opts.gradient_checkpointing, bf16=opts.bf16,
                             warmup_steps=opts.warmup_steps)
    trainer = Trainer(model, args, train_dataset=dataset, compute_loss_func=compute_loss_func,
                      optimizers=(optimizer, None), callbacks=callbacks)
    trainer.train()
    # with bf16=True Accelerate wraps forward in autocast for good; QATCallback removes that wrapper in the QAT
    # modes, and the fine-tuning modes (no QAT layers, no callback) need it gone as well before evaluating
    remove_autocast_forward(model)
    row["curve"] = curve
    row["losses"] = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    row["steps"] = trainer.state.global_step
    row["tokens_seen"] = row["steps"] * tokens_per_step
    row["train_seconds"] = clock["train"]
    row["train_cpu_seconds"] = clock["cpu"]
    row["dedicated_equivalent_seconds"] = clock["cpu"] / opts.threads
    row["eval_seconds_during_training"] = clock["eval"]
    row["load_average_mean"] = sum(p["load1"] for p in curve) / len(curve)
    row["peak_rss_mb"] = peak_rss_mb()
    if qat:
        if loss_fn is not None:
            loss_fn.detach()
            del teacher, loss_fn
            trainer.compute_loss_func = None
        model.eval()
        row["perplexity_fake_quant"] = perplexity(model, eval_blocks)
        probe = eval_blocks[:1]
        with torch.no_grad():
            fake_logits = model(probe).logits
        freeze(model)
        row["perplexity"] = perplexity(model, eval_blocks)
        row["frozen_vs_fake_quant_ppl_rel"] = row["perplexity"] / row["perplexity_fake_quant"] - 1
        with torch.no_grad():
            packed_logits = model(probe).logits
        row["frozen_vs_fake_quant_max_logit_diff"] = float((packed_logits - fake_logits).abs().max())
        model.save_pretrained(os.path.join(workdir, "packed"))
        reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "packed")).eval()
        with torch.no_grad():
            row["reload_bit_exact"] = bool(torch.equal(reloaded(probe).logits, packed_logits))
        row["packed_bytes"] = sum(f.stat().st_size for f in Path(workdir, "packed").glob("*.safetensors"))
    else:
        row["perplexity_float_after_finetune"] = perplexity(model, eval_blocks)
        for p in model.parameters():
            p.requires_grad_(False)
        for cb in callbacks:
            if isinstance(cb, R2LossCallback):
                row["r2_final"] = cb.history[-1]["r2"] if cb.history else None
        hf_splitquant.quantize(model, quant_config(opts), progress=False)
        row["perplexity"] = perplexity(model, eval_blocks)
    return row


# --------------------------------------------------------------------------------------------
# summary: markdown table and PNG
# --------------------------------------------------------------------------------------------


def label(row: dict[str, Any]) -> str:
    name = f"INT{row['bits']} g{row['group_size']} {row['mode']}"
    if row["mode"] == "ptq" or row.get("init") in CALIBRATED:
        name += f" ({row['init']})"
    if row.get("incomplete"):
        name += " (*)"
    return name


def summarize(files: list[str], md: str | None, png: str | None, float_ppl: float | None) -> str:
    rows = [json.loads(Path(f).read_text()) for f in files]
    floats = [r for r in rows if r.get("mode") == "float"]
    # the float reference on the same evaluation blocks as each row (the float row measures all of them
    # and the first 2, the blocks of the short training rows)
    float_by_blocks = {}
    if floats:
        float_by_blocks = {floats[0]["options"]["eval_blocks"] if "options" in floats[0] else 8:
                           floats[0]["perplexity"], 2: floats[0]["curve_ppl"]}
    float_ppl = float_ppl or (floats[0]["perplexity"] if floats else None)
    lines = ["| row | eval tokens | steps | tokens seen | train wall s (mean load1) | CPU s / threads | ppl at step 0 | "
             "ppl | x float | frozen vs fake | reload exact | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("mode") == "float":
            continue
        blocks = r["options"]["eval_blocks"]
        reference = float_by_blocks.get(blocks, float_ppl if blocks == 8 else None)
        ratio = f"{r['perplexity'] / reference:.2f}" if reference else "-"
        start = r.get("curve", [{}])[0].get("curve_ppl") if r["options"]["curve_blocks"] == blocks else None
        start_text = f"{start:.2f}" if start else "-"
        frozen = f"{100 * r['frozen_vs_fake_quant_ppl_rel']:+.3f}%" if "frozen_vs_fake_quant_ppl_rel" in r else "-"
        train = f"{r['train_seconds']:.0f} ({r['load_average_mean']:.1f})" if "train_seconds" in r else "-"
        extra = ""
        if "perplexity_float_after_finetune" in r:
            extra = f" (float after fine-tune: {r['perplexity_float_after_finetune']:.2f})"
        dedicated = f"{r['dedicated_equivalent_seconds']:.0f}" if "dedicated_equivalent_seconds" in r else "-"
        lines.append(f"| {label(r)} | {blocks} x {r['options']['eval_len']} | {r.get('steps', 0)} | "
                     f"{r.get('tokens_seen', 0)} | {train} | {dedicated} | {start_text} | "
                     f"{r['perplexity']:.2f}{extra} | {ratio} | {frozen} | {r.get('reload_bit_exact', '-')} | "
                     f"{r['peak_rss_mb']:.0f} |")
    notes = [f"(*) {label(r)}: {r['incomplete']}" for r in rows if r.get("incomplete")]
    text = "\n".join(lines) + "\n" + ("\n" + "\n\n".join(notes) + "\n" if notes else "")
    if float_by_blocks:
        text = "Float perplexity: " + ", ".join(f"{v:.3f} on {k} x 512 tokens" for k, v in float_by_blocks.items()) + \
            "\n\n" + text
    if md:
        Path(md).write_text(text)
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 2, figsize=(12, 9))
        for r in rows:
            points = [p for p in r.get("curve", []) if "curve_ppl" in p]
            if len(points) < 2:
                continue
            name = label(r)
            axes[0, 0].plot([p["step"] for p in points], [p["curve_ppl"] for p in points], marker="o", label=name)
            axes[0, 1].plot([p.get("train_cpu_seconds", 2 * p["train_seconds"]) / 120 for p in points], [p["curve_ppl"] for p in points], marker="o",
                            label=name)
            losses = r.get("losses", [])
            seconds = {p["step"]: p.get("train_cpu_seconds", 2 * p["train_seconds"]) / 2 for p in r["curve"]}
            axes[1, 0].plot([s for s, _ in losses], [v for _, v in losses], label=name, alpha=0.8)
            timed = [(seconds[s], v) for s, v in losses if s in seconds]
            axes[1, 1].plot([t / 60 for t, _ in timed], [v for _, v in timed], marker=".", label=name, alpha=0.8)
        for ax in axes[0]:
            ax.set_yscale("log")
            ax.set_ylabel("perplexity (curve blocks)")
            curve_ref = float_by_blocks.get(2, float_ppl)  # the curves are on the first 2 blocks
            if curve_ref:
                ax.axhline(curve_ref, color="k", ls="--", lw=1, label="float")
                ax.axhline(2 * curve_ref, color="grey", ls=":", lw=1, label="2x float")
        for ax in axes[1]:
            ax.set_ylabel("training loss (KL or CE per token)")
        for ax in (axes[0, 0], axes[1, 0]):
            ax.set_xlabel("optimizer steps")
        for ax in (axes[0, 1], axes[1, 1]):
            ax.set_xlabel("training minutes on 2 dedicated cores (process CPU time / 2)")
        axes[0, 0].legend(fontsize=7)
        fig.suptitle("SmolLM2-135M QAT with the stock Trainer")
        fig.tight_layout()
        fig.savefig(png, dpi=90)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=(*MODES, "float"), default="qat_kd")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--init", choices=("rtn", "mse", *CALIBRATED), default="mse",
                   help="gptq-bt: GPTQ then block-wise tuning (SplitQuantConfig.block_tuning defaults)")
    p.add_argument("--init-from", default=None,
                   help="with a calibrated --init: start from this saved packed model instead of the cached one "
                        "(for example one bench_calibration.py --save-dir wrote with other block-tuning options)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning-rate schedule; cosine decays to 0 at --max-steps (set it to the steps the budget allows)")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="linear warm-up of the rates over the first steps (at INT2 the first full-rate steps "
                        "threw the tuned model back: qat_lm.md, session 25)")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="training budget in dedicated-core minutes: process CPU time / --threads (evaluation not counted)")
    p.add_argument("--wall-minutes", type=float, default=60.0, help="hard stop on training wall time")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--train-blocks", type=int, default=512)
    p.add_argument("--scale-lr", type=float, default=1e-3)
    p.add_argument("--weight-lr", type=float, default=None)
    p.add_argument("--per-grid-step", action="store_true",
                   help="--scale-lr / --weight-lr in units of each layer's mean grid step (qat_parameter_groups)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--r2-lambda", type=float, default=1e-4)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true",
                   help="TrainingArguments(bf16=True): student and teacher forward under bf16 autocast (a CPU with "
                        "native bf16 runs a step faster); evaluation, freezing and the reload check stay float32")
    p.add_argument("--eval-blocks", type=int, default=8)
    p.add_argument("--eval-len", type=int, default=512)
    p.add_argument("--curve-blocks", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    p.add_argument("--summarize", nargs="+", default=None, metavar="JSON")
    p.add_argument("--md", default=None)
    p.add_argument("--png", default=None)
    p.add_argument("--float-ppl", type=float, default=None)
    opts = p.parse_args(argv)
    if opts.summarize:
        print(summarize(opts.summarize, opts.md, opts.png, opts.float_ppl))
        return 0
    t0 = time.perf_counter()
    if opts.mode == "float":
        torch.set_num_threads(opts.threads)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import splitquant_assets as assets

        path = assets.smollm2_path()
        blocks = assets.perplexity_token_blocks(AutoTokenizer.from_pretrained(path), opts.eval_blocks, opts.eval_len,
                                                part="eval")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        row = {"mode": "float", "perplexity": perplexity(model, blocks), "curve_ppl": perplexity(model, blocks[:2]),
               "peak_rss_mb": peak_rss_mb()}
    else:
        if opts.mode in ("ft_ptq", "r2_ptq") and opts.weight_lr is None:
            p.error(f"--mode {opts.mode} fine-tunes the float weights: give --weight-lr")
        row = run(opts)
    row["total_seconds"] = time.perf_counter() - t0
    row["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                      "date": datetime.datetime.now().isoformat(timespec="seconds")}
    text = json.dumps(row, indent=1)
    if opts.output:
        Path(opts.output).write_text(text)
    log(f"done: ppl {row['perplexity']:.3f} in {row['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
