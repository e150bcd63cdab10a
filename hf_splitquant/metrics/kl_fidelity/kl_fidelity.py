"""Fidelity of a quantized model's logits to the float model's: KL divergence and top-1 agreement.

Each row is one position (a token, or a sequence for classifiers): ``predictions`` are the
quantized model's logits, ``references`` the float model's. ``kl_divergence`` is the mean over rows
of ``KL(softmax(reference) || softmax(prediction))`` in nats (float64), ``top1_agreement`` the
fraction of rows where both argmaxes agree.
"""

import datasets
import evaluate
import torch

from hf_splitquant.metrics.functional import kl_divergence, top1_agreement

_DESCRIPTION = "Mean KL(float || quantized) of softmax distributions and top-1 agreement, from logits rows."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of float): logits rows of the quantized model.
    references (list of list of float): logits rows of the float model, same shape.
Returns:
    kl_divergence (float): mean over rows of KL(softmax(reference) || softmax(prediction)), nats.
    top1_agreement (float): fraction of rows whose argmaxes agree.
    num_rows (int): number of rows.
Examples:
    >>> metric = hf_splitquant.metrics.load("kl_fidelity")
    >>> metric.compute(predictions=[[0.0, 0.0]], references=[[0.0, 0.0]])["kl_divergence"]
    0.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class KlFidelity(evaluate.Metric):
    """Mean ``KL(reference || prediction)`` and top-1 agreement over logits rows."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("float32")),
                "references": datasets.Sequence(datasets.Value("float32")),
            }),
        )

    def _compute(self, predictions, references):  # noqa: ANN001, ANN202
        pred = torch.as_tensor(predictions, dtype=torch.float32)
        ref = torch.as_tensor(references, dtype=torch.float32)
        if pred.dim() != 2 or pred.shape[0] == 0:
            raise ValueError("kl_fidelity needs at least one row of equal-length logits")
        return {
            "kl_divergence": float(kl_divergence(ref, pred).mean()),
            "top1_agreement": float(top1_agreement(ref, pred).mean()),
            "num_rows": int(pred.shape[0]),
        }
