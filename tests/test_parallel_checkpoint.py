"""FSDP2 on gloo (CPU) with 2 processes, sharded DCP checkpoints, resharded loading with 1 process, and the
unsharded export. No Ray: torch.multiprocessing starts the ranks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mdlm.config import NoiseConfig, TrainingConfig, model_config_for
from mdlm.modeling import MDLM
from mdlm.train.checkpoint import TrainProgress, full_state_dict, is_complete, load_checkpoint, save_checkpoint
from mdlm.train.ema import EMA
from mdlm.train.optim import build_optimizer, build_scheduler
from mdlm.train.parallelize import ParallelPlan, parallelize


def _config():
    return model_config_for("cpu", vocab_size=40, mask_token_id=39, max_seq_len=16, n_layers=2, hidden_size=32,
                            n_heads=2, cond_dim=16, dropout=0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_steps(model, optimizer, scheduler, ema, steps, rank):
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.randint(0, 39, (4, 16), generator=g)
        optimizer.zero_grad()
        model.loss(x, generator=g).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        ema.update(model)


def _worker(rank: int, world: int, port: int, ckpt: str, export: str, plan: ParallelPlan) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = parallelize(MDLM(_config(), NoiseConfig()), plan)
    training = TrainingConfig(lr=1e-2, warmup_steps=1)
    optimizer = build_optimizer(model, training)
    scheduler = build_scheduler(optimizer, training)
    ema = EMA(model, 0.9)
    _train_steps(model, optimizer, scheduler, ema, 3, rank)
    save_checkpoint(ckpt, model, optimizer, scheduler, ema, TrainProgress(step=3, tokens_seen=3 * 64 * world))
    state = full_state_dict(model)
    ema_state = full_state_dict(model, ema)
    if rank == 0:
        torch.save({"model": state, "ema": ema_state}, export)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("plan", [ParallelPlan(), ParallelPlan(activation_checkpointing=True)],
                         ids=["fsdp2", "fsdp2+ac"])
def test_fsdp2_checkpoint_reshards_to_one_process(tmp_path, plan):
    ckpt, export = tmp_path / "ckpt", tmp_path / "export.pt"
    mp.start_processes(_worker, args=(2, _free_port(), str(ckpt), str(export), plan), nprocs=2, join=True,
                       start_method="spawn")
    assert is_complete(ckpt)
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    saved = torch.load(export, weights_only=True)

    # Load the 2-rank checkpoint into a plain single-process model (no process group, no FSDP).
    model = MDLM(_config(), NoiseConfig())
    training = TrainingConfig(lr=1e-2, warmup_steps=1)
    optimizer = build_optimizer(model, training)
    scheduler = build_scheduler(optimizer, training)
    ema = EMA(model, 0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    progress = load_checkpoint(ckpt, model, optimizer, scheduler, ema)
    assert progress.step == 3 and progress.tokens_seen == 3 * 64 * 2
    assert scheduler.last_epoch == 3 and ema.num_updates == 3
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name
    changed = [n for n in before if not torch.equal(before[n], saved["model"][n])]
    assert changed, "training changed no weight: the test would prove nothing"
    for name, value in ema.shadow.items():
        assert torch.equal(value, saved["ema"][name].float()), name
    assert optimizer.state_dict()["state"], "optimizer moments were not restored"
    # The restored model keeps training.
    _train_steps(model, optimizer, scheduler, ema, 1, 0)


def test_partial_checkpoint_is_rejected(tmp_path):
    model = MDLM(_config(), NoiseConfig())
    optimizer = build_optimizer(model, TrainingConfig())
    scheduler = build_scheduler(optimizer, TrainingConfig())
    path = save_checkpoint(tmp_path / "c", model, optimizer, scheduler, None, TrainProgress(step=1))
    assert is_complete(path)
    (path / "train_state.json").unlink()
    assert not is_complete(path)
    with pytest.raises(FileNotFoundError, match="not a complete"):
        load_checkpoint(path, model, optimizer, scheduler, None)
