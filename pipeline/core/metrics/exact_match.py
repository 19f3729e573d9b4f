"""Exact match, as an `evaluate` metric module loaded by path (the Hub copy cannot be fetched offline); what counts
as a match is `pipeline.core.scoring.same_answer`, the one definition the rewards and the report use too."""

import datasets
import evaluate

from pipeline.core.scoring import same_answer

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

    def _compute(self, predictions, references):
        matches = [same_answer(p, r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(matches) / len(matches) if matches else 0.0}
