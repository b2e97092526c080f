"""Evaluate a trained model on Ray: test perplexity bound (NELBO with its standard error), zero-shot NELBO on
other prepared corpora, generative perplexity and sample entropy; results to a JSON file and MLflow.

    python pipelines/evaluate.py                                       # models:/mdlm@current on the default corpus
    python pipelines/evaluate.py --model runs/ray/cpu-demo/model --mc-samples 4 --max-rows 256
    python pipelines/evaluate.py --data data/prepared/shakespeare-bpe1024-128 --data other=data/prepared/other
    python pipelines/evaluate.py --gen-samples 16 --gen-steps 128 --evaluator runs/ray/ar-demo/model
    python pipelines/evaluate.py --device cuda --num-actors 4 --evaluator /models/gpt2-large   # local HF dir

The first --data is the model's own corpus (reported as test_*), the others are zero-shot corpora (their
tokenizer must be the model's). The MLflow run is a child of the training run (found from a models:/ or runs:/
URI, or --run-id) in the same experiment; otherwise it goes to experiment 'mdlm-eval'.
"""

from __future__ import annotations

import argparse
import sys

from mdlm.cli import add_verbose_flag
from mdlm.config import load_config
from mdlm.output import setup_output


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models:/mdlm@current",
                   help="model directory, fsspec URL, models:/NAME@ALIAS or runs:/ID/model (default: %(default)s)")
    p.add_argument("--data", action="append", metavar="[NAME=]DIR",
                   help="prepared data directory; repeat for zero-shot corpora (default: the main job's corpus)")
    p.add_argument("--no-data", action="store_true", help="skip the NELBO jobs (generation only)")
    p.add_argument("--split", default="test", help="split to evaluate (default: %(default)s)")
    p.add_argument("--mc-samples", type=int, default=1, help="Monte-Carlo time samples per sequence")
    p.add_argument("--max-rows", type=int, help="evaluate only the first N rows of each corpus")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument("--num-actors", type=int, default=1, help="model-holding Ray actors")
    p.add_argument("--cpus-per-actor", type=float, help="CPUs per actor (default: share the cluster's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per actor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gen-samples", type=int, default=0, help="samples for generative perplexity (0: skip)")
    p.add_argument("--gen-length", type=int, help="tokens per sample (default: the model's max_seq_len)")
    p.add_argument("--gen-steps", type=int, help="sampling steps (default: one per position)")
    p.add_argument("--gen-stride", type=int, help="semi-autoregressive stride, for --gen-length > max_seq_len")
    p.add_argument("--sampler", default="cached", help="ancestral, cached or first_hitting")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--gen-dtype", default="float64", help="float64 (default) or float32 categorical draws")
    p.add_argument("--gen-batch-size", type=int, default=8, help="samples per generation call")
    p.add_argument("--gen-seed", type=int, default=0)
    p.add_argument("--evaluator", help="AR scorer: this project's AR model (dir or URI) or a local HF causal-LM dir")
    p.add_argument("--evaluator-max-length", type=int, help="context of the scorer (default: its own)")
    p.add_argument("--evaluator-stride", type=int, help="window stride for longer texts (default: half the context)")
    p.add_argument("--output", default="runs/eval/results.json", help="results JSON (default: %(default)s)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    p.add_argument("--run-id", help="training run to link the evaluation run to")
    p.add_argument("--runs-dir", default="runs", help="local MLflow store when MLFLOW_TRACKING_URI is unset")
    p.add_argument("--experiment", default="mdlm-eval", help="MLflow experiment when no training run is known")
    p.add_argument("--run-name", help="MLflow run name")
    add_verbose_flag(p)
    return p


# Settings field -> flag, for the fields the flags set: the request is built from these, and an EvalInputError
# naming a field is printed with its flag.
REQUEST_FLAGS = {"model": "--model", "output": "--output", "run_id": "--run-id", "runs_dir": "--runs-dir",
                 "experiment": "--experiment", "run_name": "--run-name"}
NELBO_FLAGS = {"split": "--split", "mc_samples": "--mc-samples", "max_rows": "--max-rows", "batch_size": "--batch-size",
               "num_actors": "--num-actors", "cpus_per_actor": "--cpus-per-actor", "device": "--device",
               "seed": "--seed"}
GEN_FLAGS = {"num_samples": "--gen-samples", "evaluator": "--evaluator", "length": "--gen-length",
             "steps": "--gen-steps", "sampler": "--sampler", "top_p": "--top-p", "dtype": "--gen-dtype",
             "stride": "--gen-stride", "seed": "--gen-seed", "batch_size": "--gen-batch-size",
             "evaluator_max_length": "--evaluator-max-length", "evaluator_stride": "--evaluator-stride"}
FLAGS = {**REQUEST_FLAGS, "data": "--data", **{f"nelbo.{k}": v for k, v in NELBO_FLAGS.items()},
         **{f"gen.{k}": v for k, v in GEN_FLAGS.items()}}


def _values(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, object]:
    return {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in flags.items()}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_output(verbose=args.verbose)
    from mdlm.eval import EvalInputError
    from mdlm.eval.report import format_summary
    from mdlm.eval.run import run_evaluation
    from mdlm.eval.settings import EvalRequest, GenSettings, NelboSettings

    data = [] if args.no_data else (args.data or [load_config("cpu-ray").data.output_dir])
    request = EvalRequest(data=data, mlflow=not args.no_mlflow, **_values(args, REQUEST_FLAGS),
                          nelbo=NelboSettings(**_values(args, NELBO_FLAGS)),
                          gen=GenSettings(**_values(args, GEN_FLAGS)))
    try:
        results = run_evaluation(request)
    except EvalInputError as exc:
        print(f"error: {exc.describe(FLAGS.get(exc.field, exc.field))}", file=sys.stderr)
        return 2
    print(format_summary(results.to_dict()))
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
