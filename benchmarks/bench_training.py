"""Training benchmark: R2-Loss fine-tuning then PTQ, and QAT, on all-MiniLM-L6-v2 + fine-food reviews.

What it measures (offline, CPU):

1. Fine-tune all-MiniLM-L6-v2 (``splitquant_assets.minilm_path()``) with a new 2-way
   classification head on the Amazon fine-food reviews (``assets.finefood_reviews``; label
   ``great`` vs ``other``) with the stock ``Trainer``: once plainly and once with each R2 variant
   (``R2LossCallback``; same seed, data order and steps).
2. Post-training quantize each fine-tuned model (``hf_splitquant.quantize``) to INT2 and INT3 with
   RTN and SplitQuant (group size 64, every encoder Linear and the pooler; the head stays float) and
   report test accuracy, plus the mean per-group weight range (max - min over each group of 64
   inputs: what a g64 grid has to cover) and the mean per-group max|w| of the quantized layers.
3. QAT: continue the plainly fine-tuned model for ``--qat-epochs`` with fake INT2 quantization
   (``prepare_qat``, ``SplitQuantConfig(bits=2, group_size=64, qat=True)``, RTN and SplitQuant grids),
   freeze it to the packed format (``QATCallback(freeze_on_train_end=True)``) and report its accuracy
   next to PTQ INT2 of the same fine-tuned model (QAT gets those extra steps; PTQ does not).

Subsets keep it bounded: by default the first ``--train-size 480`` training reviews, the first
``--test-size 400`` test reviews, reviews truncated to ``--max-length 48`` tokens, 2 epochs (60
optimizer steps of 16) at lr 3e-4 (fewer steps or a lower rate leave this model at the majority
class), and the word/position embeddings frozen (they are not quantized; freezing them halves the
optimizer's work). About 15 minutes on 2 heavily shared CPU cores. ``--quick`` is a smoke run (96 / 96
reviews, 32 tokens, 1 epoch, plain and L-inf only, RTN QAT only; too short to learn the task).

R2 is applied in ``R2LossCallback(mode="decoupled")`` by default: one plain step on ``R`` after each
optimizer step. The coupled mode (``--r2-mode gradient``, exactly ``L + lambda * R`` through AdamW)
moves every weight by at most about ``lr`` per step, which in a 50-step fine-tune at ``lr = 1e-4``
changes the group ranges by well under 1% (measured), so it cannot matter for PTQ here.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/bench_training.py --output benchmarks/results/training.json
    HF_HUB_OFFLINE=1 python benchmarks/bench_training.py --quick

The markdown table goes to stdout, progress to stderr, raw numbers to ``--output``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging  # noqa: E402

import hf_splitquant  # noqa: E402
import splitquant_assets as assets  # noqa: E402
from hf_splitquant import (  # noqa: E402
    QATCallback,
    R2LossCallback,
    R2Regularizer,
    SplitQuantConfig,  # noqa: E402
)
from hf_splitquant.methods.r2_loss import weight_range  # noqa: E402
from hf_splitquant.modeling import select_modules  # noqa: E402

VARIANTS = ("plain", "linf", "margin", "soft_min_max")
#: R2 weight per variant. In the default decoupled mode it is a step size: L-inf and Soft-Min-Max move
#: each group's extreme(s) about lambda toward the bulk per step; Margin pulls weights beyond the margin
#: 2 * lambda of the way back to it per step.
DEFAULT_LAMBDAS = {"linf": 8e-4, "margin": 0.05, "soft_min_max": 8e-4}
LABELS = {"other": 0, "great": 1}


def _lambdas(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in DEFAULT_LAMBDAS:
            raise argparse.ArgumentTypeError(f"unknown R2 variant {name!r}; choose from {sorted(DEFAULT_LAMBDAS)}")
        out[name] = float(value)
    return out


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_split(split: str, size: int, tokenizer, max_length: int) -> list[dict]:  # noqa: ANN001
    records = assets.finefood_reviews(split)[:size]
    texts = [r["review"].replace("<br />", " ") for r in records]
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": mask, "labels": LABELS[r["score"]]}
            for ids, mask, r in zip(encoded["input_ids"], encoded["attention_mask"], records)]


@torch.inference_mode()
def accuracy(model, data: list[dict], collator, batch_size: int = 64) -> float:  # noqa: ANN001
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        batch = collator(data[start:start + batch_size])
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(data)


def ranges(model) -> dict[str, float]:  # noqa: ANN001
    """Mean per-group (64 inputs) range and max|w| over the layers a g64 config quantizes."""
    weights = [m.weight.detach() for _, m in select_modules(model, SplitQuantConfig(group_size=64))]
    return {
        "group_range": sum(weight_range(w, False, "group", 64) for w in weights) / len(weights),
        "group_absmax": sum(weight_range(w, True, "group", 64) for w in weights) / len(weights),
        "layer_absmax": sum(weight_range(w, True) for w in weights) / len(weights),
    }


def training_args(opts, output_dir: str, epochs: float | None = None) -> TrainingArguments:  # noqa: ANN001
    return TrainingArguments(
        output_dir, per_device_train_batch_size=opts.batch_size, num_train_epochs=epochs or opts.epochs,
        learning_rate=opts.lr, warmup_steps=opts.warmup_steps, weight_decay=0.01, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=opts.seed, dataloader_num_workers=0,
    )


def fine_tune(opts, variant: str, train, collator, workdir: str):  # noqa: ANN001, ANN202
    set_seed(opts.seed)
    model = AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)
    model.bert.embeddings.requires_grad_(False)
    callbacks = []
    if variant != "plain":
        lambdas = dict(DEFAULT_LAMBDAS, **opts.r2_lambda)
        reg = R2Regularizer(model, variant, layers=SplitQuantConfig(group_size=64), lambda_=lambdas[variant],
                            granularity=opts.granularity, group_size=64)
        callbacks.append(R2LossCallback(reg, mode=opts.r2_mode))
    start = time.perf_counter()
    trainer = Trainer(model, training_args(opts, os.path.join(workdir, variant)), train_dataset=train,
                      data_collator=collator, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    result = trainer.train()
    return model, time.perf_counter() - start, result.training_loss


def qat_fine_tune(opts, float_model, transform: str | None, train, collator, workdir: str):  # noqa: ANN001, ANN202
    set_seed(opts.seed)
    config = SplitQuantConfig(bits=2, group_size=64, transform=transform, qat=True)
    model = hf_splitquant.prepare_qat(copy.deepcopy(float_model), config)
    start = time.perf_counter()
    trainer = Trainer(model, training_args(opts, os.path.join(workdir, f"qat-{transform or 'rtn'}"), opts.qat_epochs),
                      train_dataset=train, data_collator=collator,
                      callbacks=[QATCallback(freeze_on_train_end=True)])
    trainer.remove_callback(PrinterCallback)
    result = trainer.train()
    return model, time.perf_counter() - start, result.training_loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (small subsets, RTN INT2 QAT only)")
    parser.add_argument("--train-size", type=int, default=480)
    parser.add_argument("--test-size", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--qat-epochs", type=float, default=1.0, help="QAT epochs after the plain fine-tune")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--r2-lambda", type=_lambdas, default={},
                        help=f"per-variant R2 weights, e.g. linf=1e-3,margin=0.2 (defaults: {DEFAULT_LAMBDAS})")
    parser.add_argument("--r2-mode", choices=R2LossCallback.MODES, default="decoupled",
                        help="how R2LossCallback applies R2 (see hf_splitquant.integrations.trainer)")
    parser.add_argument("--granularity", choices=("layer", "row", "group"), default="group",
                        help="R2 granularity (group = the g64 quantization groups)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--qat-transforms", default="rtn,splitquant", help="comma-separated: rtn, splitquant, none")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the raw numbers")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.train_size, opts.test_size, opts.max_length, opts.epochs = 96, 96, 32, 1.0
        opts.variants, opts.qat_transforms = "plain,linf", "rtn"
    variants = [v for v in opts.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    qat_transforms = [t for t in opts.qat_transforms.split(",") if t and t != "none"]
    torch.set_num_threads(opts.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
    collator = DataCollatorWithPadding(tokenizer)
    train = load_split("train", opts.train_size, tokenizer, opts.max_length)
    test = load_split("test", opts.test_size, tokenizer, opts.max_length)
    majority = max(sum(d["labels"] for d in test), len(test) - sum(d["labels"] for d in test)) / len(test)
    log(f"train {len(train)} / test {len(test)} reviews, max_length {opts.max_length}, majority class {majority:.3f}")

    rows = []
    plain_model = None
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for variant in variants:
            model, seconds, loss = fine_tune(opts, variant, train, collator, workdir)
            row = {"model": variant if variant == "plain" else f"R2 {variant}", "train_s": seconds, "train_loss": loss,
                   "float": accuracy(model, test, collator), **ranges(model)}
            for bits in (2, 3):
                for transform in (None, "splitquant"):
                    config = SplitQuantConfig(bits=bits, group_size=64, transform=transform)
                    quantized = hf_splitquant.quantize(copy.deepcopy(model), config, progress=False)
                    row[f"int{bits}_{transform or 'rtn'}"] = accuracy(quantized, test, collator)
            rows.append(row)
            log(json.dumps(row))
            if variant == "plain":
                plain_model = model
        if qat_transforms and plain_model is None:
            log("QAT continues the plain fine-tune: add `plain` to --variants to run it")
            qat_transforms = []
        for transform in qat_transforms:
            model, seconds, loss = qat_fine_tune(opts, plain_model, None if transform == "rtn" else transform, train,
                                                 collator, workdir)
            row = {"model": f"plain + QAT int2 {transform} ({opts.qat_epochs:g} ep)", "train_s": seconds, "train_loss": loss,
                   f"int2_{transform}": accuracy(model, test, collator)}
            rows.append(row)
            log(json.dumps(row))
    total = time.perf_counter() - began

    def cell(row: dict, key: str, fmt: str = "{:.3f}") -> str:
        return fmt.format(row[key]) if key in row else "-"

    print(f"all-MiniLM-L6-v2 + 2-way head, fine-food reviews: {len(train)} train / {len(test)} test (first N of "
          f"each split), {opts.max_length} tokens, {opts.epochs:g} epoch(s), batch {opts.batch_size}, lr {opts.lr:g}, "
          "embeddings frozen; "
          f"R2 {opts.r2_mode}, lambda {dict(DEFAULT_LAMBDAS, **opts.r2_lambda)}, granularity {opts.granularity}; "
          f"PTQ/QAT group size 64; majority class "
          f"{majority:.3f}; {opts.threads} thread(s); total {total / 60:.1f} min\n")
    print("| model | train s | float acc | INT3 RTN | INT3 SplitQuant | INT2 RTN | INT2 SplitQuant | "
          "group range | group max abs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['train_s']:.0f} | {cell(row, 'float')} | {cell(row, 'int3_rtn')} | "
              f"{cell(row, 'int3_splitquant')} | {cell(row, 'int2_rtn')} | {cell(row, 'int2_splitquant')} | "
              f"{cell(row, 'group_range', '{:.4f}')} | {cell(row, 'group_absmax', '{:.4f}')} |")
    if opts.output is not None:
        opts.output.parent.mkdir(parents=True, exist_ok=True)
        payload = {"options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
                   "majority_class": majority, "total_s": total, "rows": rows,
                   "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                   "transformers": transformers.__version__, "threads": opts.threads}}
        opts.output.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
