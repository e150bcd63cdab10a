"""Example: fine-tune with R2-Loss (range restriction), then quantize after training (PTQ).

all-MiniLM-L6-v2 gets a 2-way head and is fine-tuned on the fine-food reviews (great / other) with
the stock ``Trainer`` (2 epochs over the first 480 reviews at lr 3e-4, 48 tokens, embeddings frozen:
the setting of ``benchmarks/bench_training.py``) plus ``R2LossCallback``, which shrinks the per-group weight ranges that the
later INT2 grid has to cover. The fine-tuned model is then quantized in memory, saved packed, and
reloaded with plain ``from_pretrained``; accuracy is reported for float, packed, and a plain
fine-tune quantized the same way.

    HF_HUB_OFFLINE=1 python examples/r2_finetune_then_ptq.py --smoke       # a minute or two, offline
    HF_HUB_OFFLINE=1 python examples/r2_finetune_then_ptq.py --variant soft_min_max --bits 2
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_splitquant  # noqa: E402
import splitquant_assets as assets  # noqa: E402
from hf_splitquant import R2LossCallback, R2Regularizer, SplitQuantConfig  # noqa: E402

LAMBDAS = {"linf": 8e-4, "margin": 0.05, "soft_min_max": 8e-4}


def reviews(split: str, n: int, tokenizer, max_length: int) -> list[dict]:  # noqa: ANN001
    records = assets.finefood_reviews(split)[:n]
    enc = tokenizer([r["review"].replace("<br />", " ") for r in records], truncation=True, max_length=max_length)
    return [{"input_ids": i, "attention_mask": m, "labels": int(r["score"] == "great")}
            for i, m, r in zip(enc["input_ids"], enc["attention_mask"], records)]


@torch.inference_mode()
def accuracy(model, data, collator) -> float:  # noqa: ANN001
    model.eval()
    hits = 0
    for start in range(0, len(data), 64):
        batch = collator(data[start:start + 64])
        labels = batch.pop("labels")
        hits += int((model(**batch).logits.argmax(-1) == labels).sum())
    return hits / len(data)


def fine_tune(train, collator, opts, variant: str | None, output_dir: str):  # noqa: ANN001, ANN201
    set_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)
    model.bert.embeddings.requires_grad_(False)  # not quantized; freezing them halves the optimizer's work
    callbacks = []
    if variant is not None:
        # R2 on exactly the layers the quantizer will touch, per group of 64 inputs (the grid's groups)
        layers = SplitQuantConfig(group_size=opts.group_size)
        regularizer = R2Regularizer(model, variant, layers=layers, lambda_=opts.r2_lambda or LAMBDAS[variant],
                                    granularity="group", group_size=opts.group_size)
        callbacks.append(R2LossCallback(regularizer, mode="decoupled"))
    args = TrainingArguments(output_dir, per_device_train_batch_size=16, num_train_epochs=2, learning_rate=3e-4,
                             warmup_steps=opts.steps_warmup, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=0, max_steps=opts.max_steps)
    Trainer(model, args, train_dataset=train, data_collator=collator, callbacks=callbacks).train()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny subsets and a few steps (a minute or two)")
    parser.add_argument("--variant", choices=sorted(LAMBDAS), default="linf")
    parser.add_argument("--r2-lambda", type=float, default=None, help="default: a per-variant value")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--transform", choices=("rtn", "splitquant"), default="splitquant")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=480)
    parser.add_argument("--test-size", type=int, default=400)
    parser.add_argument("--output-dir", default=None, help="where to save the packed model (default: a temp dir)")
    opts = parser.parse_args()
    opts.max_steps, opts.steps_warmup, max_length = -1, 3, 48
    if opts.smoke:
        opts.train_size, opts.test_size, opts.max_steps, opts.steps_warmup, max_length = 32, 32, 2, 0, 16
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
    collator = DataCollatorWithPadding(tokenizer)
    train = reviews("train", opts.train_size, tokenizer, max_length)
    test = reviews("test", opts.test_size, tokenizer, max_length)
    config = SplitQuantConfig(bits=opts.bits, group_size=opts.group_size,
                              transform=None if opts.transform == "rtn" else opts.transform)

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = opts.output_dir or os.path.join(tmp, "r2-packed")
        results = {}
        for name, variant in (("plain", None), (f"R2 {opts.variant}", opts.variant)):
            model = fine_tune(train, collator, opts, variant, os.path.join(tmp, name.replace(" ", "_")))
            float_acc = accuracy(model, test, collator)
            quantized = hf_splitquant.quantize(copy.deepcopy(model), config, progress=False)
            results[name] = (float_acc, accuracy(quantized, test, collator))
        # save the R2 model's packed form and reload it the ordinary way
        quantized.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        reloaded = AutoModelForSequenceClassification.from_pretrained(out_dir)
        reloaded_acc = accuracy(reloaded, test, collator)
        assert abs(reloaded_acc - results[f"R2 {opts.variant}"][1]) < 1e-9, "reload changed the predictions"

    label = f"INT{opts.bits} {opts.transform} g{opts.group_size}"
    print(f"{'model':<18} {'float acc':>9} {label:>20}")
    for name, (f_acc, q_acc) in results.items():
        print(f"{name:<18} {f_acc:>9.3f} {q_acc:>20.3f}")
    print(f"packed R2 model reloaded with plain from_pretrained: accuracy {reloaded_acc:.3f}"
          + ("" if opts.output_dir else " (saved to a temporary folder)"))


if __name__ == "__main__":
    main()
