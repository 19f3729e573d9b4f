"""Corpus BLEU with the `sacrebleu` library, as an `evaluate` metric module loaded by path."""

import datasets
import evaluate
import sacrebleu as scb

_DESCRIPTION = "Corpus-level BLEU (0-100) computed by sacrebleu with its default 13a tokenizer."


class Sacrebleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, 2018. A Call for Clarity in Reporting BLEU Scores.",
            inputs_description="predictions: list of str; references: list of str (one reference each)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        bleu = scb.corpus_bleu(list(predictions), [list(references)])
        return {"sacrebleu": float(bleu.score)}
