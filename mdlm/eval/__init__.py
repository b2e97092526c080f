"""Evaluation of trained models: test NELBO with its standard error, zero-shot NELBO on other prepared corpora,
and generative perplexity with sample entropy (``pipelines/evaluate.py``).

- :mod:`mdlm.eval.metrics`: pure metric functions (``sequence_nll``, ``summarize_nelbo``, ``unigram_entropy``,
  ``generative_perplexity``).
- :mod:`mdlm.eval.evaluator`: autoregressive scorers for generated text (this project's AR baseline or a local
  Hugging Face causal LM).
- :mod:`mdlm.eval.batch`: the Ray Data jobs with model-holding actors, and ``run_evaluation``.
- :mod:`mdlm.eval.report`: results JSON, MLflow run linked to the training run, summary table.
"""

from __future__ import annotations


class EvalInputError(ValueError):
    """Bad evaluation input (missing model or data, mismatched tokenizer, invalid setting); the message names the
    field or file. The CLI turns it into exit code 2 before anything is written."""


__all__ = ["EvalInputError"]
