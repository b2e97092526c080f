"""Rank 0's log records reach the driver through the console channel: all of them, in order, with their levels, once;
the other ranks' do not."""

from __future__ import annotations

import logging

import pytest

pytestmark = pytest.mark.ray


class _Records(logging.Handler):
    """Keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _worker(channel, rank: int) -> int:
    from mdlm.train import console

    console.attach(channel, rank)
    log = logging.getLogger("mdlm.train.loop")
    for step in (2, 4, 6):
        log.info(f"step {step}/6 from rank {rank}")
    log.debug("debug records stay out")
    log.warning(f"stopping on rank {rank}")
    return rank


def test_rank_zero_records_reach_the_driver_once_in_order(ray_local):
    ray = ray_local
    from mdlm.train import console

    received, logger = _Records(), logging.getLogger("mdlm")
    level = logger.level
    logger.addHandler(received)
    logger.setLevel(logging.INFO)
    task = ray.remote(num_cpus=0)(_worker)
    try:
        with console.relay() as channel:
            assert ray.get([task.remote(channel, 1), task.remote(channel, 0)]) == [1, 0]
    finally:
        logger.removeHandler(received)
        logger.setLevel(level)
    assert [(r.name, r.levelname, r.getMessage()) for r in received.records] == [
        ("mdlm.train.loop", "INFO", "step 2/6 from rank 0"),
        ("mdlm.train.loop", "INFO", "step 4/6 from rank 0"),
        ("mdlm.train.loop", "INFO", "step 6/6 from rank 0"),
        ("mdlm.train.loop", "WARNING", "stopping on rank 0"),
    ]
