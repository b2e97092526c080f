"""The per-worker training function that Ray Train runs on every rank.

Each rank builds the same model (same seed), applies the parallelize step (FSDP2), restores the latest
complete checkpoint if there is one, then streams its shard of the prepared parquet, one
:func:`mdlm.train.step.train_step` per optimizer step. Every ``checkpoint_every`` steps all ranks save a
sharded DCP checkpoint and report it; rank 0 logs metrics to MLflow. At the end the validation objective is
measured with the EMA weights and the unsharded model is exported; the driver registers it.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from typing import Any

import torch

from mdlm.config import accumulation_steps
from mdlm.data.spec import resolve_model_config
from mdlm.eval.metrics import safe_exp
from mdlm.model_card import ModelCardInfo
from mdlm.modeling import build_model
from mdlm.tracking import FINAL_FLUSH_WAIT_S, STOPPED_TAG, MetricBuffer, logged_through, set_tag, system_metrics
from mdlm.train import console
from mdlm.train.checkpoint import checkpoint_candidates, restore_checkpoint, save_checkpoint
from mdlm.train.ema import EMA
from mdlm.train.export import export_model
from mdlm.train.ingest import BatchStream, first_batches
from mdlm.train.mfu import CEILING_KEY, StepThroughput, matmul_flops_per_token, run_matmul_ceiling
from mdlm.train.optim import build_optimizer, build_scheduler
from mdlm.train.parallelize import ParallelPlan, parallelize
from mdlm.train.progress import ProgressClock, progress_line
from mdlm.train.spec import WorkerSpec
from mdlm.train.step import NonFiniteLoss, StepSettings, train_step
from mdlm.train.validate import validate

logger = logging.getLogger(__name__)


def micro_seed(seed: int, step: int, index: int) -> int:
    """The seed of all randomness (masking, time samples, dropout) of micro-batch ``index`` of the global batch of
    optimizer step ``step``: the same whatever the number of workers, so a resumed or resized run draws what an
    uninterrupted one would."""
    return seed + 1_000_003 * (index + 1) + 7919 * step


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train entry point; ``payload = {"spec": WorkerSpec, "console": the driver's channel or None,
    "rows": {split: ParquetRows} read by this worker (splits not in it: Ray Train's dataset shards)}``."""
    import ray.train
    import ray.train.torch

    spec: WorkerSpec = payload["spec"]
    config = spec.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    console.attach(payload.get("console"), rank)
    device = ray.train.torch.get_device()
    training, run = config.training, config.run
    if run.threads_per_worker:
        torch.set_num_threads(run.threads_per_worker)

    torch.manual_seed(training.seed)  # identical initialisation on every rank before sharding
    model = build_model(resolve_model_config(config.model, spec.data), config.noise).to(device)
    flops_per_token = matmul_flops_per_token(model, spec.data.block_size)
    bf16 = training.precision == "bf16"
    plan = ParallelPlan(fsdp=world > 1 or device.type == "cuda",
                        param_dtype=torch.bfloat16 if bf16 else None,
                        activation_checkpointing=run.activation_checkpointing, compile=run.compile,
                        # GPU: a unit per block, freed after forward (memory; collectives overlap compute on
                        # their own streams). CPU: gloo collectives block the compute thread and CPU-sized
                        # models are small, so one unit (the root) kept for the backward pass: one all-gather
                        # and one reduce-scatter per step.
                        reshard_after_forward=device.type == "cuda", shard_blocks=device.type == "cuda")
    parallelize(model, plan)
    objective = model.objective.compiled() if run.compile else model.objective
    optimizer = build_optimizer(model, training)
    scheduler = build_scheduler(optimizer, training)
    ema = EMA(model, training.ema_decay) if training.ema_decay > 0 else None
    progress, restored_from = restore_checkpoint(checkpoint_candidates(ray.train.get_checkpoint(), run.resume_from),
                                                 model, optimizer, scheduler, ema)
    if restored_from and rank == 0:
        logger.info(f"resumed from {restored_from} at step {progress.step}")

    micro = training.micro_batch_size
    settings = StepSettings(accumulation=accumulation_steps(training, world), grad_clip=training.grad_clip,
                            autocast_bf16=bf16 and not plan.fsdp)  # FSDP2's MixedPrecisionPolicy casts instead
    if rank == 0:  # an elastic run says so at every (re)start of its worker group
        logger.info(f"{world} worker{'s' if world > 1 else ''} x {settings.accumulation} micro-batches of {micro} "
                    f"rows = global batch {training.global_batch_size}")
    rows = payload.get("rows") or {}

    def split(name: str):
        return rows[name] if name in rows else ray.train.get_dataset_shard(name)

    stream = BatchStream(split("train"), micro, device, training.seed, progress,
                         run.shuffle_buffer, rank=rank, world=world, accumulation=settings.accumulation)
    val_batches = (first_batches(split("validation"), micro, device, run.eval_batches)
                   if spec.has_validation else [])

    tracking_uri, run_id = spec.tracking_uri, spec.mlflow_run_id if rank == 0 else None
    # A checkpoint can be lost after its metrics were logged: steps the run already holds are not logged again.
    metrics_buffer = MetricBuffer(tracking_uri, run_id, logged_through(tracking_uri, run_id), track_steps=True)
    # Measured by the run's first worker group and kept in its checkpoints: a restart keeps MFU's denominator.
    ceiling, new_to_run = run_matmul_ceiling(progress.extra, device, spec.mlflow_run_id)
    if new_to_run:  # logged with the next checkpoint, as every metric
        metrics_buffer.add(progress.step, {CEILING_KEY: ceiling})
    peak = ceiling * world
    noise_generator = torch.Generator(device=device)
    # Device work still queued when a step ends is paid by the next step's loss sync.
    throughput = StepThroughput()
    clock = ProgressClock(training.max_steps)
    last_report: dict[str, Any] = {}
    stop_reason = None

    def checkpoint_and_report(metrics: dict[str, Any], export: bool = False) -> None:
        with tempfile.TemporaryDirectory(prefix="mdlm-ckpt-") as tmp:
            save_checkpoint(tmp, model, optimizer, scheduler, ema, progress, config=config.to_dict())
            if export:
                card = ModelCardInfo.from_training(config, steps=progress.step, tokens_seen=progress.tokens_seen,
                                                   workers=world, metrics={k: v for k, v in metrics.items()
                                                                           if k.startswith("val_")})
                export_model(model, ema, spec.export_dir, spec.data, card=card)
            metrics_buffer.flush(FINAL_FLUSH_WAIT_S if export else 0.0)  # the last one waits for the server
            report(metrics, tmp)

    def next_batch() -> dict[str, torch.Tensor]:
        index, batch = stream.next_micro()
        seed = micro_seed(training.seed, progress.step, index)
        noise_generator.manual_seed(seed)
        torch.manual_seed(seed)
        return batch

    with system_metrics(tracking_uri, run_id):
        while progress.step < training.max_steps:
            throughput.start()
            try:
                result = train_step(model, objective, optimizer, scheduler, ema, next_batch, settings,
                                    noise_generator)
            except NonFiniteLoss as exc:
                stop_reason = str(NonFiniteLoss(exc.loss, progress.step + 1))
                break
            progress.tokens_seen += result.tokens * world
            progress.step += 1
            if run.fail_at_step is not None and progress.step == run.fail_at_step and restored_from is None:
                raise RuntimeError(f"injected failure at step {progress.step} (run.fail_at_step)")

            tokens_per_s = throughput.stop(result.tokens * world)
            eta = clock.eta(progress.step)
            metrics = {"loss": result.loss, "grad_norm": result.grad_norm, "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak,
                       "tokens_seen": float(progress.tokens_seen), "epoch": float(progress.epoch)}
            if objective.is_bound:
                metrics["nelbo"] = result.loss
                metrics["ppl_bound"] = safe_exp(result.loss)
            if run.eval_every and progress.step % run.eval_every == 0 and val_batches:
                metrics.update(validate(model, objective, val_batches, training.seed).metrics())
            if progress.step % training.log_every == 0 or progress.step == training.max_steps:
                metrics_buffer.add(progress.step, metrics)
                if rank == 0:
                    logger.info(progress_line(progress.step, training.max_steps, result.loss, metrics["lr"],
                                              tokens_per_s, metrics["mfu"], eta))
            last_report = {"step": progress.step, **metrics}
            if progress.step % run.checkpoint_every == 0 and progress.step < training.max_steps:
                checkpoint_and_report(last_report)

        if stop_reason is not None:
            metrics_buffer.flush(FINAL_FLUSH_WAIT_S)
            if run_id is not None:
                set_tag(tracking_uri, run_id, STOPPED_TAG, stop_reason)
            if rank == 0:
                logger.warning(f"stopping: {stop_reason}; the last checkpoint is kept")
            report({"step": progress.step, "stopped": stop_reason})
            return
        final = dict(last_report)
        if val_batches:
            with ema.swapped_in(model) if ema is not None else contextlib.nullcontext():
                final.update(validate(model, objective, val_batches, training.seed).metrics())
        metrics_buffer.add(progress.step, {k: v for k, v in final.items() if k.startswith("val_")})
        if progress.step:
            checkpoint_and_report(final, export=True)


def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
    """``ray.train.report`` of the numeric metrics, with the checkpoint directory when given (every rank)."""
    import ray.train

    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    if checkpoint_dir is None:
        ray.train.report(numbers)
    else:
        ray.train.report(numbers, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))
