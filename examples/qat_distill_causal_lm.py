"""Two bits through training: QAT of a causal LM with distillation from its float self, stock Trainer.

The recipe:

1. start from the best post-training result: by default the MSE-clipped round-to-nearest grid
   (``clip="mse"``, seconds); better, a calibrated packed model saved with ``save_pretrained`` (``--init-from``,
   e.g. the ``w2-tuned`` recipe of the README): ``prepare_qat(packed_model, config)`` keeps its codes, scales and
   zero points, so step 0 computes exactly what the packed model computes;
2. learn the step sizes (LSQ, ``qat_learn_scales=True``) and the latent float weights through the packed
   format's own grid (straight-through rounding), with rates in units of each layer's own grid step
   (``per_grid_step=True``) and a cosine schedule: the settings that measured best on SmolLM2-135M INT2 g64
   (``benchmarks/results/qat_lm.md``: 91.03 -> 58.94 perplexity in 180 steps of 1,024 tokens);
3. the loss is the KL to the float teacher's next-token distribution (``distillation_loss``), passed to
   the stock ``Trainer`` as ``compute_loss_func``; checkpoints and ``resume_from_checkpoint`` work as
   for any Trainer run (``QATCallback`` saves the grid state next to them);
4. ``freeze`` packs the fake-quant layers into the packed format (the same codes), ``save_pretrained``
   writes it and plain ``from_pretrained`` reloads it.

Usage::

    python examples/qat_distill_causal_lm.py --smoke            # tiny random Llama, seconds
    python examples/qat_distill_causal_lm.py --bits 2 --group-size 64 --steps 100 --output smollm2-int2-qat
        # SmolLM2-135M (offline asset package), Wikipedia training text, from the MSE-clipped grid
    python examples/qat_distill_causal_lm.py --init-from smollm2-w2-tuned --steps 180 --grad-accum 2
        # from a calibrated packed model (bits and groups are the saved model's)

Prints a JSON summary: perplexity and KL to the float model before and after, tokens seen, and how
far the reloaded packed model is from the fake-quant model. Note: in ``--smoke`` mode the "text" is random tokens, so perplexities mean nothing there;
the KL to the float model (on held-out blocks) is what distillation lowers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

import hf_splitquant  # noqa: E402
from hf_splitquant import QATCallback, SplitQuantConfig, distillation_loss, freeze, prepare_qat  # noqa: E402
from hf_splitquant.distillation import distillation_terms  # noqa: E402
from hf_splitquant.speed import native_bf16  # noqa: E402


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    model.eval()
    losses = [float(model(input_ids=b[None], labels=b[None]).loss) for b in blocks]
    return math.exp(sum(losses) / len(losses))


@torch.no_grad()
def kl_to_teacher(student: torch.nn.Module, teacher: torch.nn.Module, blocks: torch.Tensor) -> float:
    """Mean per-token KL(teacher || student) on ``blocks``: what distillation minimises."""
    student.eval()
    terms = distillation_terms(student(blocks).logits, teacher(blocks).logits)
    return float(terms["kl"] / terms["tokens"])


def tiny_setup() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny random Llama with confident predictions and random token blocks (no download)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=64, initializer_range=0.3)
    data = torch.randint(0, 128, (56, 16))
    return LlamaForCausalLM(config), data[:48], data[48:]


def smollm2_setup(train_blocks: int, seq_len: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """SmolLM2-135M and Wikipedia blocks: training from the "calibration" articles, evaluation from the
    disjoint "eval" articles."""
    import splitquant_assets as assets

    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = assets.perplexity_token_blocks(tokenizer, train_blocks, seq_len, part="calibration")
    evaluation = assets.perplexity_token_blocks(tokenizer, 4, 512, part="eval")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), train, evaluation


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, a few steps (seconds)")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--init-from", default=None,
                        help="a packed model saved with save_pretrained (e.g. a calibrated recipe): start from its codes "
                             "and grids; --bits and --group-size are then the saved model's")
    parser.add_argument("--scale-lr", type=float, default=0.0025, help="step-size rate (grid steps per step)")
    parser.add_argument("--weight-lr", type=float, default=0.01,
                        help="latent-weight rate (grid steps per step); 0: learn the step sizes only")
    parser.add_argument("--per-grid-step", action=argparse.BooleanOptionalAction, default=True,
                        help="rates in units of each layer's grid step (default) or absolute")
    parser.add_argument("--schedule", default="cosine", help="transformers lr_scheduler_type")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=1.0, help="weight of the KL (1 - alpha: next-token CE)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="TrainingArguments(bf16=True): the training steps under bf16 autocast (evaluation and "
                             "packing stay float32); default: on where the CPU computes bf16 natively (AVX-512 BF16, "
                             "AMX), where SmolLM2 INT2 training ran 1.09x faster by wall time (benchmarks/results/qat_lm.md)")
    parser.add_argument("--output", default=None, help="folder for the packed model (default: a temporary one)")
    opts = parser.parse_args(argv)
    if opts.bf16 is None:
        opts.bf16 = native_bf16("cpu")
    if opts.smoke:
        teacher, train, evaluation = tiny_setup()
        opts.group_size, opts.steps, opts.batch = 16, 12, 4
    else:
        teacher, train, evaluation = smollm2_setup(max(opts.steps * opts.batch * opts.grad_accum, 8), opts.seq_len)
    teacher.eval()
    float_ppl = perplexity(teacher, evaluation)

    # 1. the student: a saved packed model (its codes and grids), or the MSE-clipped PTQ grid over the
    #    float weights
    if opts.init_from:
        student = AutoModelForCausalLM.from_pretrained(opts.init_from, dtype=torch.float32)
        saved = student.config.quantization_config
        saved = saved.to_dict() if hasattr(saved, "to_dict") else dict(saved)
        opts.bits, opts.group_size = saved["bits"], saved.get("group_size")
        config = SplitQuantConfig(bits=opts.bits, group_size=opts.group_size, qat_learn_scales=True)
    else:
        student = copy.deepcopy(teacher)
        config = SplitQuantConfig(bits=opts.bits, group_size=opts.group_size, clip="mse", qat_learn_scales=True)
    student = prepare_qat(student, config)
    ptq_ppl, ptq_kl = perplexity(student, evaluation), kl_to_teacher(student, teacher, evaluation)
    ptq_fit = kl_to_teacher(student, teacher, train[:8])

    # 2.-3. learned step sizes (+ weights), KL to the teacher, the stock Trainer
    groups = hf_splitquant.qat_parameter_groups(student, scale_lr=opts.scale_lr, weight_lr=opts.weight_lr or None,
                                                per_grid_step=opts.per_grid_step)
    loss = distillation_loss(teacher, student, temperature=opts.temperature, alpha=opts.alpha)
    workdir = tempfile.mkdtemp(prefix="qat_distill_")
    args = TrainingArguments(workdir, max_steps=opts.steps, per_device_train_batch_size=opts.batch,
                             gradient_accumulation_steps=opts.grad_accum, lr_scheduler_type=opts.schedule, logging_steps=max(1, opts.steps // 10), report_to=[],
                             use_cpu=True, bf16=opts.bf16, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(student, args, train_dataset=[{"input_ids": b, "labels": b} for b in train],
                      compute_loss_func=loss, optimizers=(torch.optim.AdamW(groups), None), callbacks=[QATCallback()])
    trainer.train()  # (with bf16=True, QATCallback removes the autocast wrapper Accelerate leaves on forward)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    qat_ppl, qat_kl = perplexity(student, evaluation), kl_to_teacher(student, teacher, evaluation)
    qat_fit = kl_to_teacher(student, teacher, train[:8])

    # 4. pack, save, reload with plain from_pretrained
    loss.detach()
    with torch.no_grad():
        fake = student(evaluation[:1]).logits
    freeze(student)
    output = opts.output or os.path.join(workdir, "packed")
    student.save_pretrained(output)
    reloaded = AutoModelForCausalLM.from_pretrained(output).eval()
    with torch.no_grad():
        packed = reloaded(evaluation[:1]).logits
    summary = {
        "bits": opts.bits, "group_size": opts.group_size, "steps": trainer.state.global_step, "bf16": opts.bf16,
        "tokens_seen": trainer.state.global_step * opts.batch * opts.grad_accum * train.shape[1],
        "teacher_mb": round(loss.teacher_bytes / 2**20, 2),
        "first_loss": losses[0], "last_loss": losses[-1],
        "ptq_kl_to_float": ptq_kl, "qat_kl_to_float": qat_kl,
        "ptq_kl_on_training_blocks": ptq_fit, "qat_kl_on_training_blocks": qat_fit,
        "float_ppl": float_ppl, "ptq_ppl": ptq_ppl, "qat_ppl": qat_ppl, "packed_ppl": perplexity(reloaded, evaluation),
        "max_logit_diff_packed_vs_fake_quant": float((packed - fake).abs().max()), "output": output,
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
