"""Classification accuracy: the fraction of predicted labels equal to the gold labels."""

import datasets
import evaluate

from hf_splitquant.metrics.functional import accuracy

_DESCRIPTION = "Fraction of predictions equal to the references."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted label ids.
    references (list of int): gold label ids.
Returns:
    accuracy (float): fraction of equal labels.
    num_examples (int): number of examples.
Examples:
    >>> metric = hf_splitquant.metrics.load("classification_accuracy")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])["accuracy"]
    0.75
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClassificationAccuracy(evaluate.Metric):
    """Fraction of equal labels."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):  # noqa: ANN001, ANN202
        return accuracy(predictions, references)
