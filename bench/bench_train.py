"""Training throughput: the Ray Train job (FSDP2 across workers) vs a plain single-process PyTorch loop of the
same model, global batch and cores, measured in one run and printed as a ratio.

    python bench/bench_train.py [--steps 40] [--workers 2] [--rounds 3] [a.b=value overrides]

Both sides train the 'cpu-ray' preset model on the same synthetic token rows for the same number of optimizer
steps; tokens/s counts the tokens of steps 2..N over the time spent in them on both sides (start-up, the first
Ray Data blocks and one-off allocations are in step 1; the plain loop has nothing between its steps). Each Ray
run is compared with the mean of the plain runs just before and after it; the median ratio over the rounds is
the result.
MFU = tokens/s x training FLOPs per token / the matmul ceiling of the cores, measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdlm.config import load_config
from mdlm.data.spec import DataSpec, resolve_model_config
from mdlm.modeling import build_model
from mdlm.train.launcher import fit
from mdlm.train.mfu import matmul_flops_per_token, measure_matmul_ceiling
from mdlm.train.optim import build_optimizer, build_scheduler
from mdlm.train.spec import WorkerSpec

VOCAB = 1024


def data_spec(block: int) -> DataSpec:
    return DataSpec(vocab_size=VOCAB, mask_token_id=VOCAB - 1, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                    block_size=block)


def plain_loop(config, rows: np.ndarray, steps: int, threads: int) -> float:
    """Single process, ``threads`` intra-op threads; returns tokens/s over the timed steps."""
    torch.set_num_threads(threads)
    torch.manual_seed(config.training.seed)
    model = build_model(resolve_model_config(config.model, data_spec(rows.shape[1])), config.noise)
    optimizer = build_optimizer(model, config.training)
    scheduler = build_scheduler(optimizer, config.training)
    batch = config.training.global_batch_size
    x = torch.as_tensor(rows.astype(np.int64))
    generator = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        if step == 1:  # time from the end of the first step, as the training loop's tokens/s does
            start = time.perf_counter()
        idx = torch.arange(step * batch, (step + 1) * batch) % len(x)
        optimizer.zero_grad(set_to_none=True)
        model.loss(x[idx], generator=generator).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.training.grad_clip)
        optimizer.step()
        scheduler.step()
    return (steps - 1) * batch * rows.shape[1] / (time.perf_counter() - start)


def ray_train(config, rows: np.ndarray, cpus: int, tmp: str, name: str) -> float:
    """One Ray Train job on a fresh local Ray; returns the job's tokens/s over steps 2..N."""
    import ray

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, name=name))
        spec = WorkerSpec(config=config, data=data_spec(rows.shape[1]), export_dir=f"{tmp}/{name}-model")
        result = fit(spec, {"train": ray.data.from_numpy(rows).rename_columns({"data": "input_ids"})})
        return float(result.metrics["tokens_per_s"])
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="cores given to each side")
    parser.add_argument("--rounds", type=int, default=3, help="Ray runs, each between two plain runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mdlm-bench-") as tmp:
        config = load_config("cpu-ray", [f"training.max_steps={args.steps}", "training.log_every=1000",
                                         f"run.num_workers={args.workers}", f"run.checkpoint_every={10 * args.steps}",
                                         "run.cpus_per_worker=0.5", "run.shuffle_buffer=0",
                                         f"run.threads_per_worker={max(args.cpus // args.workers, 1)}",
                                         "training.ema_decay=0", f"run.storage_path={tmp}/ray", *args.overrides])
        block = config.data.block_size
        rows = np.random.default_rng(0).integers(2, VOCAB - 1, (4096, block)).astype(np.int32)
        model = build_model(resolve_model_config(config.model, data_spec(block)), config.noise)
        flops = matmul_flops_per_token(model, block)
        torch.set_num_threads(args.cpus)
        peak = measure_matmul_ceiling("cpu", size=1024)
        # Shared machines drift by 10-25% within minutes: every Ray run is compared with the mean of the plain
        # runs just before and just after it (Ray is shut down while the plain loop runs).
        plain = [plain_loop(config, rows, args.steps, args.cpus)]
        ours, ratios = [], []
        for i in range(args.rounds):
            ours.append(ray_train(config, rows, args.cpus, tmp, f"bench-{i}"))
            plain.append(plain_loop(config, rows, args.steps, args.cpus))
            ratios.append(ours[-1] / ((plain[-2] + plain[-1]) / 2))
    print(f"model: {model.backbone.num_parameters() / 1e6:.2f}M parameters, {flops / 1e6:.2f} MFLOP/token; "
          f"global batch {config.training.global_batch_size} x {block} tokens; {args.steps} steps; "
          f"matmul ceiling {peak / 1e9:.0f} GFLOP/s on {args.cpus} cores")
    for i, ratio in enumerate(ratios):
        print(f"round {i + 1}: plain {plain[i]:8.0f} -> {plain[i + 1]:8.0f} tokens/s (MFU "
              f"{(plain[i] + plain[i + 1]) / 2 * flops / peak:.3f});  Ray Train {args.workers} workers FSDP2 "
              f"{ours[i]:8.0f} tokens/s (MFU {ours[i] * flops / peak:.3f});  ratio {ratio:.2f}")
    print(f"ratio Ray / plain, median of {len(ratios)}: {float(np.median(ratios)):.2f}  (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
