"""Evaluate a trained model on Ray: test perplexity bound (NELBO with its standard error), zero-shot NELBO on
other prepared corpora, generative perplexity and sample entropy; results to a JSON file and MLflow.

    mdlm evaluate                                          # models:/mdlm@current on the main job's corpus
    mdlm evaluate eval.model=runs/ray/cpu-demo/model eval.nelbo.mc_samples=4 eval.nelbo.max_rows=256
    mdlm evaluate eval.data='[data/prepared/shakespeare-bpe1024-128, other=data/prepared/other]'
    mdlm evaluate eval.gen.num_samples=16 eval.gen.steps=128 eval.gen.evaluator=runs/ray/ar-demo/model
    mdlm evaluate eval.nelbo.device=cuda eval.nelbo.num_actors=4 eval.gen.evaluator=/models/gpt2-large

Settings are the config tree's ``eval`` section (mdlm/eval/settings.py): ``eval.model``, ``eval.data`` (a list
of [NAME=]DIR; default the preset's data.output_dir; [] for generation only), ``eval.output`` (default
runs/eval/results.json), ``eval.mlflow``, ``eval.run_id``, ``eval.nelbo.*`` (split, mc_samples, max_rows,
batch_size, num_actors, device, cpus_per_actor, seed) and ``eval.gen.*`` (num_samples, evaluator, length,
steps, sampler, top_p, dtype, stride, seed, batch_size, evaluator_max_length, evaluator_stride).
The first corpus is the model's own (reported as test_*), the others are zero-shot (their tokenizer must be the
model's). The MLflow run is a child of the training run (found from a models:/ or runs:/ URI, or eval.run_id)
in the same experiment; otherwise it goes to experiment eval.experiment ('mdlm-eval').
(``python pipelines/evaluate.py ...`` is the same command.)
"""

from __future__ import annotations

import dataclasses
import sys

from mdlm.cli import config_parser, load_config_or_exit
from mdlm.output import setup_output


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = config_parser(__doc__, default_preset="cpu-ray", prog=prog).parse_args(argv)
    setup_output(verbose=args.verbose)
    config = load_config_or_exit(args.preset, args.overrides)
    from mdlm.eval import EvalInputError
    from mdlm.eval.report import format_summary
    from mdlm.eval.run import run_evaluation
    from mdlm.eval.settings import DEFAULT_RESULTS

    request = dataclasses.replace(
        config.eval, data=[config.data.output_dir] if config.eval.data is None else config.eval.data,
        output=config.eval.output or DEFAULT_RESULTS)
    try:
        results = run_evaluation(request)
    except EvalInputError as exc:
        print(f"error: {exc.describe(f'eval.{exc.field}')}", file=sys.stderr)
        return 2
    print(format_summary(results.to_dict()))
    print(f"results: {request.output}")
    return 0
