"""Evaluation of trained models: test NELBO with its standard error, zero-shot NELBO on other prepared corpora,
and generative perplexity with sample entropy (``mdlm evaluate``).

- :mod:`mdlm.eval.metrics`: pure metric functions (``sequence_nll``, ``summarize_nelbo``, ``unigram_entropy``,
  ``generative_perplexity``).
- :mod:`mdlm.eval.evaluator`: autoregressive scorers for generated text (this project's AR baseline or a local
  Hugging Face causal LM).
- :mod:`mdlm.eval.settings`: what an evaluation asks for (``EvalRequest``, ``NelboSettings``, ``GenSettings``).
- :mod:`mdlm.eval.inputs`: the model and the prepared corpora, resolved and checked before any Ray work.
- :mod:`mdlm.eval.datasource`: the Ray Data datasource that reads the corpora's rows with their indices.
- :mod:`mdlm.eval.pool`: what the model-holding actors share (resources, model files via the object store).
- :mod:`mdlm.eval.nelbo`: the NELBO job; :mod:`mdlm.eval.generation`: the generative-perplexity job.
- :mod:`mdlm.eval.results`: the typed results and their JSON form.
- :mod:`mdlm.eval.run`: ``run_evaluation``, the whole evaluation.
- :mod:`mdlm.eval.report`: results JSON, MLflow run linked to the training run, summary table.
"""

from __future__ import annotations


class EvalInputError(ValueError):
    """Bad evaluation input (missing model or data, mismatched tokenizer, invalid setting), raised before anything
    is written. ``field`` is the :class:`~mdlm.eval.settings.EvalRequest` field at fault (``model``, ``data``,
    ``nelbo.mc_samples``, ``gen.evaluator``...), ``value`` the value it is about when there is one (a path, a URI).
    The CLI prints :meth:`describe` with the field's flag (exit code 2)."""

    def __init__(self, field: str, message: str, value: str | None = None) -> None:
        self.field, self.message, self.value = field, message, value
        super().__init__(self.describe(field))

    def describe(self, name: str) -> str:
        """The message with the field called ``name`` (the CLI passes its flag)."""
        subject = name if self.value is None else f"{name} {self.value}"
        return f"{subject}: {self.message}"


__all__ = ["EvalInputError"]
