"""Top-1 accuracy as an ``evaluate`` metric script that works offline.

``evaluate.load("accuracy")`` fetches its script from the Hugging Face Hub; this file is a local,
self-contained replacement (it imports nothing from hf_prune, because ``evaluate`` copies the
script into its own module cache before importing it):

    import evaluate
    metric = evaluate.load("/path/to/hf_prune/metrics/accuracy.py")
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])   # {"accuracy": 0.666...}
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the fraction of predictions that equal the references:
accuracy = (number of correct predictions) / (number of predictions).
With `normalize=False` the number of correct predictions is returned instead; `sample_weight`
weights each example.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`, defaults to `True`): return the fraction (True) or the count (False) of
        correct predictions.
    sample_weight (`list` of `float`, optional): per-example weights.
Returns:
    accuracy (`float` or `int`): in [0, 1] when `normalize=True`, else the (weighted) count.
Example:
    >>> metric = evaluate.load("hf_prune/metrics/accuracy.py")
    >>> metric.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=[],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(
                f"predictions and references differ in length: "
                f"{predictions.shape} vs {references.shape}"
            )
        correct = (predictions == references).astype(np.float64)
        if sample_weight is None:
            weights = np.ones_like(correct)
        else:
            weights = np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * weights).sum())
        if normalize:
            denom = float(weights.sum())
            return {"accuracy": total / denom if denom else 0.0}
        return {"accuracy": total if sample_weight is not None else int(total)}
