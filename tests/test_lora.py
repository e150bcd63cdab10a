"""LoRA adapters (peft) on a packed base: train with the stock Trainer, save, reload, merge into float."""

from __future__ import annotations

import pytest
import torch
from helpers import TRAIN_SEQ as SEQ
from helpers import TRAIN_VOCAB as VOCAB
from helpers import (
    dataset,
    one_thread,  # noqa: F401  (autouse: one thread for this module)
    small_bert,
)
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import (
    AutoModelForSequenceClassification,
    Trainer,
)

import hf_splitquant
from hf_splitquant import PackedLinear, SplitQuantConfig
from hf_splitquant.integrations.lora import (
    PackedLoraLinear,
    get_packed_peft_model,
    load_packed_adapter,
    merge_into_float,
)

IDS = torch.randint(3, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(7))








def logits(model, ids=IDS):  # noqa: ANN001, ANN201
    with torch.no_grad():
        return model(input_ids=ids).logits


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], modules_to_save=["classifier"])


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):  # noqa: ANN001, ANN201
    path = tmp_path_factory.mktemp("packed")
    model = hf_splitquant.quantize(small_bert(), SplitQuantConfig(bits=4, group_size=16), progress=False)
    model.save_pretrained(path)
    return path


@pytest.mark.slow
def test_lora_on_packed_base_trains_saves_reloads_and_merges(packed_dir, tmp_path) -> None:  # noqa: ANN001
    from transformers import TrainingArguments

    base = AutoModelForSequenceClassification.from_pretrained(packed_dir)
    packed_before = {n: {k: t.clone() for k, t in m.packed_tensors().items()}
                     for n, m in base.named_modules() if isinstance(m, PackedLinear)}
    model = get_packed_peft_model(base, lora_config())
    wrapped = [m for m in model.modules() if isinstance(m, PackedLoraLinear)]
    assert len(wrapped) == 6  # q, v, attention output dense, intermediate dense, output dense, pooler dense
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)

    args = TrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=16, learning_rate=1e-2, max_steps=60,
                             report_to=[], use_cpu=True, save_strategy="no", logging_strategy="steps",
                             logging_steps=10, disable_tqdm=True, seed=0)
    trainer = Trainer(model, args, train_dataset=dataset(512))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0] and losses[-1] < 0.95, losses

    # the packed base did not change; only adapters (and the float head) trained
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, PackedLinear):
            owner = name.removesuffix(".base_layer")
            for key, tensor in module.packed_tensors().items():
                assert torch.equal(tensor, packed_before[owner][key]), (name, key)

    model.eval()
    trained = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k or "classifier" in k for k in keys)  # the adapter only, no packed weights

    # reload onto a fresh packed base: identical outputs
    reloaded = load_packed_adapter(AutoModelForSequenceClassification.from_pretrained(packed_dir), tmp_path / "adapter")
    assert any(isinstance(m, PackedLoraLinear) for m in reloaded.modules())
    assert torch.equal(logits(reloaded.eval()), trained)

    # merging needs float weights: refused on the packed base, fine after dequantize
    with pytest.raises(ValueError, match="dequantize the base model first"):
        reloaded.merge_adapter()
    merged = merge_into_float(reloaded)
    assert not any(isinstance(m, (PackedLinear, PackedLoraLinear)) for m in merged.modules())
    assert not getattr(merged, "is_quantized", False)
    torch.testing.assert_close(logits(merged.eval()), trained, rtol=1e-4, atol=1e-5)


def test_documented_manual_merge_matches(packed_dir, tmp_path) -> None:  # noqa: ANN001
    """``dequantize()`` then ``merge_and_unload()`` by hand, and a float base + the same adapter."""
    model = get_packed_peft_model(AutoModelForSequenceClassification.from_pretrained(packed_dir), lora_config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # a non-zero adapter
    model.eval()
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    model.base_model.model.dequantize()
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-5)
    # the same adapter loads with plain peft onto the dequantized (float) base
    from peft import PeftModel

    float_base = AutoModelForSequenceClassification.from_pretrained(packed_dir).dequantize()
    torch.testing.assert_close(logits(PeftModel.from_pretrained(float_base, tmp_path / "adapter").eval()), expected,
                               rtol=1e-4, atol=1e-5)


def test_errors_are_clear(packed_dir) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="no PackedLinear"):
        get_packed_peft_model(small_bert(), lora_config())
    base = AutoModelForSequenceClassification.from_pretrained(packed_dir)
    with pytest.raises(ValueError, match="DoRA"):
        get_packed_peft_model(base, LoraConfig(r=2, target_modules=["query"], use_dora=True))
    with pytest.raises(ValueError, match="not supported"):  # plain peft does not know PackedLinear
        get_peft_model(AutoModelForSequenceClassification.from_pretrained(packed_dir),
                       LoraConfig(r=2, target_modules=["query"]))


def test_plain_peft_calls_point_to_our_entry_points(packed_dir, tmp_path) -> None:  # noqa: ANN001
    """peft has no public registration for PackedLinear: its own calls fail, and the error names ours."""
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(packed_dir)
    with pytest.raises(ValueError, match="is not supported") as err:
        get_peft_model(base, lora_config())
    assert "hf_splitquant.get_packed_peft_model(model, lora_config)" in str(err.value)
    assert "PackedLinear(in_features=" in str(err.value)
    assert "[hf_splitquant" not in repr(base)  # printing the model is unchanged

    model = get_packed_peft_model(AutoModelForSequenceClassification.from_pretrained(packed_dir), lora_config())
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="is not supported") as err:
        PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(packed_dir), tmp_path / "adapter")
    assert "hf_splitquant.load_packed_adapter(model, adapter_dir)" in str(err.value)
    again = load_packed_adapter(AutoModelForSequenceClassification.from_pretrained(packed_dir), tmp_path / "adapter")
    assert torch.equal(logits(again), logits(model))


def test_all_linear_targets_the_packed_layers(packed_dir) -> None:  # noqa: ANN001
    base = AutoModelForSequenceClassification.from_pretrained(packed_dir)
    model = get_packed_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    wrapped = [name for name, module in model.named_modules() if isinstance(module, PackedLoraLinear)]
    packed = [name for name, module in base.named_modules() if isinstance(module, PackedLinear)]
    assert wrapped and len(wrapped) == len(packed)
