"""Quantization-aware training: FakeQuantLinear on the packed grids, the stock Trainer, resume, freeze."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import TRAIN_SEQ as SEQ
from helpers import TRAIN_VOCAB as VOCAB
from helpers import (
    assert_freeze_round_trip,
    dataset,
    one_thread,  # noqa: F401  (autouse: one thread for this module)
    small_bert,
    tiny_gpt2,
)
from safetensors import safe_open
from transformers import (
    AutoModelForSequenceClassification,
    Trainer,
    TrainingArguments,
)
from transformers.pytorch_utils import Conv1D

import hf_splitquant
from hf_splitquant import PackedLinear, SplitQuantConfig, freeze, prepare_qat
from hf_splitquant.integrations.trainer import QATCallback
from hf_splitquant.nn.fake_quant import FakeQuantLinear
from hf_splitquant.qat import iter_fake_quant_modules, unprepare_qat

TRANSFORMS = [None, "splitquant", "ocs"]








def args(tmp_path, **kwargs) -> TrainingArguments:  # noqa: ANN001
    base = {"per_device_train_batch_size": 16, "learning_rate": 5e-3, "report_to": [], "use_cpu": True,
            "save_strategy": "no", "logging_strategy": "steps", "logging_steps": 10, "disable_tqdm": True,
            "seed": 0, "dataloader_num_workers": 0}
    base.update(kwargs)
    return TrainingArguments(str(tmp_path), **base)


def logits(model, ids):  # noqa: ANN001, ANN201
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_fake_quant_equals_post_training_quantization_and_freeze(transform) -> None:  # noqa: ANN001
    """Untrained, fake quantization is exactly PTQ on the same grid; freezing keeps the outputs."""
    cfg = dict(bits=2, group_size=16, transform=transform, ocs_expand_ratio=0.1)
    ptq = hf_splitquant.quantize(small_bert(), SplitQuantConfig(**cfg), progress=False).eval()
    model = prepare_qat(small_bert(), SplitQuantConfig(**cfg)).eval()
    assert len(list(iter_fake_quant_modules(model))) == 7 and isinstance(model.classifier, torch.nn.Linear)
    fake = logits(model, IDS)
    torch.testing.assert_close(fake, logits(ptq, IDS), rtol=0, atol=1e-5)
    freeze(model)
    assert not list(iter_fake_quant_modules(model))
    torch.testing.assert_close(logits(model, IDS), fake, rtol=0, atol=1e-5)
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            other = ptq.get_submodule(name)
            for key, tensor in module.packed_tensors().items():
                assert torch.equal(tensor, other.packed_tensors()[key]), (name, key)


def test_state_dict_keeps_float_keys_and_shapes() -> None:
    float_model = small_bert()
    reference = {k: v.shape for k, v in float_model.state_dict().items()}
    model = prepare_qat(float_model, SplitQuantConfig(bits=2, transform="splitquant"), in_place=False)
    assert {k: v.shape for k, v in model.state_dict().items()} == reference
    assert all(v.is_floating_point() for v in model.state_dict().values() if v.dim() > 1)
    assert not list(iter_fake_quant_modules(float_model))  # in_place=False left the original alone
    gpt2 = tiny_gpt2()
    shapes = {k: v.shape for k, v in gpt2.state_dict().items()}
    prepare_qat(gpt2, SplitQuantConfig(bits=3, group_size=16, qat=True))
    assert {k: v.shape for k, v in gpt2.state_dict().items()} == shapes  # Conv1D weights stay [in, out]
    freeze(gpt2)
    assert any(m.spec.source == "Conv1D" for m in gpt2.modules() if isinstance(m, PackedLinear))
    assert isinstance(gpt2.dequantize().transformer.h[0].attn.c_attn, Conv1D)


def test_straight_through_estimator_gradients() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 4)
    spec = SplitQuantConfig(bits=2, group_size=8).spec_for(16, 4, True)
    layer = FakeQuantLinear.from_float(linear, spec)
    x = torch.randn(5, 16)
    layer(x).sum().backward()
    # identity STE: dL/dW is the gradient with respect to the quantized weight, x^T summed over the batch
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(4, 16).contiguous())
    assert not torch.equal(layer.quantized_weight().detach(), linear.weight.detach())  # it does quantize
    lsq = FakeQuantLinear.from_float(linear, spec, learn_scales=True)
    assert lsq.weight_qat_scale.shape == (4, 2)
    torch.testing.assert_close(lsq.quantized_weight(), layer.quantized_weight())  # LSQ starts on the min-max grid
    (lsq(x) ** 2).sum().backward()
    assert lsq.weight_qat_scale.grad is not None and lsq.weight_qat_scale.grad.abs().sum() > 0
    assert lsq.weight.grad is not None


@pytest.mark.parametrize("fused", [True, False])
def test_grid_follows_weights_updated_in_place(fused) -> None:  # noqa: ANN001
    """Fused AdamW (the Trainer's default) updates weights without bumping their version counter."""
    torch.manual_seed(0)
    spec = SplitQuantConfig(bits=2, group_size=8).spec_for(16, 4, True)
    layer = FakeQuantLinear.from_float(torch.nn.Linear(16, 4), spec)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.05, fused=fused)
    for _ in range(3):
        layer(torch.randn(5, 16)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    fresh = FakeQuantLinear(spec, layer.weight.detach(), layer.bias.detach())
    assert torch.equal(layer.quantized_weight(), fresh.quantized_weight())


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_learned_scales_pack_exactly(transform) -> None:  # noqa: ANN001
    model = prepare_qat(small_bert(), SplitQuantConfig(bits=3, group_size=16, transform=transform,
                                                       ocs_expand_ratio=0.1, qat_learn_scales=True))
    with torch.no_grad():  # move the learned scales away from the min-max grid
        for _, module in iter_fake_quant_modules(model):
            module.weight_qat_scale.mul_(0.7)
    fake = logits(model.eval(), IDS)
    freeze(model)
    torch.testing.assert_close(logits(model, IDS), fake, rtol=0, atol=1e-5)


def test_prepare_on_a_packed_model_keeps_its_specs() -> None:
    packed = hf_splitquant.quantize(small_bert(), SplitQuantConfig(bits=3, group_size=16), progress=False)
    specs = {name: module.spec for name, module in packed.named_modules() if isinstance(module, PackedLinear)}
    prepare_qat(packed, SplitQuantConfig(bits=2))
    assert {name: module.spec for name, module in iter_fake_quant_modules(packed)} == specs
    assert packed.hf_quantizer.is_qat_trainable


def test_validation_errors() -> None:
    model = prepare_qat(small_bert(), SplitQuantConfig(bits=2))
    with pytest.raises(ValueError, match="already prepared"):
        prepare_qat(model, SplitQuantConfig(bits=2))
    with pytest.raises(ValueError, match="no FakeQuantLinear"):
        freeze(small_bert())
    with pytest.raises(ValueError, match="SplitQuantConfig"):
        prepare_qat(small_bert(), {"bits": 2})
    with pytest.raises(ValueError, match="clipped"):
        FakeQuantLinear(SplitQuantConfig(transform="ocs").spec_for(16, 4, False), torch.zeros(4, 16), ste="clipped")
    with pytest.raises(ValueError, match="freeze_scales_step"):
        QATCallback(start_step=5, freeze_scales_step=2)
    unprepare_qat(model)
    assert not model.is_quantized and not list(iter_fake_quant_modules(model))


# --------------------------------------------------------------------------------------------
# with the stock Trainer
# --------------------------------------------------------------------------------------------


def test_trainer_accepts_qat_and_refuses_a_plain_packed_model(tmp_path) -> None:  # noqa: ANN001
    packed = hf_splitquant.quantize(small_bert(), SplitQuantConfig(bits=4), progress=False)
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(packed, args(tmp_path, max_steps=1), train_dataset=dataset(8))
    Trainer(prepare_qat(small_bert(), SplitQuantConfig(bits=4)), args(tmp_path, max_steps=1), train_dataset=dataset(8))


def test_from_pretrained_with_qat_gives_fake_quant_layers(tmp_path) -> None:  # noqa: ANN001
    small_bert().save_pretrained(tmp_path / "float")
    cfg = SplitQuantConfig(bits=2, group_size=16, transform="splitquant", qat=True)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "float", quantization_config=cfg)
    layers = dict(iter_fake_quant_modules(model))
    assert len(layers) == 7 and all(m.spec.transform == "splitquant" and m.spec.bits == 2 for m in layers.values())
    assert model.hf_quantizer.is_qat_trainable and model.config.quantization_config.layers
    assert set(model.config.quantization_config.layers) == {k.removeprefix("bert.") for k in layers}
    float_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "float")
    torch.testing.assert_close(model.bert.encoder.layer[0].attention.self.query.weight,
                               float_model.bert.encoder.layer[0].attention.self.query.weight)


@pytest.mark.slow
@pytest.mark.parametrize("transform", ["splitquant", None])
def test_qat_train_checkpoint_resume_freeze_save_reload(tmp_path, transform) -> None:  # noqa: ANN001
    cfg = SplitQuantConfig(bits=2, group_size=16, transform=transform, qat=True)
    data = dataset(512)
    steps = 60

    def run(output, resume=None):  # noqa: ANN001, ANN202
        model = prepare_qat(small_bert(), SplitQuantConfig.from_dict(cfg.to_dict()), kmeans_refresh_every=10)
        callback = QATCallback(start_step=5, freeze_scales_step=40)
        trainer = Trainer(model, args(output, max_steps=steps, save_strategy="steps", save_steps=30),
                          train_dataset=data, callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    model, trainer = run(tmp_path / "run")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.85 * losses[0] and losses[-1] < 0.95, losses  # QAT learns (chance: ln 3 = 1.10)
    assert all(m.grid_frozen for _, m in iter_fake_quant_modules(model))

    # the Trainer checkpoint is float, under the float keys and shapes
    checkpoint = tmp_path / "run" / "checkpoint-30"
    assert (checkpoint / QATCallback.STATE_FILE).is_file()
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        query = f.get_tensor("bert.encoder.layer.0.attention.self.query.weight")
    assert query.dtype == torch.float32 and query.shape == (32, 32)

    # resuming an interrupted run from step 30 ends where the uninterrupted run ended
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-30")
    resumed, _ = run(tmp_path / "resumed", resume=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)

    # freeze -> packed model with the fake-quant outputs -> save -> plain from_pretrained, bit-exact
    assert_freeze_round_trip(model, IDS, tmp_path / "packed", 7, AutoModelForSequenceClassification)


def test_qat_callback_schedule_and_freeze_on_train_end(tmp_path) -> None:  # noqa: ANN001
    model = prepare_qat(small_bert(), SplitQuantConfig(bits=2, group_size=16, qat_learn_scales=True))
    seen = []

    class Spy(QATCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN003
            module = next(iter_fake_quant_modules(model))[1]
            seen.append((state.global_step, module.fake_quant_enabled))

    scales = {n: m.weight_qat_scale.detach().clone() for n, m in iter_fake_quant_modules(model)}
    Trainer(model, args(tmp_path, max_steps=6), train_dataset=dataset(96),
            callbacks=[Spy(start_step=3), QATCallback(start_step=3, freeze_on_train_end=True)]).train()
    assert seen == [(1, False), (2, False), (3, False), (4, True), (5, True), (6, True)]
    assert not list(iter_fake_quant_modules(model)) and model.config.quantization_config.qat is False
    # the learned scales moved (trained by the Trainer's optimizer) and were packed
    packed = dict((n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear))
    moved = [not torch.equal(packed[n].weight_scale.float(), s.to(torch.float16).float()) for n, s in scales.items()]
    assert any(moved)
