"""One prepared GPU check: the paper's small MDLM (768/12/12, GPT-2 vocabulary) at length 1024 in bf16.

Measures, in one run on one GPU:
  * the bf16 matmul ceiling (8192^3), to put MFU in context;
  * training-step throughput and MFU of the variants named by ``--train``: ``eager`` (autocast), ``compile``
    (whole backbone), ``fsdp2`` (the library's parallelize step: world size 1, MixedPrecisionPolicy bf16
    params / fp32 reduce, compiled blocks, output layer and loss); suffixes ``-padN`` (output layer padded to
    a multiple of N columns), ``-bN`` (batch N), ``-noreshard``;
  * sampler wall time (``--sample-length``, batch 1): ancestral, cached and first-hitting at steps = length
    and steps = 10 x length;
  * what batching buys the service: batch-1 generations one after another vs one batch of 32.

    python bench/gpu_check.py [--smoke] [--out results.json] [--train fsdp2,fsdp2-pad64]

``--smoke`` shrinks everything so the script can be checked on a CPU. Prints JSON lines; with ``--out`` the
same records go to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdlm.config import NoiseConfig, TrainingConfig, model_config_for
from mdlm.modeling import MDLM
from mdlm.train.mfu import matmul_flops_per_token, measure_matmul_ceiling
from mdlm.train.optim import build_optimizer
from mdlm.train.parallelize import ParallelPlan, parallelize

RECORDS: list[dict] = []
STARTED = time.perf_counter()


def emit(**record) -> None:
    record["elapsed_s"] = round(time.perf_counter() - STARTED, 1)
    RECORDS.append(record)
    print(json.dumps(record), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_throughput(name: str, model: MDLM, step_fn, batch: torch.Tensor, steps: int, warmup: int,
                     peak: float, device: torch.device) -> None:
    for _ in range(warmup):
        step_fn(batch)
    sync(device)
    t = time.perf_counter()
    losses = [step_fn(batch) for _ in range(steps)]
    sync(device)
    dt = (time.perf_counter() - t) / steps
    tokens = batch.numel()
    achieved = matmul_flops_per_token(model, batch.shape[1]) * tokens / dt
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    emit(section="train", variant=name, step_ms=round(dt * 1e3, 1), tokens_per_s=round(tokens / dt),
         tflops=round(achieved / 1e12, 1), mfu_vs_measured_peak=round(achieved / peak, 3),
         mfu_vs_989=round(achieved / 989e12, 3), loss_last=round(float(losses[-1]), 4), max_mem_gib=round(mem, 1))


def make_step(model: MDLM, optimizer: torch.optim.Optimizer, autocast: bool, device: torch.device,
              compiled_loss: bool = False):
    """One optimizer step on ``batch``; ``compiled_loss``: the objective's compiled masked NLL, as the training
    loop uses it with ``run.compile=true``."""
    generator = torch.Generator(device=device).manual_seed(0)
    objective = model.objective.compiled() if compiled_loss else model.objective

    def step(batch: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            loss = objective.loss(model.backbone, batch, generator=generator).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    return step


def build(size: str, seq_len: int, device: torch.device, pad: int = 1) -> MDLM:
    torch.manual_seed(0)
    config = model_config_for(size, vocab_size=50258, mask_token_id=50257, max_seq_len=seq_len,
                              vocab_pad_multiple=pad)
    return MDLM(config, NoiseConfig()).to(device)


def _option(variant: str, prefix: str, default: int) -> int:
    for part in variant.split("-")[1:]:
        if part.startswith(prefix) and part[len(prefix):].isdigit():
            return int(part[len(prefix):])
    return default


def section_train(args, device: torch.device, peak: float) -> None:
    variants = args.train.split(",") if not args.smoke else ["eager", "fsdp2-pad64"]
    for variant in variants:
        if time.perf_counter() - STARTED > args.budget_s * 0.6:
            emit(section="train", variant=variant, skipped="time budget")
            continue
        try:
            torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
            batch = torch.randint(0, 50257, (_option(variant, "b", args.batch), args.seq_len), device=device)
            model = build(args.size, args.seq_len, device, pad=_option(variant, "pad", 1))
            if variant == "compile":
                model.backbone = torch.compile(model.backbone)
            if variant.startswith("fsdp2"):
                if not torch.distributed.is_initialized():
                    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                    os.environ.setdefault("MASTER_PORT", "29517")
                    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                                         rank=0, world_size=1)
                plan = ParallelPlan(param_dtype=torch.bfloat16, compile=not args.smoke,
                                    reshard_after_forward="noreshard" not in variant)
                parallelize(model, plan)  # the library's parallelize step: per-block fully_shard, then the root
            optimizer = build_optimizer(model, TrainingConfig(lr=3e-4))  # the library's (fused) AdamW
            step = make_step(model, optimizer, autocast=not variant.startswith("fsdp2"), device=device,
                             compiled_loss=variant.startswith("fsdp2") and not args.smoke)
            train_throughput(variant, model, step, batch, args.train_steps, args.warmup, peak, device)
            del model, optimizer
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:  # keep measuring the other variants
            emit(section="train", variant=variant, error=f"{type(exc).__name__}: {exc}"[:500])


def section_sample(args, device: torch.device) -> None:
    length = args.sample_length
    model = build(args.size, length, device).eval()
    plan = [(1, sampler, k * length) for sampler in ("ancestral", "cached", "first_hitting") for k in (1, 10)]
    for batch, sampler, steps in plan:
        if time.perf_counter() - STARTED > args.budget_s:
            emit(section="sample", sampler=sampler, batch=batch, steps=steps, skipped="time budget")
            continue
        try:
            sync(device)
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model.sample(batch, length, steps=steps, sampler=sampler, seed=0)
            sync(device)
            dt = time.perf_counter() - t
            emit(section="sample", sampler=sampler, batch=batch, length=length, steps=steps, seconds=round(dt, 2),
                 forward_passes=out.num_forward_passes, tokens_per_s=round(batch * length / dt),
                 masks_left=int((out.tokens == model.mask_id).sum()))
        except Exception as exc:
            emit(section="sample", sampler=sampler, batch=batch, error=f"{type(exc).__name__}: {exc}"[:500])


def section_batching(args, device: torch.device) -> None:
    """Generations of ``--sample-length`` tokens: ``n`` batch-1 calls in a row vs one call of batch 32."""
    length, n = args.sample_length, 4 if not args.smoke else 2
    model = build(args.size, length, device).eval()
    timings = {}
    for batch, calls in ((1, n), (32, 1)):
        if time.perf_counter() - STARTED > args.budget_s:
            emit(section="batching", batch=batch, skipped="time budget")
            return
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for i in range(calls):
                model.sample(batch, length, steps=length, sampler="cached", seed=i)
        sync(device)
        timings[batch] = (time.perf_counter() - t) / (calls * batch)
        emit(section="batching", batch=batch, seconds_per_sequence=round(timings[batch], 3))
    emit(section="batching", throughput_ratio_batch32_vs_1=round(timings[1] / timings[32], 2))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU check of the script")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--train", default="fsdp2,fsdp2-pad64,fsdp2-pad64-b64", help="training variants")
    parser.add_argument("--sample-length", type=int, default=256)
    parser.add_argument("--sections", default="train,sample,batching", help="which sections to run")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.size, args.seq_len, args.batch = ("small", 1024, 32) if not args.smoke else ("cpu", 64, 4)
    args.train_steps, args.warmup = (10, 3) if not args.smoke else (2, 1)
    args.sample_length = args.sample_length if not args.smoke else 32
    emit(section="env", torch=torch.__version__, device=torch.cuda.get_device_name() if device.type == "cuda"
         else "cpu", size=args.size, seq_len=args.seq_len, batch=args.batch)
    peak = measure_matmul_ceiling(device, size=8192 if not args.smoke else 512, dtype=torch.bfloat16)
    emit(section="matmul", bf16_tflops=round(peak / 1e12, 1))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    sections = set(args.sections.split(","))
    if "train" in sections:
        section_train(args, device, peak)
    if "sample" in sections:
        section_sample(args, device)
    if "batching" in sections:
        section_batching(args, device)
    if args.out:
        args.out.write_text(json.dumps(RECORDS, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
