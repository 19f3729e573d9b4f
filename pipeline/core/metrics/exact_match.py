"""Exact match, as an `evaluate` metric module loaded by path (the Hub copy cannot be fetched offline)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Share of predictions equal to their reference after stripping surrounding whitespace."


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, ignore_case=False):
        preds = np.char.strip(np.asarray(predictions, dtype=str))
        refs = np.char.strip(np.asarray(references, dtype=str))
        if ignore_case:
            preds, refs = np.char.lower(preds), np.char.lower(refs)
        return {"exact_match": float(np.mean(preds == refs)) if len(refs) else 0.0}
