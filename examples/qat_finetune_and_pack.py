"""Example: quantization-aware fine-tuning with the stock Trainer, then packing and saving.

all-MiniLM-L6-v2 is loaded with ``SplitQuantConfig(qat=True)``: its Linear layers become
``FakeQuantLinear`` (float weights, fake-quantized on the packed format's grid in the forward pass,
straight-through gradients). The stock ``Trainer`` fine-tunes it on the fine-food reviews; its
checkpoints stay float and resumable. ``QATCallback(freeze_on_train_end=True)`` packs the model when
training ends, ``save_pretrained`` writes the packed low-bit format, and plain ``from_pretrained``
reloads it. The accuracy of post-training quantization of a plain fine-tune is printed alongside.

    HF_HUB_OFFLINE=1 python examples/qat_finetune_and_pack.py --smoke        # a minute or two, offline
    HF_HUB_OFFLINE=1 python examples/qat_finetune_and_pack.py --bits 2 --transform splitquant --learn-scales
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
from hf_splitquant import PackedLinear, QATCallback, SplitQuantConfig  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny subsets and a few steps (a minute or two)")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--transform", choices=("rtn", "splitquant", "ocs"), default="rtn")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--learn-scales", action="store_true", help="LSQ-style learned scales")
    parser.add_argument("--train-size", type=int, default=480)
    parser.add_argument("--test-size", type=int, default=400)
    parser.add_argument("--output-dir", default=None, help="where to save the packed model (default: a temp dir)")
    opts = parser.parse_args()
    max_steps, max_length, save_steps = -1, 48, 30
    if opts.smoke:
        opts.train_size, opts.test_size, max_steps, max_length, save_steps = 48, 32, 3, 16, 2
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
    collator = DataCollatorWithPadding(tokenizer)
    train = reviews("train", opts.train_size, tokenizer, max_length)
    test = reviews("test", opts.test_size, tokenizer, max_length)
    transform = None if opts.transform == "rtn" else opts.transform
    qat_config = SplitQuantConfig(bits=opts.bits, group_size=opts.group_size, transform=transform, qat=True,
                                  qat_learn_scales=opts.learn_scales)

    with tempfile.TemporaryDirectory() as tmp:
        def args(name: str) -> TrainingArguments:
            return TrainingArguments(os.path.join(tmp, name), per_device_train_batch_size=16, num_train_epochs=2,
                                     learning_rate=3e-4, warmup_steps=0 if opts.smoke else 3, report_to=[],
                                     use_cpu=True, save_strategy="steps", save_steps=save_steps, save_total_limit=1,
                                     logging_strategy="no", disable_tqdm=True, seed=0, max_steps=max_steps)

        # 1. QAT: FakeQuantLinear layers straight from from_pretrained; the Trainer accepts the model
        set_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2,
                                                                   quantization_config=qat_config)
        model.bert.embeddings.requires_grad_(False)  # not quantized; freezing them halves the optimizer's work
        trainer = Trainer(model, args("qat"), train_dataset=train, data_collator=collator,
                          callbacks=[QATCallback(freeze_on_train_end=True)])
        trainer.train()  # checkpoints under tmp/qat/checkpoint-N hold float weights (resumable)
        assert any(isinstance(m, PackedLinear) for m in model.modules()), "freeze_on_train_end packs the model"
        qat_acc = accuracy(model, test, collator)
        out_dir = opts.output_dir or os.path.join(tmp, "qat-packed")
        model.save_pretrained(out_dir)  # the packed low-bit format
        tokenizer.save_pretrained(out_dir)
        reloaded = AutoModelForSequenceClassification.from_pretrained(out_dir)
        reloaded_acc = accuracy(reloaded, test, collator)
        assert abs(reloaded_acc - qat_acc) < 1e-9, "reload changed the predictions"
        report = hf_splitquant.format_report(hf_splitquant.quantization_report(reloaded))

        # 2. the baseline: plain fine-tune, then post-training quantization with the same config
        set_seed(0)
        float_model = AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)
        float_model.bert.embeddings.requires_grad_(False)
        Trainer(float_model, args("float"), train_dataset=train, data_collator=collator).train()
        float_acc = accuracy(float_model, test, collator)
        ptq_config = SplitQuantConfig(bits=opts.bits, group_size=opts.group_size, transform=transform)
        ptq_acc = accuracy(hf_splitquant.quantize(copy.deepcopy(float_model), ptq_config, progress=False), test,
                           collator)

    label = f"INT{opts.bits} {opts.transform} g{opts.group_size}" + (" learned scales" if opts.learn_scales else "")
    print(f"test accuracy on {len(test)} reviews ({label})")
    print(f"  float fine-tune            {float_acc:.3f}")
    print(f"  float fine-tune + PTQ      {ptq_acc:.3f}")
    print(f"  QAT fine-tune, packed      {qat_acc:.3f}  (reloaded with from_pretrained: {reloaded_acc:.3f})")
    print("\n".join(report.splitlines()[-2:]))  # totals (format_report lists every layer above them)


if __name__ == "__main__":
    main()
