"""Cosine similarity between embeddings of a quantized model and of the float model.

Each row is one text's embedding (e.g. mean-pooled last hidden state): ``predictions`` from the
quantized model, ``references`` from the float model. ``cosine`` is the mean over rows,
``min_cosine`` the worst row.
"""

import datasets
import evaluate
import torch

from hf_splitquant.metrics.functional import cosine_similarity

_DESCRIPTION = "Mean and minimum row-wise cosine similarity between two sets of embeddings."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of float): embedding rows of the quantized model.
    references (list of list of float): embedding rows of the float model, same shape.
Returns:
    cosine (float): mean cosine similarity over rows.
    min_cosine (float): smallest row cosine.
    num_rows (int): number of rows.
Examples:
    >>> metric = hf_splitquant.metrics.load("embedding_cosine")
    >>> metric.compute(predictions=[[1.0, 0.0]], references=[[1.0, 1.0]])["cosine"]  # 1/sqrt(2)
    0.7071067811865475
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EmbeddingCosine(evaluate.Metric):
    """Row-wise cosine similarity, mean and minimum."""

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
            raise ValueError("embedding_cosine needs at least one row of equal-length embeddings")
        cos = cosine_similarity(ref, pred)
        return {"cosine": float(cos.mean()), "min_cosine": float(cos.min()), "num_rows": int(pred.shape[0])}
