"""Checkpoint fallback on restore: an incomplete or corrupt newest checkpoint is passed over for the previous one.

Real checkpoints of a small model are written with ``save_checkpoint`` (single process, no process group) into
a run directory laid out as Ray Train lays it out (``<run>/checkpoint_<timestamp>``), then broken in the ways
a crash or bad storage breaks them. The worker's restore path runs as in training: the candidates are listed
from the run's latest ``ray.train.Checkpoint`` (what ``ray.train.get_checkpoint`` returns inside a worker) by
``checkpoint_candidates`` and loaded by ``restore_checkpoint``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray.train
import torch

from mdlm.config import NoiseConfig, TrainingConfig, model_config_for
from mdlm.modeling import MDLM
from mdlm.train.checkpoint import (
    STATE_FILE,
    TrainProgress,
    checkpoint_candidates,
    is_complete,
    restore_checkpoint,
    save_checkpoint,
)
from mdlm.train.ema import EMA
from mdlm.train.optim import build_optimizer, build_scheduler

OLDER, LATEST = "checkpoint_2026-01-01_00-00-01.000000", "checkpoint_2026-01-01_00-00-02.000000"
DATA_FILE = "__0_0.distcp"  # the single rank's DCP data file

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

@dataclass
class Snapshot:
    """What a checkpoint holds, captured from the live objects right after saving it."""

    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    exp_avg: list[torch.Tensor]
    scheduler_epoch: int


def _build() -> tuple[MDLM, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, EMA]:
    torch.manual_seed(0)
    config = model_config_for("cpu", vocab_size=32, mask_token_id=31, max_seq_len=16, dropout=0.0, n_layers=2,
                              hidden_size=64, n_heads=4, cond_dim=32)
    model = MDLM(config, NoiseConfig())
    training = TrainingConfig(lr=1e-2, warmup_steps=1)
    optimizer = build_optimizer(model, training)
    return model, optimizer, build_scheduler(optimizer, training), EMA(model, 0.9)


def _train(model, optimizer, scheduler, ema, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 31, (4, 16), generator=g)
        optimizer.zero_grad()
        model.loss(x, generator=g).loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update(model)


def _snapshot(step, model, optimizer, scheduler, ema) -> Snapshot:
    return Snapshot(step=step, model={k: v.clone() for k, v in model.state_dict().items()},
                    ema={k: v.clone() for k, v in ema.shadow.items()},
                    exp_avg=[optimizer.state[p]["exp_avg"].clone() for p in model.parameters()],
                    scheduler_epoch=scheduler.last_epoch)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[str, Snapshot], Snapshot]:
    """A pristine run directory with two complete checkpoints (steps 2 and 4), their snapshots, and the
    state of a freshly built model (what 'start fresh' must leave behind)."""
    root = tmp_path_factory.mktemp("pristine") / "run"
    model, optimizer, scheduler, ema = _build()
    fresh = Snapshot(0, {k: v.clone() for k, v in model.state_dict().items()},
                     {k: v.clone() for k, v in ema.shadow.items()}, [], scheduler.last_epoch)
    snapshots = {}
    for name, step in ((OLDER, 2), (LATEST, 4)):
        _train(model, optimizer, scheduler, ema, 2, seed=step)
        save_checkpoint(root / name, model, optimizer, scheduler, ema, TrainProgress(step=step, tokens_seen=64 * step))
        snapshots[name] = _snapshot(step, model, optimizer, scheduler, ema)
    older, latest = snapshots[OLDER], snapshots[LATEST]
    assert any(not torch.equal(older.model[k], latest.model[k]) for k in older.model), "training changed nothing"
    assert any(not torch.equal(older.model[k], fresh.model[k]) for k in older.model)
    return root, snapshots, fresh


@pytest.fixture
def run_dir(saved, tmp_path) -> Path:
    """A fresh copy of the pristine run directory, free to break."""
    return Path(shutil.copytree(saved[0], tmp_path / "run"))


def _restore(latest: ray.train.Checkpoint | None, resume_from: str | None = None):
    model, optimizer, scheduler, ema = _build()
    progress, path = restore_checkpoint(checkpoint_candidates(latest, resume_from), model, optimizer, scheduler, ema)
    return progress, path, (model, optimizer, scheduler, ema)


def _assert_restored(progress: TrainProgress, objects, expected: Snapshot) -> None:
    model, optimizer, scheduler, ema = objects
    assert progress.step == expected.step and progress.tokens_seen == 64 * expected.step
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected.model[name]), name
    for name, value in ema.shadow.items():
        assert torch.equal(value, expected.ema[name]), name
    assert ema.num_updates == expected.step
    assert scheduler.last_epoch == expected.scheduler_epoch
    for p, exp_avg in zip(model.parameters(), expected.exp_avg, strict=True):
        assert torch.equal(optimizer.state[p]["exp_avg"], exp_avg)


def _assert_fresh(objects, fresh: Snapshot) -> None:
    model, _, scheduler, ema = objects
    for name, value in model.state_dict().items():
        assert torch.equal(value, fresh.model[name]), name
    for name, value in ema.shadow.items():
        assert torch.equal(value, fresh.ema[name]), name
    assert ema.num_updates == 0 and scheduler.last_epoch == fresh.scheduler_epoch


def _latest(run_dir: Path) -> ray.train.Checkpoint:
    return ray.train.Checkpoint.from_directory(str(run_dir / LATEST))


def _truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_intact_latest_is_restored(run_dir, saved):
    progress, path, objects = _restore(_latest(run_dir))
    assert path == str(run_dir / LATEST)
    _assert_restored(progress, objects, saved[1][LATEST])


@pytest.mark.parametrize("missing", [STATE_FILE, ".metadata"])
def test_partial_latest_falls_back_to_previous(run_dir, saved, missing):
    """A save cut short (no train_state.json, written last, or no DCP .metadata) is skipped."""
    (run_dir / LATEST / missing).unlink()
    assert not is_complete(run_dir / LATEST)
    progress, path, objects = _restore(_latest(run_dir))
    assert path == str(run_dir / OLDER)
    _assert_restored(progress, objects, saved[1][OLDER])


def test_latest_missing_a_shard_file_falls_back(run_dir, saved):
    """Marker files present but a rank's data file gone: complete by is_complete, fails inside dcp.load."""
    (run_dir / LATEST / DATA_FILE).unlink()
    assert is_complete(run_dir / LATEST)
    progress, path, objects = _restore(_latest(run_dir))
    assert path == str(run_dir / OLDER)
    _assert_restored(progress, objects, saved[1][OLDER])


def _truncate_data(directory: Path) -> None:
    _truncate(directory / DATA_FILE)


def _garble_metadata(directory: Path) -> None:
    (directory / ".metadata").write_bytes(b"\x80\x04 not a pickle")


def _garble_state(directory: Path) -> None:
    _truncate(directory / STATE_FILE)


@pytest.mark.parametrize("corrupt", [
    pytest.param(_truncate_data, id="truncated-data"),
    pytest.param(_garble_metadata, id="garbled-metadata"),
    pytest.param(_garble_state, id="truncated-train-state"),
])
def test_corrupt_latest_falls_back_to_previous(run_dir, saved, corrupt):
    corrupt(run_dir / LATEST)
    assert is_complete(run_dir / LATEST)  # looks complete: only loading it can tell
    progress, path, objects = _restore(_latest(run_dir))
    assert path == str(run_dir / OLDER)
    _assert_restored(progress, objects, saved[1][OLDER])


def test_run_checkpoints_come_before_resume_from(run_dir, saved, tmp_path):
    """Newest first: Ray's latest, then the run's older ones, and only then ``resume_from``."""
    elsewhere = shutil.copytree(run_dir / LATEST, tmp_path / "elsewhere" / "branch_point")
    (run_dir / LATEST / STATE_FILE).unlink()
    progress, path, objects = _restore(_latest(run_dir), resume_from=str(elsewhere))
    assert path == str(run_dir / OLDER)
    _assert_restored(progress, objects, saved[1][OLDER])


def test_resume_from_when_the_run_has_no_checkpoint(run_dir, saved):
    progress, path, objects = _restore(None, resume_from=str(run_dir / OLDER))
    assert path == str(run_dir / OLDER)
    _assert_restored(progress, objects, saved[1][OLDER])


def test_no_checkpoint_starts_fresh(saved):
    progress, path, objects = _restore(None)
    assert path is None and progress == TrainProgress()
    _assert_fresh(objects, saved[2])


def test_every_checkpoint_incomplete_starts_fresh(run_dir, saved):
    """E.g. a crash during the first saves: nothing was loaded, so training starts over untouched."""
    for name in (OLDER, LATEST):
        (run_dir / name / STATE_FILE).unlink()
    progress, path, objects = _restore(_latest(run_dir))
    assert path is None and progress == TrainProgress()
    _assert_fresh(objects, saved[2])


def test_every_checkpoint_unreadable_raises(run_dir):
    """Complete checkpoints exist but none loads: an error, not a silent fresh start (which would rotate the
    old checkpoints away, and would train on whatever the failed loads already copied in)."""
    for name in (OLDER, LATEST):
        _truncate(run_dir / name / DATA_FILE, 0.97)
    with pytest.raises(RuntimeError, match="no checkpoint could be loaded"):
        _restore(_latest(run_dir))


@pytest.mark.parametrize("break_latest", [False, True], ids=["intact", "corrupt-latest"])
def test_checkpoints_on_remote_storage(monkeypatch, run_dir, saved, tmp_path, break_latest):
    """With s3:// or gs:// storage Ray hands out paths of a pyarrow filesystem ('bucket/run/checkpoint_...'),
    not local paths. A SubTreeFileSystem over a local folder stands in for the bucket."""
    bucket = tmp_path / "bucket"
    shutil.copytree(run_dir, bucket / "run")
    if break_latest:
        _truncate_data(bucket / "run" / LATEST)
    monkeypatch.chdir(tmp_path / "run")  # relative bucket paths must not resolve by accident
    fs = pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem())
    progress, path, objects = _restore(ray.train.Checkpoint(f"run/{LATEST}", filesystem=fs))
    expected = OLDER if break_latest else LATEST
    assert path == f"run/{expected}"
    _assert_restored(progress, objects, saved[1][expected])
