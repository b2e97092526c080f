"""``bench/bench_serve.py`` end to end at a small size: the three sides over real HTTP on a local Ray Serve, the
in-process engine beside them, mixed traffic, and the JSON it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def test_mixed_traffic_on_every_side(tmp_path):
    out = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, "bench/bench_serve.py", "--clients", "3", "--requests", "2",
                           "--length", "32", "--batch", "4", "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert list(record["results"]) == ["no batching", "request batching", "continuous"]
    for side in [*record["results"].values(), record["engine"]]:
        assert side["requests"] == 6 and side["tokens_per_s"] > 0 and side["p99_s"] >= side["p50_s"] > 0
    assert record["results"]["no batching"]["mean_batch"] == 1.0
    assert record["results"]["continuous"]["mean_batch"] >= 1.0
    assert set(record["ratios"]) == {"request batching / no batching", "continuous / no batching",
                                     "continuous / request batching", "service overhead: continuous / engine"}
    assert "service overhead: continuous / engine" in done.stdout
