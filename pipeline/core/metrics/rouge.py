"""ROUGE-1/2/L with the `rouge_score` library, as an `evaluate` metric module loaded by path."""

import datasets
import evaluate
import numpy as np
from rouge_score import rouge_scorer

# The mean of per-example F-measures: rouge_score's BootstrapAggregator resamples with an unseeded RNG, so
# its estimate changed between two evaluations of the same predictions.
_DESCRIPTION = "ROUGE F-measures (rouge1, rouge2, rougeL), averaged over examples."


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, rouge_types=("rouge1", "rouge2", "rougeL")):
        scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=False)
        scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
        return {key: float(np.mean([s[key].fmeasure for s in scores])) if scores else 0.0 for key in rouge_types}
