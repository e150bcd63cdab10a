"""R2-Loss: the three range losses, the regularizer and its Trainer callback on a real tiny BERT."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from helpers import (
    dataset,
    one_thread,  # noqa: F401  (autouse: one thread for this module)
    small_bert,
)
from transformers import (
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_splitquant import SplitQuantConfig
from hf_splitquant.integrations.trainer import R2LossCallback
from hf_splitquant.methods.r2_loss import (
    R2Regularizer,
    linf_loss,
    margin_loss,
    soft_extremes,
    soft_min_max_loss,
    weight_range,
)


def args(tmp_path, **kwargs) -> TrainingArguments:
    base = {"per_device_train_batch_size": 8, "learning_rate": 3e-3, "report_to": [], "use_cpu": True,
            "save_strategy": "no", "logging_strategy": "no", "disable_tqdm": True, "seed": 0,
            "dataloader_num_workers": 0}
    base.update(kwargs)
    return TrainingArguments(str(tmp_path), **base)


class GradRecorder(TrainerCallback):
    """Copies every gradient right before the optimizer step (runs after the R2 callback)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN003
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


# --------------------------------------------------------------------------------------------
# the losses
# --------------------------------------------------------------------------------------------


def test_linf_gradient_reaches_only_the_largest_entry() -> None:
    w = torch.tensor([[0.1, -0.7, 0.3], [0.2, 0.0, -0.1]], requires_grad=True)
    linf_loss(w).backward()
    expected = torch.zeros_like(w)
    expected[0, 1] = -1.0
    assert torch.equal(w.grad, expected)
    assert linf_loss(w, "row").item() == pytest.approx(0.7 + 0.2)


def test_margin_is_zero_inside_and_pulls_outliers_and_margin() -> None:
    w = torch.tensor([[0.1, -0.5, 0.2]], requires_grad=True)
    m = torch.tensor([0.6], requires_grad=True)
    loss = margin_loss(w, m, beta=0.5)
    assert loss.item() == pytest.approx(0.5 * 0.6)  # only the penalty on M
    loss.backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and m.grad.item() == pytest.approx(0.5)
    w.grad = m.grad = None
    m2 = torch.tensor([0.3], requires_grad=True)
    margin_loss(w, m2, beta=0.0, penalty="l2").backward()
    assert w.grad[0, 1].item() == pytest.approx(-2 * (0.5 - 0.3))  # d/dw (|w| - M)^2 at w = -0.5: descent moves w to 0
    assert m2.grad.item() < 0  # the excess term pushes M up


def test_soft_extremes_approach_hard_ones_and_are_asymmetric() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 50)
    smax, smin, _ = soft_extremes(w, torch.tensor([200.0]), normalize=True)
    assert smax.item() == pytest.approx(w.max().item(), abs=1e-3)
    assert smin.item() == pytest.approx(w.min().item(), abs=1e-3)
    mild_max, mild_min, _ = soft_extremes(w, torch.tensor([1.0]))
    assert w.mean() < mild_max < w.max() and w.min() < mild_min < w.mean()
    # translation-invariant range (min and max move together), unlike max|W|
    a = torch.tensor([3.0])
    assert soft_min_max_loss(w + 1.0, a).item() == pytest.approx(soft_min_max_loss(w, a).item(), rel=1e-5)
    assert linf_loss(w + 1.0).item() > linf_loss(w).item() + 0.5
    # the eta * exp(-alpha) term stops alpha from collapsing: with the default eta the minimum over alpha
    # lies at a sharp temperature; with a tiny eta it slides to the lower end
    grid = torch.linspace(0.1, 15.0, 150)

    def best_alpha(eta: float) -> float:
        values = torch.tensor([soft_min_max_loss(w, torch.tensor([x]), eta=eta).item() for x in grid])
        return float(grid[values.argmin()])

    assert best_alpha(50.0) > 3.0 and best_alpha(0.1) < 0.5


def test_weight_range_measures() -> None:
    w = torch.tensor([[1.0, -3.0], [2.0, 0.5]])
    assert weight_range(w) == 3.0 and weight_range(w, symmetric=False) == 5.0
    assert weight_range(w, granularity="row") == pytest.approx(2.5)
    # groups of 2 inputs over rows of 3: the ragged last group [x, x] keeps its own max and min
    v = torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.2, -4.0]])
    assert weight_range(v, granularity="group", group_size=2) == pytest.approx((2.0 + 0.5 + 0.2 + 4.0) / 4)
    assert weight_range(v, False, "group", 2) == pytest.approx((3.0 + 0.0 + 0.1 + 0.0) / 4)
    reg = R2Regularizer(small_bert(), "soft_min_max", granularity="group", group_size=16)
    assert reg.params["bert__encoder__layer__0__intermediate__dense"].shape == (48 * 2,)  # 48 rows x 32/16 groups
    with pytest.raises(ValueError, match="group_size"):
        linf_loss(v, "group", 0)


# --------------------------------------------------------------------------------------------
# the regularizer
# --------------------------------------------------------------------------------------------


def test_regularizer_selects_layers_and_keeps_model_state_dict() -> None:
    model = small_bert()
    keys = set(model.state_dict())
    reg = R2Regularizer(model, "margin")
    assert "classifier" not in reg.layer_names and "bert.encoder.layer.0.attention.self.query" in reg.layer_names
    assert len(reg.layer_names) == 7  # q, k, v, attention output, intermediate, output, pooler
    assert set(model.state_dict()) == keys  # nothing registered on the model
    assert set(reg.state_dict()) == {f"params.{n.replace('.', '__')}" for n in reg.layer_names}
    only_q = R2Regularizer(model, "linf", layers=SplitQuantConfig(modules_to_not_convert=["key", "value", "dense", "classifier"]))
    assert only_q.layer_names == ["bert.encoder.layer.0.attention.self.query"]
    explicit = R2Regularizer(model, "soft_min_max", layers=["classifier"], granularity="row")
    assert explicit.params["classifier"].shape == (3,)
    assert list(explicit.parameters())[0].dtype == torch.float32


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"variant": "l2"}, "variant"),
    ({"granularity": "channel"}, "granularity"),
    ({"granularity": "group", "group_size": 0}, "group_size"),
    ({"lambda_": -1.0}, "lambda_"),
    ({"layers": ["nope"]}, "no module `nope`"),
    ({"layers": ["bert.embeddings.LayerNorm"]}, "2-D float"),
    ({"layers": "bert"}, "list of module names"),
    ({"margin_penalty": "l3"}, "margin_penalty"),
    ({"alpha_bounds": (2.0, 1.0)}, "alpha_bounds"),
])
def test_regularizer_validation(kwargs, message) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        R2Regularizer(small_bert(), **kwargs)


def test_penalty_in_float32_for_bf16_weights() -> None:
    model = small_bert().to(torch.bfloat16)
    reg = R2Regularizer(model, "soft_min_max")
    assert reg.penalty().dtype == torch.float32
    value = reg.add_gradients(0.5)
    weight = reg.weights()[0]
    assert weight.grad is not None and weight.grad.dtype == torch.bfloat16 and value > 0


def test_lambda_schedule() -> None:
    reg = R2Regularizer(small_bert(), "linf", lambda_=0.2)
    assert R2LossCallback(reg).lambda_at(0) == 0.2
    ramp = R2LossCallback(reg, warmup_steps=4, start_step=2)
    assert [ramp.lambda_at(s) for s in range(7)] == pytest.approx([0, 0, 0.05, 0.1, 0.15, 0.2, 0.2])
    assert R2LossCallback(reg, schedule=lambda s: 0.01 * s).lambda_at(3) == pytest.approx(0.03)
    with pytest.raises(ValueError, match="warmup_steps"):
        R2LossCallback(reg, warmup_steps=-1)


# --------------------------------------------------------------------------------------------
# the callback inside a real Trainer
# --------------------------------------------------------------------------------------------


def _manual_gradients(model, data, reg_variant: str, lam: float, clip: float | None = None):  # noqa: ANN001, ANN202
    """Autograd of mean task loss over all samples (+ lambda * R, added after clipping the task part)."""
    model = copy.deepcopy(model).train()
    reg = R2Regularizer(model, reg_variant, lambda_=lam)
    ids = torch.stack([d["input_ids"] for d in data])
    labels = torch.stack([d["labels"] for d in data])
    task = model(input_ids=ids, labels=labels).loss
    params = [p for p in model.parameters() if p.requires_grad]
    task_grads = torch.autograd.grad(task, params)
    if clip is not None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in task_grads]))
        task_grads = [g * min(1.0, clip / (float(norm) + 1e-6)) for g in task_grads]
    r_grads = torch.autograd.grad(lam * reg.penalty(), params, allow_unused=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {n: t + (r if r is not None else 0) for n, t, r in zip(names, task_grads, r_grads)}


@pytest.mark.parametrize("variant", ["linf", "margin", "soft_min_max"])
@pytest.mark.parametrize("accumulation", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_callback_gradient_equals_autograd_of_total_loss(tmp_path, variant, accumulation) -> None:  # noqa: ANN001
    lam = 0.5
    model = small_bert()
    # BERT's forward takes **kwargs, so the Trainer would pass `num_items_in_batch` and skip dividing each
    # micro-batch loss by the accumulation steps, while the classification loss ignores it (the task gradient
    # would be the sum of micro-batch means). Declaring that the model does not take loss kwargs gives the
    # plain convention: the accumulated task gradient is that of the mean loss over all samples.
    model.accepts_loss_kwargs = False
    data = dataset(16)
    expected = _manual_gradients(model, data, variant, lam)
    reg = R2Regularizer(model, variant, lambda_=lam)
    before = {k: v.detach().clone() for k, v in reg.state_dict().items()}
    recorder = GradRecorder()
    trainer = Trainer(model, args(tmp_path, per_device_train_batch_size=16 // accumulation,
                                  gradient_accumulation_steps=accumulation, max_steps=1, max_grad_norm=0.0),
                      train_dataset=data, callbacks=[R2LossCallback(reg), recorder])
    trainer.train()
    (got,) = recorder.grads
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)
    changed = [not torch.equal(before[k], v) for k, v in reg.state_dict().items()]
    assert all(changed) if variant != "linf" else not changed  # learnable margins / temperatures were stepped


def test_callback_gradient_is_added_after_clipping(tmp_path) -> None:  # noqa: ANN001
    lam, clip = 0.5, 1e-3
    model = small_bert()
    data = dataset(8)
    expected = _manual_gradients(model, data, "linf", lam, clip=clip)
    recorder = GradRecorder()
    Trainer(model, args(tmp_path, max_steps=1, max_grad_norm=clip), train_dataset=data,
            callbacks=[R2LossCallback(R2Regularizer(model, "linf", lambda_=lam)), recorder]).train()
    for name, grad in expected.items():
        torch.testing.assert_close(recorder.grads[0][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_decoupled_mode_takes_a_plain_step_on_r(tmp_path) -> None:  # noqa: ANN001
    model = small_bert()
    reg = R2Regularizer(model, "linf", lambda_=0.01, granularity="row")
    before = [w.detach().clone() for w in reg.weights()]
    # learning_rate=0: the Trainer's own step changes nothing, what moves is the R2 step alone
    Trainer(model, args(tmp_path, max_steps=1, learning_rate=0.0), train_dataset=dataset(8),
            callbacks=[R2LossCallback(reg, mode="decoupled")]).train()
    for w0, w in zip(before, reg.weights()):
        expected = w0.clone()
        rows = torch.arange(w0.shape[0])
        top = w0.abs().argmax(dim=1)
        expected[rows, top] -= 0.01 * torch.sign(w0[rows, top])  # every row maximum moves lambda toward 0
        torch.testing.assert_close(w.detach(), expected)
    with pytest.raises(ValueError, match="mode"):
        R2LossCallback(reg, mode="proximal")


def _train(tmp_path, variant: str | None, steps: int = 60, **kwargs):  # noqa: ANN001, ANN202
    model = small_bert()
    reg = R2Regularizer(model, variant or "linf", lambda_=0.05, **kwargs)
    callbacks = [R2LossCallback(reg)] if variant else []
    trainer = Trainer(model, args(tmp_path / (variant or "plain"), max_steps=steps, learning_rate=5e-3,
                                  per_device_train_batch_size=16, logging_strategy="steps", logging_steps=10),
                      train_dataset=dataset(512), callbacks=callbacks)
    trainer.train()
    final_loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]
    return reg, final_loss


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):  # noqa: ANN001, ANN201
    return _train(tmp_path_factory.mktemp("r2"), None)


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "symmetric"), [("linf", True), ("margin", True), ("soft_min_max", False)])
def test_each_variant_shrinks_its_range_during_training(tmp_path, baseline, variant, symmetric) -> None:  # noqa: ANN001
    plain_reg, plain_loss = baseline
    reg, loss = _train(tmp_path, variant)
    plain = sum(weight_range(w, symmetric) for w in plain_reg.weights())
    shrunk = sum(weight_range(w, symmetric) for w in reg.weights())
    assert shrunk < 0.85 * plain, (variant, shrunk, plain)
    assert plain_loss < 0.9 and loss < 0.9  # both learned the task (chance level is ln 3 = 1.10)


def test_learnable_parameters_checkpoint_and_resume(tmp_path) -> None:  # noqa: ANN001
    def run(output, resume) -> R2Regularizer:  # noqa: ANN001
        model = small_bert()
        reg = R2Regularizer(model, "margin", lambda_=0.05)
        Trainer(model, args(output, max_steps=4, save_strategy="steps", save_steps=2), train_dataset=dataset(64),
                callbacks=[R2LossCallback(reg)]).train(resume_from_checkpoint=resume)
        return reg

    full = run(tmp_path / "full", None)
    saved = torch.load(tmp_path / "full" / "checkpoint-2" / R2LossCallback.STATE_FILE, weights_only=True)
    assert set(saved) == {"regularizer", "optimizer"}
    # resume (the usual way: the last checkpoint of output_dir) from step 2 of an interrupted run
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = run(tmp_path / "resumed", True)
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-7)
    # without the regularizer's file the margins would restart from their initial values
    assert not torch.equal(R2Regularizer(small_bert(), "margin").state_dict()[key], value)


def test_callback_refuses_a_regularizer_of_another_model(tmp_path) -> None:  # noqa: ANN001
    model = small_bert()
    reg = R2Regularizer(copy.deepcopy(model), "linf")
    trainer = Trainer(model, args(tmp_path, max_steps=1), train_dataset=dataset(8), callbacks=[R2LossCallback(reg)])
    with pytest.raises(ValueError, match="not parameters of the model"):
        trainer.train()
