"""Perplexity from per-token negative log-likelihoods: ``exp(mean NLL)``.

Unlike the Hub's ``perplexity`` metric, it loads no model: the caller runs the model and passes the
NLL (natural log) of each predicted token, e.g. from :func:`hf_splitquant.evaluation.token_nll`.
"""

import datasets
import evaluate

from hf_splitquant.metrics.functional import perplexity_from_nll

_DESCRIPTION = "Perplexity exp(mean NLL) over the given per-token negative log-likelihoods (nats)."
_KWARGS_DESCRIPTION = """
Args:
    nll (list of float): negative log-likelihood of each predicted token, natural log.
Returns:
    perplexity (float): exp of the mean NLL.
    mean_nll (float): mean NLL in nats.
    num_tokens (int): number of tokens.
Examples:
    >>> metric = hf_splitquant.metrics.load("perplexity_from_nll")
    >>> metric.compute(nll=[0.0, 2.0])["perplexity"]  # exp(1)
    2.718281828459045
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PerplexityFromNll(evaluate.Metric):
    """``exp(mean NLL)``."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll": datasets.Value("float64")}),
        )

    def _compute(self, nll):  # noqa: ANN001, ANN202
        return perplexity_from_nll(nll)
