"""``TrainerCallback``\\ s for the stock ``transformers.Trainer`` (no subclass needed): R2-Loss and QAT.

**Where the R2 gradient goes (transformers 5.23, ``Trainer._inner_training_loop``).** For every
optimizer step the Trainer runs, in this order: forward + backward of each micro-batch (gradients
accumulate), then ``_clip_grad_norm`` (when ``max_grad_norm > 0``; with fp16 it unscales first),
then ``callback.on_pre_optimizer_step``, ``optimizer.step()``, ``on_optimizer_step``, the LR
scheduler, ``model.zero_grad()`` and ``on_step_end``. Because the R2 terms depend on the weights
only (not on the batch), :class:`R2LossCallback` adds ``lambda * dR/dW`` to each weight's ``.grad``
exactly once per optimizer step in ``on_pre_optimizer_step``, whatever the number of accumulation
steps: with ``max_grad_norm=0`` the update is exactly that of ``L_task + lambda * R``. Clipping has
already happened at that point, so the R2 gradient is **not clipped** and does not count in the
logged ``grad_norm`` (like decoupled weight decay in AdamW); the task gradient is clipped alone. We
keep it that way on purpose: adding the term before the backward passes would interact with fp16
loss scaling and DDP's gradient buckets. With an fp16 ``GradScaler`` and no clipping the callback
unscales the gradients itself (``scaler.unscale_``) before adding the unscaled R2 term.

``mode="decoupled"`` instead takes one plain gradient step on ``R`` right after the optimizer step
(``on_optimizer_step``): ``W <- W - lambda * dR/dW``. With Adam the coupled form moves each weight by
at most about ``lr`` per step, whatever ``lambda``; the decoupled form shrinks the ranges at a rate
set by ``lambda`` alone (what a short fine-tune needs, see ``benchmarks/bench_training.py``).

**Learnable margins / temperatures.** They live in the :class:`~hf_splitquant.methods.r2_loss.R2Regularizer`
(an ``nn.Module`` that references the model's layers without registering them), not on the model:
the model's ``state_dict`` keys and its saved checkpoints are unchanged, and the Trainer's
optimizer never sees them. The callback gives them their own small Adam optimizer (``param_lr``)
and steps it in the same hook. They are saved by the callback to ``r2_regularizer.pt`` inside each
Trainer checkpoint folder (``on_save``) and restored when a run resumes (``on_train_begin`` with
``global_step > 0`` looks in ``output_dir/checkpoint-<step>``, or in ``resume_from``); after
training, ``regularizer.state_dict()`` holds them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ..methods.r2_loss import R2Regularizer

logger = logging.get_logger(__name__)

__all__ = ["R2LossCallback", "QATCallback"]


def _checkpoint_dir(args: TrainingArguments, step: int) -> str:
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def _check_non_negative_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer{' or None' if allow_none else ''}, got {value!r}")


class R2LossCallback(TrainerCallback):
    """Add R2-Loss to a stock ``Trainer`` run: ``L = L_task + lambda(step) * sum_l R(W_l)``.

    Args:
        regularizer: the :class:`~hf_splitquant.methods.r2_loss.R2Regularizer` built on the model
            that the Trainer trains (its ``lambda_`` is the full-strength weight).
        warmup_steps: ramp lambda linearly from ``lambda_ / warmup_steps`` to ``lambda_`` over this many
            optimizer steps after ``start_step`` (0: constant).
        start_step: optimizer steps without R2 at the start of training.
        schedule: optional ``callable(step) -> lambda`` replacing the built-in schedule.
        param_lr: learning rate of the Adam optimizer of the learnable margins / temperatures (Adam
            moves each by about ``param_lr`` per step: margins are in weight units, so keep it well
            below the weights' scale).
        mode: ``"gradient"`` (default): ``lambda * dR/dW`` joins the task gradient before the Trainer's
            optimizer step (exactly ``L_task + lambda * R``; with Adam each weight then moves at most
            about ``lr`` per step, so a short fine-tune barely changes ranges). ``"decoupled"``: after
            the optimizer step, one plain gradient step ``W <- W - lambda * dR/dW`` (like AdamW's
            decoupled weight decay; ``lambda`` is then a step size: with the L-inf form every
            regularized extreme moves ``lambda`` toward 0 per step).
        resume_from: a checkpoint folder to restore the regularizer's parameters from (default: the
            Trainer's ``output_dir/checkpoint-<global_step>`` when the run resumes).

    After each step, ``history`` has ``{"step", "r2", "lambda"}`` and logs get ``r2_loss`` /
    ``r2_lambda`` entries.
    """

    STATE_FILE = "r2_regularizer.pt"
    MODES = ("gradient", "decoupled")

    def __init__(self, regularizer: R2Regularizer, warmup_steps: int = 0, start_step: int = 0,
                 schedule: Callable[[int], float] | None = None, param_lr: float = 1e-3,
                 resume_from: str | os.PathLike | None = None, mode: str = "gradient") -> None:
        if mode not in self.MODES:
            raise ValueError(f"`mode` must be one of {self.MODES}, got {mode!r}")
        if not isinstance(regularizer, R2Regularizer):
            raise ValueError(f"`regularizer` must be an R2Regularizer, got {type(regularizer).__name__}")
        _check_non_negative_int("warmup_steps", warmup_steps)
        _check_non_negative_int("start_step", start_step)
        if schedule is not None and not callable(schedule):
            raise ValueError("`schedule` must be a callable step -> lambda, or None")
        if not param_lr > 0:
            raise ValueError(f"`param_lr` must be positive, got {param_lr!r}")
        self.regularizer = regularizer
        self.mode = mode
        self.warmup_steps = warmup_steps
        self.start_step = start_step
        self.schedule = schedule
        self.param_lr = float(param_lr)
        self.resume_from = os.fspath(resume_from) if resume_from is not None else None
        params = [p for p in regularizer.parameters() if p.requires_grad]
        self.param_optimizer = torch.optim.Adam(params, lr=self.param_lr) if params else None
        self.history: list[dict[str, float]] = []

    def lambda_at(self, step: int) -> float:
        """The R2 weight used for the optimizer step that follows ``step`` completed steps."""
        if self.schedule is not None:
            return float(self.schedule(step))
        if step < self.start_step:
            return 0.0
        if self.warmup_steps:
            return self.regularizer.lambda_ * min(1.0, (step - self.start_step + 1) / self.warmup_steps)
        return self.regularizer.lambda_

    # -- checkpoints ---------------------------------------------------------------------------

    def save_state(self, folder: str | os.PathLike) -> None:
        """Write the regularizer's parameters and their optimizer state to ``folder``."""
        payload = {"regularizer": self.regularizer.state_dict(),
                   "optimizer": self.param_optimizer.state_dict() if self.param_optimizer is not None else None}
        torch.save(payload, os.path.join(folder, self.STATE_FILE))

    def load_state(self, folder: str | os.PathLike) -> bool:
        """Restore what :meth:`save_state` wrote; returns whether a state file was found."""
        path = os.path.join(folder, self.STATE_FILE)
        if not os.path.isfile(path):
            return False
        payload = torch.load(path, map_location="cpu", weights_only=True)
        self.regularizer.load_state_dict(payload["regularizer"])
        if self.param_optimizer is not None and payload.get("optimizer") is not None:
            self.param_optimizer.load_state_dict(payload["optimizer"])
        return True

    # -- events --------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None:
            owned = {id(p) for p in model.parameters()}
            foreign = [n for n, w in zip(self.regularizer.layer_names, self.regularizer.weights()) if id(w) not in owned]
            if foreign:
                raise ValueError(
                    f"R2LossCallback: the regularizer's layers (e.g. `{foreign[0]}`) are not parameters of the model "
                    "the Trainer trains; build the R2Regularizer on that model (after any prepare_qat / copy)"
                )
        folder = self.resume_from or (_checkpoint_dir(args, state.global_step) if state.global_step > 0 else None)
        if folder is not None:
            if self.load_state(folder):
                logger.info(f"R2LossCallback: restored the regularizer from {folder}")
            elif len(list(self.regularizer.parameters())):
                logger.warning(f"R2LossCallback: no {self.STATE_FILE} in {folder}; the learnable R2 parameters "
                               "start from their initial values")

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: Any = None, **kwargs: Any) -> None:
        if self.mode != "gradient" or (self.schedule is None and state.global_step < self.start_step):
            return
        lam = self.lambda_at(state.global_step)
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None and lam:
            # gradients are still scaled when no clipping ran (clipping unscales them); a second unscale_
            # in the same step raises RuntimeError, which means they are unscaled already
            with contextlib.suppress(RuntimeError):
                scaler.unscale_(optimizer.optimizer)
        value = self.regularizer.add_gradients(lam)
        self._finish_step(state, value, lam)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        if self.mode != "decoupled" or (self.schedule is None and state.global_step < self.start_step):
            return
        lam = self.lambda_at(state.global_step)
        self._finish_step(state, self.regularizer.descend(lam), lam)

    def _finish_step(self, state: TrainerState, value: float, lam: float) -> None:
        if self.param_optimizer is not None:
            self.param_optimizer.step()
            self.param_optimizer.zero_grad(set_to_none=True)
            self.regularizer.clamp_parameters()
        self.history.append({"step": state.global_step, "r2": value, "lambda": lam})

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is not None and self.history and "loss" in logs:
            logs["r2_loss"] = round(self.history[-1]["r2"], 6)
            logs["r2_lambda"] = self.history[-1]["lambda"]

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        folder = _checkpoint_dir(args, state.global_step)
        if state.is_world_process_zero and os.path.isdir(folder):
            self.save_state(folder)


class QATCallback(TrainerCallback):
    """Schedule quantization-aware training in a stock ``Trainer`` run.

    Args:
        start_step: optimizer steps trained in float before fake quantization starts (learned
            scales are initialised from the weights at that point).
        freeze_scales_step: from this step on, keep every layer's grid (scales, zero points,
            clusters) fixed; ``None``: the grids follow the weights to the end.
        freeze_on_train_end: pack the model (:func:`hf_splitquant.freeze`) when training ends, so
            ``trainer.save_model()`` / ``save_pretrained`` write the packed format.
        resume_from: a checkpoint folder to restore the grid state from (default: the Trainer's
            ``output_dir/checkpoint-<global_step>`` when the run resumes).

    The grid state that is not in the model's ``state_dict`` (cached SplitQuant clusters, frozen
    grids, flags) is written to ``qat_state.pt`` in every checkpoint folder. When training ends, the
    autocast wrapper a ``bf16=True`` / ``fp16=True`` run leaves on ``model.forward`` is removed
    (:func:`hf_splitquant.remove_autocast_forward`), so the trained model is evaluated and frozen in its own dtype.
    """

    STATE_FILE = "qat_state.pt"

    def __init__(self, start_step: int = 0, freeze_scales_step: int | None = None,
                 freeze_on_train_end: bool = False, resume_from: str | os.PathLike | None = None) -> None:
        _check_non_negative_int("start_step", start_step)
        _check_non_negative_int("freeze_scales_step", freeze_scales_step, allow_none=True)
        if freeze_scales_step is not None and freeze_scales_step < start_step:
            raise ValueError(f"`freeze_scales_step` ({freeze_scales_step}) must be >= `start_step` ({start_step})")
        self.start_step = start_step
        self.freeze_scales_step = freeze_scales_step
        self.freeze_on_train_end = bool(freeze_on_train_end)
        self.resume_from = os.fspath(resume_from) if resume_from is not None else None

    @staticmethod
    def _modules(model: nn.Module | None) -> list:
        from ..qat import iter_fake_quant_modules

        modules = list(iter_fake_quant_modules(model)) if model is not None else []
        if not modules:
            raise ValueError("QATCallback: the model has no FakeQuantLinear layer; prepare it with "
                             "hf_splitquant.prepare_qat(model, config) or from_pretrained(..., "
                             "quantization_config=SplitQuantConfig(qat=True, ...))")
        return modules

    def _apply(self, model: nn.Module, step: int) -> None:
        from ..qat import set_fake_quant

        set_fake_quant(model, step >= self.start_step)
        if self.freeze_scales_step is not None and step >= self.freeze_scales_step:
            for _, module in self._modules(model):
                if not module.grid_frozen:
                    module.freeze_grid()

    def save_state(self, model: nn.Module, folder: str | os.PathLike) -> None:
        payload = {name: module.qat_state() for name, module in self._modules(model)}
        torch.save(payload, os.path.join(folder, self.STATE_FILE))

    def load_state(self, model: nn.Module, folder: str | os.PathLike) -> bool:
        path = os.path.join(folder, self.STATE_FILE)
        if not os.path.isfile(path):
            return False
        payload = torch.load(path, map_location="cpu", weights_only=True)
        for name, module in self._modules(model):
            if name in payload:
                module.load_qat_state(payload[name])
        return True

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        self._modules(model)
        folder = self.resume_from or (_checkpoint_dir(args, state.global_step) if state.global_step > 0 else None)
        if folder is not None and not self.load_state(model, folder):
            logger.warning(f"QATCallback: no {self.STATE_FILE} in {folder}; grids are recomputed from the weights")
        self._apply(model, state.global_step)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      model: nn.Module | None = None, **kwargs: Any) -> None:
        self._apply(model, state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None, **kwargs: Any) -> None:
        folder = _checkpoint_dir(args, state.global_step)
        if state.is_world_process_zero and os.path.isdir(folder):
            self.save_state(model, folder)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs: Any) -> None:
        from .transformers import remove_autocast_forward

        if model is not None and remove_autocast_forward(model):
            logger.info("QATCallback: removed the mixed-precision autocast wrapper of model.forward left by training")
        if self.freeze_on_train_end:
            from .transformers import freeze

            freeze(model)
            logger.info("QATCallback: packed the model (freeze_on_train_end=True)")
