"""The Ray Train path on a GPU: ``fit`` (TorchTrainer, NCCL, FSDP2 per block, bf16, compile, sharded EMA,
DCP checkpoint, export) on synthetic tokens, printing the job's tokens/s and MFU as the training loop reports
them. Needs no MLflow, tokenizer or prepared corpus, so it runs on a bare GPU machine with Ray installed.

    python bench/gpu_ray_train.py [--steps 30] [--workers 1] [a.b=value overrides]
    python bench/gpu_ray_train.py --smoke          # CPU, tiny model: checks the script

A GPU machine without network access can take Ray as a folder on PYTHONPATH, built where pip works, for that
machine's Python version:

    pip install --target raybundle --no-deps --python-version 3.12 --only-binary=:all: \
        --platform manylinux2014_x86_64 ray==2.60.0 pyarrow pandas pydantic pydantic_core msgpack jsonschema \
        referencing attrs protobuf click tensorboardX fsspec python-dateutil six annotated-types \
        jsonschema-specifications rpds-py typing-inspection typing_extensions packaging filelock
    PYTHONPATH=raybundle:. python3 bench/gpu_ray_train.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdlm.config import load_config
from mdlm.data.spec import DataSpec
from mdlm.output import setup_output
from mdlm.train.launcher import fit
from mdlm.train.spec import WorkerSpec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    setup_output(verbose=True)  # the progress lines (mdlm loggers), and all of Ray's output as before
    if args.smoke:
        preset, vocab, block, batch = "cpu-ray", 1024, 64, 8
        base = ["run.use_gpu=false", "run.cpus_per_worker=0.5"]
    else:
        preset, vocab, block, batch = "small", 50258, 1024, 32
        base = ["run.use_gpu=true", "run.cpus_per_worker=2", "training.precision=bf16", "run.compile=true",
                "model.vocab_pad_multiple=64"]
    data = DataSpec(vocab_size=vocab, mask_token_id=vocab - 1, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                    block_size=block)
    import ray

    ray.init(address="local", num_cpus=2 if args.smoke else 8, include_dashboard=False, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory(prefix="mdlm-gpu-ray-") as tmp:
        config = load_config(preset, [
            *base, f"run.num_workers={args.workers}", f"training.max_steps={args.steps}",
            f"training.global_batch_size={batch * args.workers}", f"training.micro_batch_size={batch}",
            "training.warmup_steps=10", f"training.log_every={max(args.steps // 3, 1)}",
            f"run.checkpoint_every={max(args.steps // 2, 1)}", "run.shuffle_buffer=0", "run.eval_batches=2",
            f"run.storage_path={tmp}/ray", "run.name=gpu-ray", *args.overrides]).validate()
        rng = np.random.default_rng(0)
        rows = rng.integers(1, vocab - 1, (max(batch * args.workers * (args.steps + 2), 64), block)).astype(np.int32)
        train = ray.data.from_numpy(rows).rename_columns({"data": "input_ids"})
        spec = WorkerSpec(config=config, data=data, export_dir=f"{tmp}/model", has_validation=True)
        start = time.perf_counter()
        result = fit(spec, {"train": train, "validation": train.limit(4 * batch)})
        wall = time.perf_counter() - start
        exported = sorted(p.name for p in Path(tmp, "model").iterdir())
        checkpoints = sorted(p.name for p in Path(tmp, "ray", "gpu-ray").glob("checkpoint_*"))
    ray.shutdown()
    record = {"metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
              "wall_s": round(wall, 1), "exported": exported, "checkpoints": checkpoints}
    print(json.dumps(record, indent=1))
    if args.out:
        args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
