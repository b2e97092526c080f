"""The per-worker training function that Ray Train runs on every rank.

Each rank builds the same model (same seed), applies the parallelize step (FSDP2), restores the latest
complete checkpoint if there is one, then streams its shard of the prepared parquet through
``iter_torch_batches``, accumulating micro-batches up to the global batch. Every ``checkpoint_every``
steps all ranks save a sharded DCP checkpoint and report it; rank 0 logs metrics to MLflow. At the end the
validation NELBO is measured with the EMA weights and rank 0 exports the unsharded model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

from mdlm.config import Config, ModelConfig, config_from_dict
from mdlm.modeling import MDLM, ARModel, build_model
from mdlm.train.checkpoint import TrainProgress, full_state_dict, is_complete, load_checkpoint, save_checkpoint
from mdlm.train.ema import EMA
from mdlm.train.mfu import StepThroughput, matmul_flops_per_token, measure_matmul_ceiling
from mdlm.train.optim import build_optimizer, build_scheduler
from mdlm.train.parallelize import ParallelPlan, parallelize, reshard
from mdlm.tracking import MetricBuffer, register_model, system_metrics


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite."""


def model_config_for_data(model: ModelConfig, data: dict[str, Any]) -> ModelConfig:
    """The model config with vocabulary, special ids and block size taken from the prepared data."""
    return dataclasses.replace(
        model, vocab_size=data["vocab_size"], mask_token_id=data["mask_token_id"] if model.kind == "mdlm" else
        data.get("mask_token_id"), bos_token_id=data.get("bos_token_id"), eos_token_id=data.get("eos_token_id"),
        pad_token_id=data.get("pad_token_id"), max_seq_len=data["block_size"])


class Collate:
    """Ray Data numpy batch (list columns) -> LongTensors [B, L] on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        for key in ("input_ids", "attention_mask"):
            if key in batch:
                column = batch[key]
                array = np.stack(column) if column.dtype == object else column
                out[key] = torch.as_tensor(array.astype(np.int64), device=self.device)
        return out


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


class BatchStream:
    """Micro-batches from this rank's shard across epochs, resumable at (epoch, batches_in_epoch)."""

    def __init__(self, shard, batch_size: int, device: torch.device, seed: int, progress: TrainProgress,
                 shuffle_buffer: int) -> None:
        self.shard, self.batch_size, self.device, self.seed = shard, batch_size, device, seed
        self.progress, self.shuffle_buffer = progress, shuffle_buffer
        self._it: Iterator | None = None

    def _epoch_iter(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.shard.iter_torch_batches(
            batch_size=self.batch_size, drop_last=True, collate_fn=Collate(self.device),
            local_shuffle_buffer_size=self.shuffle_buffer or None,
            local_shuffle_seed=self.seed + self.progress.epoch if self.shuffle_buffer else None))

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = self._epoch_iter()
            for _ in range(self.progress.batches_in_epoch):  # resume mid-epoch: skip what was consumed
                next(self._it)
        for _attempt in range(2):
            try:
                batch = next(self._it)
                self.progress.batches_in_epoch += 1
                return batch
            except StopIteration:
                if self.progress.batches_in_epoch == 0:
                    break
                self.progress.epoch += 1
                self.progress.batches_in_epoch = 0
                self._it = self._epoch_iter()
        raise RuntimeError(f"the training shard holds fewer rows than one micro-batch of {self.batch_size}")


@torch.no_grad()
def evaluate_batches(model: MDLM | ARModel, batches: list[dict[str, torch.Tensor]], rank: int, world: int,
                     seed: int) -> dict[str, float]:
    """NELBO (or NLL) per token over ``batches``, split round-robin across ranks; every rank runs the same
    number of forward passes (FSDP needs it), padding with zero-weight repeats."""
    model.eval()
    per_rank = math.ceil(len(batches) / world) if batches else 0
    total, tokens = 0.0, 0.0
    for i in range(per_rank):
        index = i * world + rank
        batch = batches[index % len(batches)]
        generator = torch.Generator(device=batch["input_ids"].device).manual_seed(seed + index)
        out = model.loss(batch["input_ids"], batch.get("attention_mask"), generator=generator)
        if index < len(batches):
            total += float(out.nll_sum)
            tokens += float(out.num_tokens)
    reshard(model)
    model.train()
    total, tokens = _all_reduce_sum([total, tokens], batches[0]["input_ids"].device if batches else "cpu")
    nll = total / max(tokens, 1.0)
    return {"val_nelbo" if isinstance(model, MDLM) else "val_nll": nll, "val_ppl": math.exp(min(nll, 50.0))}


def _report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
    import ray.train

    if checkpoint_dir is None:
        ray.train.report(metrics)
    else:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))


def _log(message: str) -> None:
    """One line to the worker's real stdout, which Ray streams to the driver. (Ray Train patches ``print`` to
    log *and*, when ``sys.stdout`` is wrapped, to print as well, so a plain print shows up twice.)"""
    stream = sys.__stdout__ or sys.stdout
    stream.write(message + "\n")
    stream.flush()


def checkpoint_candidates(latest: Any, resume_from: str | None) -> list[Any]:
    """Checkpoints to try, newest first: Ray's latest, the run's older ones beside it, then ``resume_from``.

    Listed through the checkpoint's own pyarrow filesystem, so a run on s3:// or gs:// storage finds them too."""
    import posixpath

    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    candidates = []
    if latest is not None:
        candidates.append(latest)
        parent = posixpath.dirname(latest.path.rstrip("/"))
        infos = latest.filesystem.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
        older = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                        and i.base_name.startswith("checkpoint_") and i.path.rstrip("/") != latest.path.rstrip("/")),
                       reverse=True)
        candidates.extend(Checkpoint(path, filesystem=latest.filesystem) for path in older)
    if resume_from:
        candidates.append(Checkpoint(resume_from if "://" in resume_from else os.path.abspath(resume_from)))
    return candidates


def restore_checkpoint(candidates: list[Any], model, optimizer, scheduler, ema) -> tuple[TrainProgress, str | None]:
    """Load the first complete candidate that loads; incomplete ones are skipped, a failed load falls back to the
    next. (fresh progress, None) when there is none; an error when complete ones exist but none loads (starting
    over would rotate them away, and a failed load may have changed the model in place)."""
    failures = []
    for checkpoint in candidates:
        try:
            with checkpoint.as_directory() as path:
                if not is_complete(path):
                    _log(f"[mdlm] skipping incomplete checkpoint {checkpoint.path}")
                    continue
                return load_checkpoint(path, model, optimizer, scheduler, ema), checkpoint.path
        except (Exception, CheckpointException) as exc:  # DCP raises CheckpointException, a BaseException
            _log(f"[mdlm] checkpoint {checkpoint.path} could not be loaded ({exc}); trying an older one")
            failures.append(f"{checkpoint.path}: {type(exc).__name__}")
    if failures:
        raise RuntimeError("no checkpoint could be loaded (delete the broken ones, or start over with a new "
                           "run.name):\n  " + "\n  ".join(failures))
    return TrainProgress(), None


def _restore(model, optimizer, scheduler, ema, resume_from: str | None) -> tuple[TrainProgress, str | None]:
    """Restore from Ray's latest checkpoint, else an older one of the run, else ``resume_from``."""
    import ray.train

    return restore_checkpoint(checkpoint_candidates(ray.train.get_checkpoint(), resume_from), model, optimizer,
                              scheduler, ema)


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train entry point. ``payload``: config (dict), data (manifest fields), tracking, export paths."""
    import ray.train
    import ray.train.torch

    config: Config = config_from_dict(payload["config"]).validate()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    training, run = config.training, config.run
    if run.threads_per_worker:
        torch.set_num_threads(run.threads_per_worker)

    torch.manual_seed(training.seed)  # identical initialisation on every rank before sharding
    model = build_model(model_config_for_data(config.model, payload["data"]), config.noise).to(device)
    flops_per_token = matmul_flops_per_token(model, payload["data"]["block_size"])
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
    autocast = bf16 and not plan.fsdp  # FSDP2's MixedPrecisionPolicy casts instead
    optimizer = build_optimizer(model, training)
    scheduler = build_scheduler(optimizer, training)
    ema = EMA(model, training.ema_decay) if training.ema_decay > 0 else None
    progress, restored_from = _restore(model, optimizer, scheduler, ema, run.resume_from)
    if restored_from and rank == 0:
        _log(f"[mdlm] resumed from {restored_from} at step {progress.step}")

    micro = training.micro_batch_size
    if training.global_batch_size % (micro * world):
        raise ValueError(f"training.global_batch_size {training.global_batch_size} is not a multiple of "
                         f"micro_batch_size x workers = {micro * world}")
    accumulation = training.global_batch_size // (micro * world)
    stream = BatchStream(ray.train.get_dataset_shard("train"), micro, device, training.seed + 1000 * rank,
                         progress, config.run.shuffle_buffer)
    val_batches = []
    val_shard = ray.train.get_dataset_shard("validation") if payload.get("has_validation") else None
    if val_shard is not None:
        for i, batch in enumerate(val_shard.iter_torch_batches(batch_size=micro, collate_fn=Collate(device))):
            if i >= run.eval_batches:
                break
            val_batches.append(batch)

    tracking_uri, run_id = payload.get("tracking_uri"), payload.get("mlflow_run_id")
    metrics_buffer = MetricBuffer(tracking_uri, run_id if rank == 0 else None)
    peak = measure_matmul_ceiling(device) * world
    noise_generator = torch.Generator(device=device)
    # Device work still queued when a step ends is paid by the next step's loss sync.
    throughput = StepThroughput()
    last_report = {}
    stop_reason = None

    with system_metrics(tracking_uri, run_id if rank == 0 else None):
        while progress.step < training.max_steps:
            # Randomness (masking, time samples, dropout) is a function of (seed, rank, step): a resumed run
            # draws exactly what an uninterrupted one would.
            throughput.start()
            tokens_before = progress.tokens_seen
            step_seed = training.seed + 1_000_003 * (rank + 1) + 7919 * progress.step
            noise_generator.manual_seed(step_seed)
            torch.manual_seed(step_seed)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            for _ in range(accumulation):
                batch = next(stream)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    out = model.loss(batch["input_ids"], batch.get("attention_mask"), generator=noise_generator)
                (out.loss / accumulation).backward()
                loss_sum += out.loss.detach().double()
                progress.tokens_seen += batch["input_ids"].numel() * world
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip or float("inf"))
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            loss = _all_reduce_sum([float(loss_sum) / accumulation], device)[0] / world
            if not math.isfinite(loss):
                stop_reason = f"non-finite loss {loss} at step {progress.step + 1}"
                break
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            progress.step += 1
            if run.fail_at_step is not None and progress.step == run.fail_at_step and restored_from is None:
                raise RuntimeError(f"injected failure at step {progress.step} (run.fail_at_step)")

            tokens_per_s = throughput.stop(progress.tokens_seen - tokens_before)
            metrics = {"loss": loss, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak,
                       "tokens_seen": float(progress.tokens_seen), "epoch": float(progress.epoch)}
            if isinstance(model, MDLM):
                metrics["nelbo"] = loss
                metrics["ppl_bound"] = math.exp(min(loss, 50.0))
            if run.eval_every and progress.step % run.eval_every == 0 and val_batches:
                metrics.update(evaluate_batches(model, val_batches, rank, world, training.seed))
            if progress.step % training.log_every == 0 or progress.step == training.max_steps:
                metrics_buffer.add(progress.step, metrics)
                if rank == 0:
                    _log(f"[mdlm] step {progress.step:>6}  loss {loss:.4f}  lr {metrics['lr']:.2e}  "
                         f"{tokens_per_s:,.0f} tok/s  mfu {metrics['mfu']:.3f}")
            last_report = {"step": progress.step, **metrics}
            if progress.step % run.checkpoint_every == 0 and progress.step < training.max_steps:
                _checkpoint_and_report(model, optimizer, scheduler, ema, progress, metrics_buffer, last_report,
                                       payload["config"])

        if stop_reason is not None:
            metrics_buffer.flush()
            if rank == 0 and run_id is not None:
                from mdlm.tracking import STOPPED_TAG, set_tag

                set_tag(tracking_uri, run_id, STOPPED_TAG, stop_reason)
            _log(f"[mdlm] stopping: {stop_reason}; the last checkpoint is kept")
            _report({"step": progress.step, "stopped": stop_reason})
            return
        final = dict(last_report)
        if val_batches:
            if ema is not None:
                with ema.swapped_in(model):
                    final.update(evaluate_batches(model, val_batches, rank, world, training.seed))
            else:
                final.update(evaluate_batches(model, val_batches, rank, world, training.seed))
        metrics_buffer.add(progress.step, {k: v for k, v in final.items() if k.startswith("val_")})
        if progress.step:
            _checkpoint_and_report(model, optimizer, scheduler, ema, progress, metrics_buffer, final,
                                   payload["config"], export=payload)


def _checkpoint_and_report(model, optimizer, scheduler, ema, progress, metrics_buffer, metrics, config_dict,
                           export: dict[str, Any] | None = None) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    with tempfile.TemporaryDirectory(prefix="mdlm-ckpt-") as tmp:
        save_checkpoint(tmp, model, optimizer, scheduler, ema, progress, config=config_dict)
        if export is not None:
            _export(model, ema, export, rank)
        metrics_buffer.flush()
        _report({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, tmp)


def _export(model, ema: EMA | None, payload: dict[str, Any], rank: int) -> None:
    """Collective: gather the full (EMA) weights; rank 0 writes save_pretrained and registers it in MLflow."""
    state = full_state_dict(model, ema)
    if rank != 0:
        return
    from tokenizers import Tokenizer

    from mdlm.hub import write_model_dir

    tokenizer_file = payload["data"].get("tokenizer_file")
    tokenizer = Tokenizer.from_file(tokenizer_file) if tokenizer_file and os.path.isfile(tokenizer_file) else None
    export_dir = payload["export_dir"]
    if "://" in export_dir:
        import pyarrow.fs as pafs

        with tempfile.TemporaryDirectory(prefix="mdlm-export-") as tmp:
            local = write_model_dir(Path(tmp) / "model", model_type=model.model_type, model_config=model.config,
                                    noise_config=model.noise_config, state_dict=state, tokenizer=tokenizer)
            pafs.copy_files(str(local), export_dir)
    else:
        write_model_dir(export_dir, model_type=model.model_type, model_config=model.config,
                        noise_config=model.noise_config, state_dict=state, tokenizer=tokenizer)
    tracking_uri, run_id = payload.get("tracking_uri"), payload.get("mlflow_run_id")
    if run_id and "://" not in export_dir:
        from mdlm.tracking import log_artifacts

        source = log_artifacts(tracking_uri, run_id, export_dir, "model")
        name = payload.get("registered_model")
        if name:
            version = register_model(tracking_uri, run_id, source, name, payload.get("model_alias", "current"))
            _log(f"[mdlm] registered models:/{name}@{payload.get('model_alias')} (version {version})")
