"""Train MDLM (or the AR baseline) on Ray Train with FSDP2, tracked in MLflow.

    mdlm train                                      # CPU demo: 2 workers, default corpus
    mdlm train model.kind=ar run.name=ar-demo       # the baseline, side by side in MLflow
    mdlm train --preset small run.use_gpu=true run.num_workers=8 training.precision=bf16
    ray job submit --working-dir . -- python pipelines/train.py run.name=demo \
        run.storage_path=$PWD/runs/ray data.output_dir=$PWD/data/prepared/shakespeare-bpe1024-128  # absolute
    mdlm train run.name=demo                        # same name again: resumes
    mdlm train --resume-from runs/ray/demo/checkpoint_...   # (or run.resume_from=...)
    mdlm train --verbose                            # also Ray's, Ray Data's and MLflow's own output

(``python pipelines/train.py ...`` is the same command.)"""

from __future__ import annotations

import sys

from mdlm.cli import config_parser, load_config_or_exit
from mdlm.output import setup_output


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = config_parser(__doc__, default_preset="cpu-ray", prog=prog)
    parser.add_argument("--resume-from", help="checkpoint directory to start from (if the run has none of its own)")
    args = parser.parse_args(argv)
    setup_output(verbose=args.verbose)
    overrides = list(args.overrides) + ([f"run.resume_from={args.resume_from}"] if args.resume_from else [])
    config = load_config_or_exit(args.preset, overrides)

    from mdlm.train.launcher import TrainingError, mlflow_ui_command, train

    try:
        result = train(config)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.ray_logs:
            print(f"  Ray logs:     {exc.ray_logs}", file=sys.stderr)
        return 1
    for i, text in enumerate(result.samples):
        print(f"--- sample {i} ---\n{text.strip()}")
    shown = {k: round(v, 4) for k, v in result.metrics.items()
             if isinstance(v, float) and k.startswith(("val", "loss"))}
    print(f"\nrun {result.run_name} finished: {shown}")
    print(f"  MLflow run:   {result.mlflow_run_id}")
    print(f"  model:        {result.export_dir}  (mdlm.load_pretrained)")
    print(f"  checkpoint:   {result.checkpoint}")
    print(f"  MLflow UI:    {mlflow_ui_command(result.tracking_uri)}")
    if result.ray_logs:
        print(f"  Ray logs:     {result.ray_logs}")
    return 0

