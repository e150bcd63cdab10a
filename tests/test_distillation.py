"""Distillation from a float teacher with the stock Trainer, and the causal-LM QAT recipe built on it."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from helpers import (
    VOCAB,
    assert_freeze_round_trip,
    one_thread,  # noqa: F401  (autouse: one thread for this module)
    tiny_llama,
)
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Trainer, TrainingArguments

import hf_splitquant
from hf_splitquant import SplitQuantConfig, distillation_loss, freeze, prepare_qat
from hf_splitquant.distillation import distillation_terms
from hf_splitquant.integrations.trainer import QATCallback
from hf_splitquant.qat import iter_fake_quant_modules, qat_parameter_groups

SEQ = 12


def teacher_and_student(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny Llama teacher with confident predictions (large random weights: at the default init the
    residual stream is mostly the embedding and 2-bit layers hardly change the logits) and its copy."""
    torch.manual_seed(seed)
    config = tiny_llama().config
    config.initializer_range = 0.3
    teacher = LlamaForCausalLM(config).eval()
    return teacher, copy.deepcopy(teacher)


def lm_rows(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Causal-LM rows with right padding (pad id 2): labels are the ids with -100 on the padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = SEQ - (i % 4)  # every fourth row is full, the others are padded
        ids = torch.full((SEQ,), 2, dtype=torch.long)
        ids[:length] = torch.randint(3, VOCAB, (length,), generator=g)
        mask = (torch.arange(SEQ) < length).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def batch(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def args(tmp_path, **kwargs) -> TrainingArguments:  # noqa: ANN001
    base = {"per_device_train_batch_size": 4, "learning_rate": 1e-2, "report_to": [], "use_cpu": True,
            "save_strategy": "no", "logging_strategy": "steps", "logging_steps": 1, "disable_tqdm": True,
            "seed": 0, "dataloader_num_workers": 0, "lr_scheduler_type": "constant"}
    base.update(kwargs)
    return TrainingArguments(str(tmp_path), **base)


def logits(model, ids):  # noqa: ANN001, ANN201
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, alpha", [(1.0, 1.0), (2.0, 0.3)])
def test_loss_matches_a_hand_computed_kl(temperature, alpha) -> None:  # noqa: ANN001
    teacher, student = teacher_and_student()
    with torch.no_grad():  # a student that differs from its teacher
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss_fn = distillation_loss(teacher, student, temperature=temperature, alpha=alpha)
    inputs = batch(lm_rows(4))
    labels = inputs.pop("labels")
    out = student(**inputs)
    loss = loss_fn(out, labels)

    # by hand: each (row, position) whose next token has a label, one at a time
    t_logits, s_logits = logits(teacher, inputs["input_ids"]), out.logits.detach()
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(SEQ - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            p = torch.softmax(t_logits[b, t].double() / temperature, -1)
            q = torch.softmax(s_logits[b, t].double() / temperature, -1)
            kl = float((p * (p.log() - q.log())).sum()) * temperature**2
            ce = -float(torch.log_softmax(s_logits[b, t].double(), -1)[target])
            total += alpha * kl + (1 - alpha) * ce
            count += 1
    assert count == int(labels[:, 1:].ne(-100).sum()) < labels.numel() - labels.shape[0]  # padding was left out
    assert float(loss.detach()) == pytest.approx(total / count, rel=1e-5)

    # with the Trainer's count over the accumulated batch, the sum is divided by that count
    student(**inputs)
    assert float(loss_fn(student(**inputs), labels, num_items_in_batch=torch.tensor(3 * count))) == pytest.approx(
        total / (3 * count), rel=1e-5)
    loss.backward()  # the student gets gradients, the teacher none
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert any(p.grad is not None for p in student.parameters())
    held = [*teacher.parameters(), *teacher.buffers()]  # the tied head is one tensor, counted once
    assert loss_fn.teacher_bytes == sum(t.numel() * t.element_size() for t in held) > 0


def test_terms_without_labels_use_the_attention_mask() -> None:
    rows = batch(lm_rows(4))
    torch.manual_seed(0)
    s, t = torch.randn(4, SEQ, VOCAB), torch.randn(4, SEQ, VOCAB)
    by_labels = distillation_terms(s, t, labels=rows["labels"])
    by_mask = distillation_terms(s, t, attention_mask=rows["attention_mask"])
    assert int(by_mask["tokens"]) == int(by_labels["tokens"])
    torch.testing.assert_close(by_mask["kl"], by_labels["kl"])
    assert float(by_mask["ce"]) == 0.0
    assert float(distillation_terms(t, t)["kl"]) == pytest.approx(0.0, abs=1e-3)


def test_loss_validation() -> None:
    teacher, student = teacher_and_student()
    with pytest.raises(ValueError, match="teacher is the student"):
        distillation_loss(student, student)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(teacher, student, alpha=1.5)
    with pytest.raises(RuntimeError, match="forward pass"):
        distillation_loss(teacher, student)(None, None)
    loss_fn = distillation_loss(teacher, student, alpha=0.5)
    with pytest.raises(ValueError, match="labels"):
        loss_fn(student(torch.ones(1, 4, dtype=torch.long)), None)
    with pytest.raises(ValueError, match="differ"):
        distillation_terms(torch.zeros(1, 3, 5), torch.zeros(1, 3, 6))


# --------------------------------------------------------------------------------------------
# the QAT recipe
# --------------------------------------------------------------------------------------------


def test_qat_starts_from_a_packed_post_training_result() -> None:
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, SEQ))
    packed = hf_splitquant.quantize(tiny_llama(), SplitQuantConfig(bits=2, group_size=16, clip="mse"), progress=False)
    expected = logits(packed.eval(), ids)
    prepare_qat(packed, SplitQuantConfig(bits=2, group_size=16, qat_learn_scales=True))
    assert len(list(iter_fake_quant_modules(packed))) == 14
    torch.testing.assert_close(logits(packed.eval(), ids), expected, rtol=0, atol=1e-5)


def test_qat_takes_its_initial_grids_from_another_packed_model() -> None:
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, SEQ))
    model = tiny_llama()
    float_q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    direct = prepare_qat(copy.deepcopy(model), SplitQuantConfig(bits=2, group_size=16, clip="mse", qat_learn_scales=True))
    packed = hf_splitquant.quantize(copy.deepcopy(model), SplitQuantConfig(bits=2, group_size=16, clip="mse"),
                                    progress=False)
    cached = prepare_qat(model, SplitQuantConfig(bits=2, group_size=16, qat_learn_scales=True), init_from=packed)
    torch.testing.assert_close(logits(cached.eval(), ids), logits(direct.eval(), ids), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(cached, ids), logits(packed.eval(), ids), rtol=0, atol=1e-5)
    layer = cached.model.layers[0].self_attn.q_proj  # latent weights: the float ones, not the grid values
    assert torch.equal(layer.weight, float_q)
    with pytest.raises(ValueError, match="qat_learn_scales"):
        prepare_qat(tiny_llama(), SplitQuantConfig(bits=2), init_from=packed)


def test_parameter_groups_train_what_they_say() -> None:
    model = prepare_qat(tiny_llama(), SplitQuantConfig(bits=2, group_size=16, qat_learn_scales=True))
    groups = qat_parameter_groups(model, scale_lr=1e-3)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("weight_qat_scale") for n in trainable)
    groups = qat_parameter_groups(model, scale_lr=1e-3, weight_lr=1e-5, other_lr=1e-6)
    assert [g["lr"] for g in groups] == [1e-3, 1e-5, 1e-6]
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="learned scales"):
        qat_parameter_groups(prepare_qat(tiny_llama(), SplitQuantConfig(bits=2)), scale_lr=1e-3)


def test_parameter_groups_per_grid_step_follow_each_layers_scale() -> None:
    model = prepare_qat(tiny_llama(), SplitQuantConfig(bits=2, group_size=16, qat_learn_scales=True))
    layers = list(iter_fake_quant_modules(model))
    with torch.no_grad():  # one layer with a 100x wider grid
        layers[0][1].weight_qat_scale.mul_(100)
    groups = qat_parameter_groups(model, scale_lr=0.01, weight_lr=0.05, per_grid_step=True)
    assert len(groups) == 2 * len(layers)
    for (_, module), scale_group, weight_group in zip(layers, groups[::2], groups[1::2]):
        step = float(module.weight_qat_scale.abs().mean())
        assert scale_group["params"][0] is module.weight_qat_scale
        assert scale_group["lr"] == pytest.approx(0.01 * step) and weight_group["lr"] == pytest.approx(0.05 * step)
    assert groups[0]["lr"] > 50 * groups[2]["lr"]


def distill_run(output, steps: int, resume=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
    """QAT with distillation of a tiny Llama, scales and weights learned, through the stock Trainer."""
    teacher, student = teacher_and_student()
    cfg = SplitQuantConfig(bits=2, group_size=16, qat_learn_scales=True)
    student = prepare_qat(student, cfg)
    loss_fn = distillation_loss(teacher, student, temperature=1.0, alpha=1.0)
    groups = qat_parameter_groups(student, scale_lr=1e-2, weight_lr=1e-2)
    trainer = Trainer(student, args(output, max_steps=steps, **kwargs), train_dataset=lm_rows(32),
                      compute_loss_func=loss_fn, optimizers=(torch.optim.AdamW(groups), None),
                      callbacks=[QATCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return student, trainer


def test_distillation_qat_lowers_the_loss_then_freezes_and_reloads_bit_exactly(tmp_path) -> None:  # noqa: ANN001
    student, trainer = distill_run(tmp_path / "run", steps=16, gradient_accumulation_steps=2,
                                   gradient_checkpointing=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # the quantized student learns its teacher (the loss starts at the 2-bit model's KL, about 2.8)
    assert len(losses) == 16 and sum(losses[-4:]) < 0.7 * sum(losses[:4]), losses

    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    assert_freeze_round_trip(student, ids, tmp_path / "packed", 14, AutoModelForCausalLM)


@pytest.mark.slow
def test_distillation_qat_resumes_from_a_checkpoint(tmp_path) -> None:  # noqa: ANN001
    whole, _ = distill_run(tmp_path / "run", steps=8, save_strategy="steps", save_steps=4)
    shutil.copytree(tmp_path / "run" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    resumed, _ = distill_run(tmp_path / "resumed", steps=8, resume=True, save_strategy="steps", save_steps=4)
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_distillation_qat_trains_in_bf16_autocast(tmp_path) -> None:  # noqa: ANN001
    student, trainer = distill_run(tmp_path / "run", steps=3, bf16=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(0 < v < 100 for v in losses), losses
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    # QATCallback removed the autocast wrapper Accelerate leaves on forward after bf16 training, so the trained
    # model computes in float32 like its packed reload (with the wrapper, the reload would differ)
    assert "_original_forward" not in student.__dict__
    student.eval()
    fake = logits(student, ids)
    assert fake.dtype == torch.float32
    packed = logits(freeze(student), ids)
    torch.testing.assert_close(packed, fake, rtol=0, atol=1e-5)
    student.save_pretrained(tmp_path / "packed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
    assert torch.equal(logits(reloaded, ids), packed)
