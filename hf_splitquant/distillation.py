"""Knowledge distillation from a float teacher, as a loss for the stock ``transformers.Trainer``.

Quantization-aware training of a causal LM at 2-3 bits learns much faster when the quantized student
matches the float model's next-token distribution (a dense signal over the whole vocabulary) instead
of only the one-hot next token. :func:`distillation_loss` returns a callable for
``Trainer(compute_loss_func=...)``::

    teacher = AutoModelForCausalLM.from_pretrained(float_dir)          # the float model, kept as is
    student = hf_splitquant.prepare_qat(AutoModelForCausalLM.from_pretrained(float_dir), config)
    loss = hf_splitquant.distillation_loss(teacher, student, temperature=1.0, alpha=1.0)
    Trainer(student, args, train_dataset=..., compute_loss_func=loss).train()

Per predicted token ``t`` (position ``t`` predicts token ``t + 1``)::

    loss_t = alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + (1 - alpha) * CE(z_student, y_t+1)

summed over the tokens that have a target (shifted ``labels != -100``; without labels, shifted
``attention_mask == 1``) and divided by ``num_items_in_batch`` (the Trainer's count of such tokens
over the whole accumulated batch, so gradient accumulation gives the same gradient as one big
batch) or, when that is not given, by this batch's count.

Why a hook: the Trainer hands ``compute_loss_func`` only the student's outputs and the labels, not
the inputs the teacher needs. The loss therefore registers a forward pre-hook on the student that
records the input tensors of each forward call (references, no copy), and runs the teacher on them
when the loss is computed, under ``torch.no_grad`` and in eval mode. The teacher never trains: its
parameters get ``requires_grad=False``, and it is not a submodule of the student, so the Trainer's
optimizer, checkpoints and ``save_pretrained`` never see it. Its memory (parameters + buffers) is
logged and available as :attr:`DistillationLoss.teacher_bytes`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["DistillationLoss", "distillation_loss", "distillation_terms", "module_bytes"]

#: model inputs that are targets or loss bookkeeping, never given to the teacher
_NOT_TEACHER_INPUTS = ("labels", "shift_labels", "num_items_in_batch", "return_dict", "output_hidden_states",
                       "output_attentions", "use_cache", "past_key_values")


def module_bytes(module: nn.Module) -> int:
    """Bytes held by ``module``'s parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def _shifted_targets(labels: torch.Tensor | None, attention_mask: torch.Tensor | None, shape: torch.Size,
                     ignore_index: int, device: torch.device,
                     shift_labels: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(targets ``[B, T-1]`` or ``None``, mask ``[B, T-1]``) of the predictions at positions ``0..T-2``."""
    if shift_labels is not None:  # padding-free collators give targets already aligned with the logits
        targets = shift_labels.to(device)[:, : shape[1]]
        return targets, targets.ne(ignore_index)
    if labels is not None:
        targets = labels.to(device)[:, 1:]
        return targets, targets.ne(ignore_index)
    if attention_mask is not None:
        mask = attention_mask.to(device)[:, 1:].bool() & attention_mask.to(device)[:, :-1].bool()
        return None, mask
    return None, torch.ones(shape[0], shape[1] - 1, dtype=torch.bool, device=device)


def distillation_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                       temperature: float = 1.0, ignore_index: int = -100,
                       shift_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Summed (not averaged) token-level distillation terms of a causal LM batch.

    Args:
        student_logits / teacher_logits: ``[batch, seq, vocab]`` logits of the same inputs.
        labels: ``[batch, seq]`` token ids with ``ignore_index`` where no loss is wanted (padding,
            prompts); position ``t``'s logits are scored against ``labels[:, t + 1]``.
        attention_mask: used for the mask only when ``labels`` is ``None``.
        temperature: softens both distributions; the KL term is multiplied by ``temperature**2`` so its
            gradient keeps the same size for any temperature (Hinton et al., 2015).
        shift_labels: targets already aligned with the logits (instead of ``labels``).

    Returns:
        ``{"kl": sum over tokens of T^2 * KL(teacher || student), "ce": sum of the student's
        cross-entropy (0 without labels), "tokens": number of tokens counted}``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: are they the same model family and inputs?")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be positive, got {temperature!r}")
    device = student_logits.device
    shape = student_logits.shape
    targets, mask = _shifted_targets(labels, attention_mask, shape, ignore_index, device, shift_labels)
    width = mask.shape[1]
    # keep only the counted positions: padding costs no vocabulary-sized work
    student = student_logits[:, :width][mask].float()
    teacher = teacher_logits[:, :width][mask].to(device).float()
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum") * temperature**2
    if targets is not None:
        ce = F.cross_entropy(student, targets[mask], reduction="sum")
    else:
        ce = student.new_zeros(())
    return {"kl": kl, "ce": ce, "tokens": mask.sum()}


class DistillationLoss:
    """``Trainer(compute_loss_func=...)`` loss: KL to a float teacher's logits, mixed with the task loss.

    Build it with :func:`distillation_loss`. Calling it as ``loss(outputs, labels,
    num_items_in_batch=None)`` (the Trainer's signature) runs the teacher on the inputs of the
    student's latest forward call and returns the mixed loss. ``stats`` accumulates the summed KL,
    cross-entropy and token count since the last :meth:`pop_stats` (for logging curves).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, temperature: float = 1.0, alpha: float = 1.0,
                 ignore_index: int = -100) -> None:
        if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
            raise ValueError("distillation_loss needs the teacher and the student as torch modules")
        if teacher is student:
            raise ValueError("the teacher is the student: pass a separate float copy of the model as the teacher "
                             "(e.g. load it again, or copy.deepcopy before prepare_qat)")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` (the weight of the distillation term) must be in [0, 1], got {alpha!r}")
        if not temperature > 0:
            raise ValueError(f"`temperature` must be positive, got {temperature!r}")
        self.teacher = teacher.eval()
        self.teacher.requires_grad_(False)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.ignore_index = int(ignore_index)
        self.teacher_bytes = module_bytes(teacher)
        self._inputs: dict[str, Any] | None = None
        self.stats = {"kl": 0.0, "ce": 0.0, "tokens": 0}
        self._handle = student.register_forward_pre_hook(self._record_inputs, with_kwargs=True)
        logger.info(f"distillation: teacher {type(teacher).__name__} holds {self.teacher_bytes / 2**20:.1f} MiB "
                    f"(parameters and buffers), temperature {self.temperature}, alpha {self.alpha}")

    # -- inputs ---------------------------------------------------------------------------------

    def _record_inputs(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        inputs = {k: v for k, v in kwargs.items() if k not in _NOT_TEACHER_INPUTS and isinstance(v, torch.Tensor)}
        if args and isinstance(args[0], torch.Tensor) and "input_ids" not in inputs:
            inputs["input_ids"] = args[0]
        if "shift_labels" in kwargs:
            inputs["__shift_labels"] = kwargs["shift_labels"]
        self._inputs = inputs

    def detach(self) -> None:
        """Remove the hook from the student (the loss can no longer be computed)."""
        self._handle.remove()

    def teacher_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's logits on ``inputs`` (no gradients, eval mode, on the teacher's device)."""
        device = next(self.teacher.parameters()).device
        self.teacher.eval()
        with torch.no_grad():
            out = self.teacher(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]

    # -- the loss -------------------------------------------------------------------------------

    def __call__(self, outputs: Any, labels: torch.Tensor | None,
                 num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        if self._inputs is None:
            raise RuntimeError("distillation loss: the student has not run a forward pass since this loss was built; "
                               "build it with the model the Trainer trains (distillation_loss(teacher, student))")
        inputs, self._inputs = self._inputs, None
        shift_labels = inputs.pop("__shift_labels", None)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        if self.alpha < 1.0 and labels is None and shift_labels is None:
            raise ValueError(f"distillation loss with alpha={self.alpha} mixes in the task loss, which needs `labels` "
                             "in the batch (e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False)); or use alpha=1")
        teacher = self.teacher_logits(inputs) if self.alpha > 0 else logits.detach()
        terms = distillation_terms(logits, teacher, labels, inputs.get("attention_mask"), self.temperature,
                                   self.ignore_index, shift_labels)
        del teacher
        loss = self.alpha * terms["kl"] + (1.0 - self.alpha) * terms["ce"]
        if num_items_in_batch is not None:
            count = num_items_in_batch.to(loss.device) if isinstance(num_items_in_batch, torch.Tensor) else \
                float(num_items_in_batch)
        else:
            count = terms["tokens"].clamp_min(1)
        tokens = int(terms["tokens"])
        self.stats["kl"] += float(terms["kl"].detach())
        self.stats["ce"] += float(terms["ce"].detach())
        self.stats["tokens"] += tokens
        return loss / count

    def pop_stats(self) -> dict[str, float]:
        """Mean KL and cross-entropy per token since the last call (``nan`` when no token was seen), and
        the token count; then reset."""
        s, self.stats = self.stats, {"kl": 0.0, "ce": 0.0, "tokens": 0}
        n = s["tokens"]
        return {"kl": s["kl"] / n if n else math.nan, "ce": s["ce"] / n if n else math.nan, "tokens": n}


def distillation_loss(teacher: nn.Module, student: nn.Module, temperature: float = 1.0,
                      alpha: float = 1.0, ignore_index: int = -100) -> DistillationLoss:
    """A ``Trainer(compute_loss_func=...)`` loss distilling ``teacher`` (float) into ``student``.

    Args:
        teacher: the float model (same tokenizer and vocabulary); put into eval mode and frozen.
        student: the model the Trainer trains (e.g. after :func:`hf_splitquant.prepare_qat`); a forward
            pre-hook records its inputs so that the teacher sees the same batch.
        temperature: softmax temperature of both distributions (the KL term is scaled by ``T^2``).
        alpha: weight of the distillation term; ``1 - alpha`` weights the student's own next-token
            cross-entropy on ``labels`` (``alpha=1``: pure distillation, labels only mark the tokens).
        ignore_index: label value of tokens without a target.

    See the module docstring for the exact loss and its normalisation.
    """
    return DistillationLoss(teacher, student, temperature=temperature, alpha=alpha, ignore_index=ignore_index)
