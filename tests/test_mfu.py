"""MFU accounting: the FLOPs-per-token formula against FLOPs counted by PyTorch, the matmul ceiling, and the
run's ceiling kept in its checkpoint (a restarted worker group reuses it instead of measuring)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mdlm.config import ModelConfig, NoiseConfig, TrainingConfig
from mdlm.modeling import build_model
from mdlm.train.checkpoint import TrainProgress, load_checkpoint, save_checkpoint
from mdlm.train.mfu import (
    CEILING_KEY,
    StepThroughput,
    device_kind,
    matmul_flops_per_token,
    measure_matmul_ceiling,
    run_matmul_ceiling,
)
from mdlm.train.optim import build_optimizer, build_scheduler


@pytest.mark.parametrize("kind", ["mdlm", "ar"])
def test_flops_per_token_matches_the_flops_pytorch_counts_for_a_training_step(kind):
    """Forward + backward of the loss, counted op by op (attention decomposed into matmuls), per token.

    The formula leaves out the per-sequence conditioning layers, which cost ~1/length of a per-token layer,
    so the two agree to well under 1% at length 128.
    """
    config = ModelConfig(kind=kind, hidden_size=64, n_layers=3, n_heads=4, cond_dim=32, vocab_size=200,
                         mask_token_id=199 if kind == "mdlm" else None, max_seq_len=128, dropout=0.0,
                         vocab_pad_multiple=64)
    model = build_model(config, NoiseConfig())
    x = torch.randint(0, 199, (2, 128), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.loss(x).loss.backward()
    counted = counter.get_total_flops() / x.numel()
    padded_head = model.backbone.final.linear.out_features * config.hidden_size * 6  # counted, not useful work
    useful = counted - padded_head + 200 * config.hidden_size * 6
    assert matmul_flops_per_token(model, 128) == pytest.approx(useful, rel=0.01)


def test_matmul_ceiling_is_at_least_what_one_timed_matmul_reaches():
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ceiling = measure_matmul_ceiling("cpu", size=256, rounds=3)
        a = torch.randn(256, 256)
        a @ a
        start = time.perf_counter()
        a @ a
        single = 2 * 256**3 / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)  # the rest of the suite keeps its thread count
    assert 1e8 < ceiling < 1e13
    assert ceiling > 0.5 * single  # the best round, not a slow outlier


def test_throughput_counts_only_time_inside_steps_after_the_first():
    now = [0.0]
    meter = StepThroughput(clock=lambda: now[0])

    def step(seconds: float, tokens: int = 100) -> float:
        meter.start()
        now[0] += seconds
        return meter.stop(tokens)

    assert step(5.0) == pytest.approx(20.0)  # the first step (compilation) is reported on its own ...
    assert step(0.5) == pytest.approx(200.0)  # ... and not averaged into the rest
    now[0] += 30.0  # a checkpoint between steps
    assert step(0.5) == pytest.approx(200.0)
    assert step(1.0) == pytest.approx(300 / 2.0)
    with pytest.raises(RuntimeError, match="without start"):
        meter.stop(1)


def _tiny_training_state():
    config = ModelConfig(hidden_size=32, n_layers=1, n_heads=2, cond_dim=16, vocab_size=32, mask_token_id=31,
                         max_seq_len=16, dropout=0.0)
    model = build_model(config, NoiseConfig())
    optimizer = build_optimizer(model, TrainingConfig())
    return model, optimizer, build_scheduler(optimizer, TrainingConfig())


def test_the_ceiling_is_measured_once_per_run_and_restored_from_the_checkpoint(tmp_path):
    progress = TrainProgress(step=3)
    measured, new = run_matmul_ceiling(progress.extra, "cpu", "run-a", size=64, rounds=1)
    assert new and measured > 1e6
    assert progress.extra[CEILING_KEY] == {"device": "cpu", "flops": measured, "mlflow_run_id": "run-a"}
    model, optimizer, scheduler = _tiny_training_state()
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, None, progress)

    # A later worker group of the run restores the progress and takes its ceiling: no measurement, nothing to log.
    restored = load_checkpoint(tmp_path / "ckpt", *_tiny_training_state(), None)
    assert run_matmul_ceiling(restored.extra, "cpu", "run-a") == (measured, False)
    # Another run resuming from this checkpoint keeps the value, but logs it to its own MLflow run once.
    assert run_matmul_ceiling(restored.extra, "cpu", "run-b") == (measured, True)
    assert run_matmul_ceiling(restored.extra, "cpu", "run-b") == (measured, False)


def test_a_saved_ceiling_is_used_as_is_and_only_for_the_same_kind_of_device():
    saved = {CEILING_KEY: {"device": device_kind("cpu"), "flops": 123.0, "mlflow_run_id": None}}
    assert run_matmul_ceiling(saved, "cpu") == (123.0, False)  # far below any measurement: it was not measured
    other = {CEILING_KEY: {"device": "cuda:NVIDIA H200", "flops": 123.0, "mlflow_run_id": None}}
    flops, new = run_matmul_ceiling(other, "cpu", size=64, rounds=1)
    assert new and flops > 1e6 and other[CEILING_KEY]["device"] == "cpu"
