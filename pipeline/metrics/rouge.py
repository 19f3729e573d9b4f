"""ROUGE-1/2/L with the `rouge_score` library, as an `evaluate` metric module loaded by path."""

import datasets
import evaluate
from rouge_score import rouge_scorer
from rouge_score import scoring

_DESCRIPTION = "ROUGE F-measures (rouge1, rouge2, rougeL), aggregated with rouge_score's bootstrap aggregator."


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, rouge_types=("rouge1", "rouge2", "rougeL")):
        scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=False)
        aggregator = scoring.BootstrapAggregator(n_samples=1000)
        for prediction, reference in zip(predictions, references):
            aggregator.add_scores(scorer.score(reference, prediction))
        result = aggregator.aggregate()
        return {key: float(result[key].mid.fmeasure) for key in rouge_types}
